"""`rlhf-ray submit` (the Ray Jobs API) against a real multi-node local cluster with node pools.

The cluster is `rlhf_ray.localcluster`: a head plus one node per pool (train, gen), each labelled pool=<name> as
KubeRay worker groups are, each with its own Ray temp dir. The first job submitted is new code to every node (the
case that failed when the nodes shared one temp dir). Clients join it by its address, never `address="auto"`; it is
stopped by pid (never `ray stop`, which would kill every Ray on the host).
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from multihost import small_grpo_job

from rlhf_ray.fixtures.demo_data import write_demo_data
from rlhf_ray.localcluster import LocalCluster
from rlhf_ray.telemetry.tracker import read_jsonl_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = "rlhf_ray/assets/templates/tiny.json"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_cluster():
    cluster = LocalCluster(head_cpus=1, pools={"train": 1, "gen": 1})
    cluster.start()
    yield cluster
    sessions = set(cluster.pids)
    cluster.stop()
    assert not os.path.exists(cluster.root), "stop() leaves the nodes' temp dirs behind"
    ps = subprocess.run(["ps", "-eo", "sid=,stat=,args="], capture_output=True, text=True).stdout.splitlines()
    running = [line for line in ps if int(line.split()[0]) in sessions and not line.split()[1].startswith("Z")]
    assert not running, f"stop() left processes running: {running}"


def submit(cluster, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **cluster.client_env()}
    return subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "submit", "--address", cluster.dashboard_url, "--",
                           *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_each_node_has_its_own_temp_dir_and_the_dashboard_is_loopback_only(local_cluster):
    nodes = sorted(p.name for p in os.scandir(local_cluster.root) if p.is_dir())
    assert nodes == ["node-0", "node-1", "node-2"]
    port = local_cluster.dashboard_url.rsplit(":", 1)[1]
    host_ip = local_cluster.address.rsplit(":", 1)[0]
    if host_ip != "127.0.0.1":   # the job server answers on loopback only
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://{host_ip}:{port}/api/version", timeout=5)


def test_prepare_then_grpo_on_pools_through_job_submit(local_cluster, tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    data = write_demo_data(tmp_path / "data", n=16)
    prompts = tmp_path / "prompts"
    prepare = ["prepare", "--type", "prompt", "--input", str(data["prompt"]), "--tokenizer_dir",
               str(tiny_model_dir), "--conversation_template_config", TEMPLATE, "--output", str(prompts)]
    done = submit(local_cluster, *prepare)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout
    assert json.loads((prompts / "summary.json").read_text())["kept"] == 16

    # a failing job (bad flag) gives a non-zero exit and the job's own error message
    bad = submit(local_cluster, "prepare", "--type", "prompt")
    assert bad.returncode == 1 and "FAILED" in bad.stdout

    # GRPO with the policy on pool train and the vLLM engine on pool gen: two episodes, weights synced between
    done = submit(local_cluster, *small_grpo_job(tiny_model_dir, prompts, tmp_path, "--pool", "train",
                                                 "--generator_pool", "gen"))
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout
    rows = read_jsonl_metrics(tmp_path / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2] and rows[-1]["rl/policy_version"] == 2
    assert "pool=train" in done.stdout and "pool=gen" in done.stdout   # the printed plan pins each role
    assert (tmp_path / "policy" / "config.json").is_file()


def test_worker_group_lands_on_its_pool(local_cluster):
    code = """
import ray, json, os
from rlhf_ray.workers.base import RankedWorker
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.workers.group import WorkerGroup
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)   # the cluster this test started, by address
group = WorkerGroup(RankedWorker, GroupSpec(num_workers=1, cpus_per_worker=0.5, pool="gen"), name="gen")
node = group.call_rank(0, "node_id")
labels = {n["NodeID"]: n["Labels"].get("pool") for n in ray.nodes()}
print(json.dumps({"pool": labels[node]}))
"""
    env = {**os.environ, **local_cluster.client_env(), "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"pool": "gen"}


def test_rollout_bench_through_job_submit_reports_where_its_files_are(local_cluster, tiny_model_dir, tmp_path):
    """`rlhf-ray submit -- bench rollout ...`: the engine on pool gen; the report is written by the job's driver on
    the head node at --out (absolute here, so it outlives the job's working_dir copy), and the job's log says where."""
    pytest.importorskip("vllm")
    out = (tmp_path / "bench").resolve()
    done = submit(local_cluster, "bench", "rollout", "--model", str(tiny_model_dir), "--engines", "1", "--pool",
                  "gen", "--num_prompts", "4", "--output_len", "8", "--n", "2", "--repeats", "1", "--min_seconds",
                  "0", "--skip_raw", "--name", "rollout_job", "--out", str(out))
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    report = json.loads((out / "rollout_job.json").read_text())
    assert report["rows"][0]["group"]["tokens"] == 4 * 2 * 8 and "raw" not in report["rows"][0]
    assert (out / "rollout_job.png").stat().st_size > 0
    assert f"wrote {out / 'rollout_job.json'}" in done.stdout and f"wrote {out / 'rollout_job.png'}" in done.stdout
    assert "this ran as a Ray job on" in done.stdout and "may delete" not in done.stdout   # --out was absolute
