"""`rlhf-ray submit` (the Ray Jobs API) against a real multi-node local cluster with node pools.

The cluster is `rlhf_ray.localcluster`: a head plus one node per pool, each labelled pool=<name> as KubeRay worker
groups are. It is stopped by pid (never `ray stop`, which would kill every Ray on the host).
"""

import json
import os
import subprocess
import sys

import pytest

from rlhf_ray.fixtures.demo_data import write_demo_data
from rlhf_ray.localcluster import LocalCluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    cluster = LocalCluster(head_cpus=1, pools={"gen": 1})
    cluster.start()
    yield cluster
    cluster.stop()


def test_job_submit_runs_prepare_and_reports_status(local_cluster, tmp_path):
    data = write_demo_data(tmp_path / "data", n=16)
    out = tmp_path / "prepared"
    env = {**os.environ, **local_cluster.client_env()}
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "submit", "--address", local_cluster.dashboard_url, "--",
           "prepare", "--type", "sft", "--input", str(data["sft"]), "--tokenizer_dir", "rlhf_ray/assets/tiny-tokenizer",
           "--conversation_template_config", "rlhf_ray/assets/templates/tiny.json", "--output", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout
    assert json.loads((out / "summary.json").read_text())["kept"] == 16

    # a failing job (bad flag) gives a non-zero exit and the job's own error message
    bad = subprocess.run(cmd[:7] + ["prepare", "--type", "sft"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 1 and "FAILED" in bad.stdout


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
