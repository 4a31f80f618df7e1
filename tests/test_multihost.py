"""Multi-host for real: three hosts (network namespaces, tests/multihost.py), a Ray cluster across them started by
`rlhf-ray cluster up --hostfile` with `ip netns exec` as the remote runner, and GRPO submitted to it twice: with the
plain `ray job submit` CLI and with `rlhf-ray submit`.

    10.77.0.1  head   the job's driver
    10.77.0.2  train  the policy (trainer) ranks
    10.77.0.3  gen    the vLLM engine

Ray's state API (from this machine, over the job server) says where every actor of each job ran; the test prints
that actor -> host table and checks each role ran on a node of its pool, that trainer and generator were on
different hosts, and that the gloo weight sync between them delivered the weights (the engine's log-probs of its
own samples match the trainer's). `cluster down` then stops only what `up` started; the namespaces go last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import multihost
from rl_data import prepare_prompts

from rlhf_ray.telemetry.tracker import read_jsonl_metrics

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
POOL_OF_CLASS = {"(job driver)": "head", "RLWorker": "train", "GeneratorWorker": "gen"}

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def hosts():
    yield from multihost.netns_hosts(3, need_gib=6)


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory):
    """`rlhf-ray cluster up` on the three hosts; yields the client environment it printed; `cluster down` after."""
    state_dir = tmp_path_factory.mktemp("cluster-state")
    hostfile = state_dir / "hosts.txt"
    hostfile.write_text(f"# address pool resources\n{hosts.ips[0]} head cpus=1 object_store_mb=100\n"
                        f"{hosts.ips[1]} train cpus=1 object_store_mb=100\n{hosts.ips[2]} gen cpus=1 object_store_mb=100\n")
    name = f"mh{os.getpid()}"
    common = ["--name", name, "--state_dir", str(state_dir)]
    up = cli("cluster", "up", "--hostfile", str(hostfile), "--runner", hosts.runner,
             "--env", f"GLOO_SOCKET_IFNAME={multihost.IFNAME}", *common)
    assert up.returncode == 0, up.stdout + up.stderr[-3000:]
    print(up.stdout)
    exports = next(line for line in up.stdout.splitlines() if line.startswith("export "))
    env = dict(word.split("=", 1) for word in exports.split()[1:])
    assert env["RAY_ADDRESS"] == f"http://{hosts.ips[0]}:8265"
    state = json.loads((state_dir / f"{name}.json").read_text())
    assert oct(os.stat(state_dir / f"{name}.token").st_mode & 0o777) == "0o600"
    try:
        yield env
    finally:
        down = cli("cluster", "down", *common)
        assert down.returncode == 0, down.stderr
        sessions = {str(pid) for pid in state["pids"]}
        ps = subprocess.run(["ps", "-eo", "sid=,stat=,pid=,args="], capture_output=True, text=True).stdout
        running = [line for line in ps.splitlines() if line.split()[0] in sessions and line.split()[1][0] != "Z"]
        assert not running, f"cluster down left processes running: {running}"   # zombies wait for their reaper
        assert not list(state_dir.glob(f"{name}.*")) and not any(Path("/tmp").glob(f"rlhf-{name}-*"))


@pytest.fixture(scope="module")
def prompts(tiny_model_dir, tmp_path_factory):
    return prepare_prompts(tiny_model_dir, tmp_path_factory.mktemp("mh-data") / "prompts", count=32)


def actor_hosts(env: dict, job_id: str) -> list[dict]:
    """Every actor of `job_id` with the IP and pool of the node it ran on (Ray's state API), printed as a table."""
    def state(kind: str, *filters: str) -> list[dict]:
        args = [RAY, "list", kind, "--format", "json", "--detail",
                "--limit", "1000", "--address", env["RAY_ADDRESS"]]
        for f in filters:
            args += ["--filter", f]
        done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout) if done.stdout.lstrip().startswith("[") else []

    nodes = {n["node_id"]: (n["node_ip"], n["labels"].get("pool")) for n in state("nodes")}
    job = next(j for j in state("jobs") if j["submission_id"] == job_id)
    pool_of_ip = dict(nodes.values())
    driver = job["driver_info"]
    rows = [{"class": "(job driver)", "pid": int(driver["pid"]), "ip": driver["node_ip_address"],
             "pool": pool_of_ip[driver["node_ip_address"]]}]
    unplaced = ("-", None)                    # an actor waiting for a node (a restart) has none yet
    rows += [{"class": a["class_name"], "pid": a["pid"], "ip": nodes.get(a["node_id"], unplaced)[0],
              "pool": nodes.get(a["node_id"], unplaced)[1]} for a in state("actors", f"job_id={job['job_id']}")]
    print(f"\nactor -> host ({job_id}):\n  {'actor class':<24} {'pid':>7}  {'node ip':<12} pool")
    for row in sorted(rows, key=lambda r: (r["pool"] or "", r["class"])):
        print(f"  {row['class']:<24} {row['pid']:>7}  {row['ip']:<12} {row['pool']}")
    return rows


def check_job(env: dict, job_id: str, out: Path, hosts) -> None:
    rows = actor_hosts(env, job_id)
    by_class = {}
    for row in rows:
        by_class.setdefault(row["class"], set()).add((row["ip"], row["pool"]))
    for cls, pool in POOL_OF_CLASS.items():
        assert cls in by_class, f"no {cls} actor in {sorted(by_class)}"
        assert {p for _, p in by_class[cls]} == {pool}, (cls, by_class[cls])
    # the trainer (weight-sync sender) and the engine (receiver) ran on different hosts
    assert {ip for ip, _ in by_class["RLWorker"]} == {hosts.ips[1]}
    assert {ip for ip, _ in by_class["GeneratorWorker"]} == {hosts.ips[2]}
    rows = read_jsonl_metrics(out / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2] and rows[-1]["rl/policy_version"] == 2
    assert all(row["weight_sync/bytes"] > 0 for row in rows)
    print(f"  weight sync (gloo): RLWorker {hosts.ips[1]} -> GeneratorWorker {hosts.ips[2]}, "
          f"{rows[-1]['weight_sync/bytes'] / 2**20:.2f} MiB per step, {len(rows)} steps")
    # the engine samples with the weights the trainer sent over gloo: their log-probs of those tokens agree
    assert max(row["rollout/logprob_gap_mean"] for row in rows) < 1e-3


def test_grpo_across_hosts_with_ray_job_submit_and_rlhf_ray_submit(cluster, hosts, prompts, tiny_model_dir,
                                                                   tmp_path):
    """The same GRPO job twice, at once (each pool has room for two): `ray job submit` and `rlhf-ray submit`."""
    def grpo(out: Path) -> list[str]:
        return multihost.small_grpo_job(tiny_model_dir, prompts, out, "--pool", "train", "--generator_pool", "gen",
                                        "--weight_sync_channel", "gloo")

    ray_job_id = f"mh-ray-{os.getpid()}"
    launch = {"ray job submit": [RAY, "job", "submit", "--submission-id", ray_job_id, "--working-dir", ".",
                                 "--runtime-env", "launch/runtime_env.yaml", "--", "python", "-m", "rlhf_ray.cli",
                                 *grpo(tmp_path / "ray")],
              "rlhf-ray submit": [sys.executable, "-m", "rlhf_ray.cli", "submit", "--", *grpo(tmp_path / "rlhf")]}
    running = {name: subprocess.Popen(argv, cwd=REPO, env={**os.environ, **cluster}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for name, argv in launch.items()}
    outputs = {name: proc.communicate(timeout=600)[0] for name, proc in running.items()}
    for name, proc in running.items():
        assert proc.returncode == 0, f"{name}: {outputs[name][-5000:]}"
    assert f"Job '{ray_job_id}' succeeded" in outputs["ray job submit"]
    rlhf_job_id = outputs["rlhf-ray submit"].split("submitted ", 1)[1].split(":", 1)[0]
    assert f"job {rlhf_job_id} SUCCEEDED" in outputs["rlhf-ray submit"]
    check_job(cluster, ray_job_id, tmp_path / "ray", hosts)
    check_job(cluster, rlhf_job_id, tmp_path / "rlhf", hosts)
