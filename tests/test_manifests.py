"""The KubeRay manifests in cluster/: KubeRay's v1 schema, the operator's validation rules, the deployment rules a
platform engineer expects, and that every shipped launch config fits the nodes of every manifest meant to run it.

Schema: tests/kuberay_v1_subset.yaml (written from KubeRay's CRDs). Operator rules: `operator_errors` restates
ray-operator/controllers/ray/utils/validation.go (ValidateRayClusterSpec / ValidateRayJobSpec / metadata) for the
fields these manifests use. Fit: the job's own planner (pipelines/rl/roles.py + placement/plan.py) against one
NodeCapacity per pod that KubeRay keeps up: `replicas` without the autoscaler, `minReplicas` with it (the job's
start-up check sees only nodes that are up). A pod's CPUs/GPUs are its container limits, as KubeRay passes them to
`ray start`; its pool is its `pool` label and its accelerator type what Ray would detect from the GPU product name.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from rlhf_ray.config.base import parse_config
from rlhf_ray.pipelines.rl import roles as rl_roles
from rlhf_ray.pipelines.rl.config import GRPOConfig, PPOConfig
from rlhf_ray.pipelines.rl.groups import active_roles
from rlhf_ray.placement import ClusterCapacity, NodeCapacity, ResourcePlan
from rlhf_ray.placement.pools import ACCELERATOR_LABEL, POOL_LABEL

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((REPO / "cluster").glob("ray*.yaml"))
CONFIGS = sorted((REPO / "launch" / "configs").glob("*.yaml"))
JOBS = {"ppo": PPOConfig, "grpo": GRPOConfig}
SCHEMA = yaml.safe_load((Path(__file__).parent / "kuberay_v1_subset.yaml").read_text())
SHARED_MOUNTS = ("/mnt/models", "/mnt/data", "/mnt/output")
GPU = "nvidia.com/gpu"
GPU_PRODUCT = "nvidia.com/gpu.product"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group) for the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def autoscaling(spec: dict) -> bool:
    return bool(spec.get("enableInTreeAutoscaling"))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# ------------------------------------------------------------------ KubeRay's own rules (validation.go)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RAY_START_RESOURCE_KEYS = ("num-cpus", "num-gpus", "memory", "resources")


def _label_errors(group: str, labels: dict) -> list[str]:
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix))) or len(name) > 63 \
                or not LABEL_NAME.match(name):
            errors.append(f"invalid label key for {group} group: {key!r}")
        if len(str(value)) > 63 or (value and not LABEL_NAME.match(str(value))):
            errors.append(f"invalid label value for key {key!r} in {group} group: {value!r}")
    return errors


def cluster_errors(spec: dict) -> list[str]:
    """ValidateRayClusterSpec for the fields used here."""
    errors = []
    v2 = autoscaling(spec) and (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    for name, group in groups(spec):
        if not containers(group):
            errors.append(f"{name}: should have at least one container")
        params = group.get("rayStartParams") or {}
        if "labels" in params:
            errors.append(f"rayStartParams['labels'] is not supported for {name} group; please use the top-level "
                          f"Labels field instead")
        if group.get("resources") and any(params.get(k) for k in RAY_START_RESOURCE_KEYS):
            errors.append(f"resource fields should not be set in both rayStartParams and Resources for {name} group")
        errors += _label_errors(name, group.get("labels") or {})
        if v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errors.append(f"restartPolicy for {name} should be Never or unset when using autoscaler V2")
        if name == "head":
            continue
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling(spec) and (low is None or high is None):
            errors.append(f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is "
                          f"disabled")
        if (low or 0) < 0 or (high or 0) < 0 or (low is not None and high is not None and low > high):
            errors.append(f"worker group {name}: minReplicas {low} / maxReplicas {high}")
        if group.get("idleTimeoutSeconds") is not None and not v2:
            errors.append(f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled")
    if (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", 0) < 0:
        errors.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        if not spec.get("rayVersion") or _version(spec["rayVersion"]) < (2, 52, 0):
            errors.append("authOptions.mode is 'token' but minimum Ray version is 2.52.0")
        if auth.get("enableK8sTokenAuth") and (_version(spec["rayVersion"]) < (2, 55, 0) or auth.get("secretName")):
            errors.append("authOptions.enableK8sTokenAuth needs Ray >= 2.55.0 and no secretName")
    elif auth.get("enableK8sTokenAuth"):
        errors.append("authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'")
    return errors


def operator_errors(doc: dict) -> list[str]:
    """What the KubeRay operator would refuse in this RayCluster or RayJob."""
    name, spec = doc["metadata"]["name"], doc["spec"]
    longest = 53 if doc["kind"] == "RayCluster" else 53 - 6
    errors = [] if len(name) <= longest and DNS1035.match(name) else [f"name {name!r}: a DNS-1035 label of at most "
                                                                      f"{longest} characters"]
    if doc["kind"] == "RayCluster":
        return errors + cluster_errors(spec)
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append("TTLSecondsAfterFinished must be a non-negative integer")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished"):
        errors.append("a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        errors.append("one of RayClusterSpec or ClusterSelector must be set")
    if spec.get("submissionMode") == "SidecarMode" and (spec.get("submitterPodTemplate")
                                                        or spec.get("submitterConfig")):
        errors.append("SidecarMode doesn't support SubmitterPodTemplate / SubmitterConfig")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        errors.append("activeDeadlineSeconds must be a positive integer")
    if spec.get("backoffLimit", 0) < 0:
        errors.append("backoffLimit must be a positive integer")
    if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), dict):
        errors.append("runtimeEnvYAML is not a YAML mapping")
    if spec.get("rayClusterSpec"):
        if (spec["rayClusterSpec"].get("authOptions") or {}).get("enableK8sTokenAuth"):
            errors.append("K8s token auth mode is currently not supported for RayJob")
        errors += cluster_errors(spec["rayClusterSpec"])
    return errors


# ------------------------------------------------------------------ the manifests
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kuberay_v1_schema(path):
    jsonschema.validate(load(path), SCHEMA)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_operator_accepts_the_manifest(path):
    assert operator_errors(load(path)) == []


def test_the_checks_catch_what_kuberay_refuses():
    doc = load(REPO / "cluster" / "raycluster.yaml")
    old_style = copy.deepcopy(doc)
    old_style["spec"]["workerGroupSpecs"][0]["rayStartParams"]["labels"] = "pool=train-h100"
    assert any("rayStartParams['labels'] is not supported for train-h100" in e for e in operator_errors(old_style))
    old_ray = copy.deepcopy(doc)
    old_ray["spec"]["rayVersion"] = "2.46.0"
    assert any("minimum Ray version is 2.52.0" in e for e in operator_errors(old_ray))
    misspelt = copy.deepcopy(doc)
    misspelt["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(misspelt, SCHEMA)


def _memory_gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Mi|Gi|Ti)", quantity).groups()
    return float(number) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[unit]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_follows_the_deployment_rules(path):
    doc = load(path)
    spec = cluster_spec(doc)
    ray_pin = re.search(r"^ray==([\d.]+)$", (REPO / "requirements" / "constraints-cpu.txt").read_text(), re.M)[1]
    assert spec["rayVersion"] == ray_pin, "the manifest's Ray must be the image's"
    assert spec.get("authOptions", {}).get("mode") == "token", "Ray's token auth"
    if any(g.get("minReplicas", 0) == 0 for _, g in groups(spec)[1:]):
        assert autoscaling(spec) and spec.get("autoscalerOptions"), "a group may be at 0 nodes: the autoscaler"
    pods = [(name, g["template"]["spec"]) for name, g in groups(spec)]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] and doc["spec"]["ttlSecondsAfterFinished"] > 0
        assert doc["spec"]["activeDeadlineSeconds"] > 0
        assert doc["spec"]["submissionMode"] == "K8sJobMode" and doc["spec"]["submitterPodTemplate"]
        pods.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
        runtime_env = yaml.safe_load((REPO / "launch" / "runtime_env.yaml").read_text())
        assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) == runtime_env, "= launch/runtime_env.yaml"
        config = re.search(r"--config (\S+)", doc["spec"]["entrypoint"])[1]
        assert (REPO / config.split("/rlhf-ray/", 1)[1]).is_file(), config
    for name, pod in pods:
        for container in pod["containers"]:
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], f"{path.name} {name}: requests == limits"
            assert container["image"].startswith("rlhf-ray:"), container["image"]
        if name == "submitter":
            continue
        limits = pod["containers"][0]["resources"]["limits"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        assert _memory_gib(shm["sizeLimit"]) >= 0.3 * _memory_gib(limits["memory"]), \
            f"{path.name} {name}: /dev/shm must hold Ray's object store (30% of the pod's memory)"
        for mount_path in SHARED_MOUNTS:
            claim = volumes[mounts[mount_path]["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim == load(REPO / "cluster" / "storage.yaml")["metadata"]["name"]
        if GPU in limits:
            assert GPU_PRODUCT in pod.get("nodeSelector", {}), f"{path.name} {name}: generic GPU node selector"
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod.get("tolerations", [])


def test_the_shared_volume_is_read_write_many():
    claim = load(REPO / "cluster" / "storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]


# ------------------------------------------------------------------ the launch configs fit
def ray_accelerator_type(gpu_product: str) -> str | None:
    """What Ray detects on a node of this GPU product (`nvidia.com/gpu.product` is the product name with '-')."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    return NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(gpu_product.replace("-", " "))


def manifest_nodes(spec: dict) -> ClusterCapacity:
    """One node per pod KubeRay keeps up, with the resources and labels Ray gives it."""
    nodes = []
    for name, group in groups(spec):
        count = 1 if name == "head" else group["minReplicas"] if autoscaling(spec) else group["replicas"]
        limits = containers(group)[0]["resources"]["limits"]
        params, labels = group.get("rayStartParams") or {}, group.get("labels") or {}
        cpu = float(params.get("num-cpus", str(limits["cpu"]).removesuffix("m")))
        cpu = cpu / 1000 if str(limits["cpu"]).endswith("m") and "num-cpus" not in params else cpu
        resources = {"CPU": cpu, "GPU": float(params.get("num-gpus", limits.get(GPU, 0)))}
        product = group["template"]["spec"].get("nodeSelector", {}).get(GPU_PRODUCT)
        detected = ray_accelerator_type(product) if product else None
        assert labels.get(ACCELERATOR_LABEL, detected) == detected, \
            f"group {name}: label {ACCELERATOR_LABEL}={labels.get(ACCELERATOR_LABEL)} but Ray detects {detected}"
        nodes += [NodeCapacity(f"{name}-{i}", resources, labels.get(POOL_LABEL), detected) for i in range(count)]
    return ClusterCapacity(nodes)


def manifests_running(config: Path) -> list[Path]:
    """A GPU RayCluster runs every config (raycluster-cpu.yaml is for laptops); a RayJob the config it names."""
    return [m for m in MANIFESTS if f"launch/configs/{config.name}" in load(m)["spec"].get("entrypoint", "")
            or (load(m)["kind"] == "RayCluster" and manifest_nodes(load(m)["spec"]).total()["GPU"])]


def test_every_launch_config_has_a_rayjob():
    jobs = [m for m in MANIFESTS if load(m)["kind"] == "RayJob"]
    assert all(any(f"launch/configs/{c.name}" in load(j)["spec"]["entrypoint"] for j in jobs) for c in CONFIGS)


@pytest.mark.parametrize("config,manifest", [(c, m) for c in CONFIGS for m in manifests_running(c)],
                         ids=lambda p: p.name)
def test_launch_config_fits_the_manifest(config, manifest, monkeypatch):
    job = config.name.split("-", 1)[0]
    cfg = parse_config(JOBS[job], ["--config", str(config)], f"rlhf-ray {job}")
    cluster = manifest_nodes(cluster_spec(load(manifest)))
    monkeypatch.setattr(rl_roles, "_cluster_has_gpus", lambda: cluster.total()["GPU"] > 0)   # engines get GPUs
    plan = rl_roles.plan_roles(cfg, active_roles(cfg))
    resources = ResourcePlan()
    for name, (bundle, _) in plan.sets.items():
        resources.add(name, bundle)
    resources.check(cluster)
    print(f"{config.name} on {manifest.name}:\n{resources.describe(cluster)}")
    pinned = {role: spec.pool for role, spec in plan.specs.items()}
    assert all(pinned.values()), f"{config.name}: every role on a pool, got {pinned}"
    for path in (cfg.model.pretrain, *cfg.data.prompt_dataset, cfg.checkpoint.save_path):
        assert path.startswith(SHARED_MOUNTS), f"{config.name}: {path} is not on the shared volume"


# ------------------------------------------------------------------ the images (not built here: no docker)
DOCKERFILES = {"Dockerfile": "rlhf-ray:0.1", "Dockerfile.cpu": "rlhf-ray:0.1-cpu"}


def _pyproject_pins() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text() + (REPO / "Makefile").read_text()
    return dict(re.findall(r'"?([A-Za-z0-9_.-]+)==([0-9][^"\s,+]*)', text))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_recipe_is_pinned_and_complete(name):
    text = (REPO / "cluster" / name).read_text()
    run = re.sub(r"\\\n", " ", text)
    ray_pin = re.search(r"^ray==([\d.]+)$", (REPO / "requirements" / "constraints-cpu.txt").read_text(), re.M)[1]
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin)}-py311-", text, re.M), "the Ray of the manifests"
    assert f"-t {DOCKERFILES[name]} ." in text
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"{name}: COPY {path}"
            assert f"!{path}" in ignored or f"!{path}/" in ignored, f".dockerignore keeps {path} out of the context"
    assert "-c requirements/constraints-cpu.txt" in run, "the Makefile's constraints file"
    for line in re.findall(r"pip install ([^&\n]+)", run):
        for flag, path in re.findall(r"(-c|-r) (\S+)", line):
            assert (REPO / path).is_file(), f"{name}: {flag} {path}"
    pins = _pyproject_pins()
    for line in re.findall(r"pip install ([^&\n]+)", run):
        packages = [a for a in line.split() if not a.startswith("-") and not a.startswith(("requirements/", "http"))]
        for package in packages:
            if package.startswith(("-e", '".', ".")):
                continue
            assert "==" in package, f"{name}: {package} is not pinned"
            base, version = package.split("==")
            assert pins.get(base, version.split("+")[0]) == version.split("+")[0], f"{name}: {package} vs {pins[base]}"
        assert "--only-binary=:all:" in line or packages == ["colossalai==0.5.0"], f"{name}: wheels only: {line}"
    assert not any("flash" in line for line in text.splitlines() if not line.startswith("#")), "no flash-attn"
    assert ".[gpu" not in text, "the gpu extra pulls flash-attn's sdist"
    env = dict(re.findall(r"(\w+)=(\S+)", re.search(r"^ENV (.+)$", text, re.M)[1]))
    runtime_env = yaml.safe_load((REPO / "launch" / "runtime_env.yaml").read_text())["env_vars"]
    assert {k: env[k] for k in runtime_env} == runtime_env, "= launch/runtime_env.yaml"


def test_every_manifest_image_has_a_recipe():
    images = {c["image"] for m in MANIFESTS for _, g in groups(cluster_spec(load(m))) for c in containers(g)}
    assert images <= set(DOCKERFILES.values()), images
