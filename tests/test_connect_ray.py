"""connect_ray / disconnect_ray on a private local cluster, in a fresh process (the session's cluster is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, os, time
from rlhf_ray.placement.cluster import connect_ray, disconnect_ray
from ray._private import worker

assert connect_ray(num_cpus=1, env_vars={"RLHF_RAY_PROBE": "yes"})
import ray

@ray.remote(num_cpus=0)
def probe():
    return os.environ.get("RLHF_RAY_PROBE"), ray.get_runtime_context().runtime_env

seen, runtime_env = ray.get(probe.remote(), timeout=120)
processes = {kind: [info.process for info in infos] for kind, infos in worker._global_node.all_processes.items()}
shutdown, at_shutdown = ray.shutdown, {}

def recording_shutdown(*args, **kwargs):
    at_shutdown.update({kind: [p.poll() for p in ps] for kind, ps in processes.items()})
    return shutdown(*args, **kwargs)

ray.shutdown = recording_shutdown
started = time.perf_counter()
disconnect_ray(True)
print(json.dumps({"seen": seen, "runtime_env": runtime_env, "here": os.environ.get("RLHF_RAY_PROBE"),
                  "shutdown_s": time.perf_counter() - started,
                  "at_shutdown": at_shutdown,
                  "alive": [kind for kind, ps in processes.items() for p in ps if p.poll() is None]}))
"""


def test_a_private_cluster_passes_its_environment_and_shuts_down_without_waiting_on_the_monitor():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["seen"] == "yes" and not report["runtime_env"]     # inherited from the raylet, no runtime_env
    assert report["here"] is None                                    # the driver's own environment is untouched
    # the autoscaler monitor is gone before ray.shutdown stops the GCS (else it waits on it, then is killed)
    assert report["at_shutdown"]["monitor"] == [-9] and report["at_shutdown"]["gcs_server"] == [None], report
    assert report["alive"] == [], report
