"""Connect a job to Ray: join the cluster it was submitted to, or start a private local one.

Inside `ray job submit` (or with RAY_ADDRESS exported) the job joins that cluster; otherwise it starts its own local
cluster with `address="local"`, which never joins a stranger's cluster on the same host (plain `ray.init()` might).
A process that already called `ray.init` (a test session, a notebook) is reused as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

# Settings every actor of a locally started cluster needs on a shared CPU host.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def connect_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None) -> bool:
    """Make sure this process is connected to Ray; return True when this call started (and so owns) it.

    num_cpus: CPUs of a locally started cluster (default: all of this machine's); ignored when joining one.
    env_vars: extra environment for every actor of a locally started cluster.
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    env = {**_WORKER_ENV, **{k: v for k, v in os.environ.items() if k in ("HF_HUB_OFFLINE", "WANDB_MODE")},
           **(env_vars or {})}
    # Actors must import rlhf_ray even when it is run from a checkout that is not pip-installed.
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
    start_local_ray(num_cpus=num_cpus, env_vars=env, log_to_driver=True)
    return True


def start_local_ray(num_cpus: int | None, env_vars: dict[str, str], log_to_driver: bool):
    """Start a private local cluster whose every worker has `env_vars` in its environment.

    The workers inherit the variables from the raylet, which inherits them from this process while `ray.init`
    starts it; this process's own environment is restored afterwards. Not a runtime_env: with one, Ray starts each
    worker through its runtime-env setup script, which imports Ray a second time (~1.2 s of CPU per actor here) and
    waits on the runtime-env agent.
    """
    import ray

    saved = {key: os.environ.get(key) for key in env_vars}
    os.environ.update(env_vars)
    try:
        return ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def disconnect_ray(started: bool) -> None:
    """Shut Ray down only when this process started it (never someone else's session)."""
    import ray

    if started and ray.is_initialized():
        _stop_autoscaler_monitor()
        ray.shutdown()


def _stop_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of the local cluster this process started, before `ray.shutdown`.

    ray.shutdown stops the GCS first; the monitor's SIGTERM handler then tries to report to the gone GCS until Ray
    kills it a second later: a whole second of every job's exit here, for a cluster that has nothing left to scale.
    This reads Ray's private process table (ray 2.60); where that has changed it does nothing.
    """
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for info in processes.get(getattr(ray_constants, "PROCESS_TYPE_MONITOR", "monitor"), []):
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)
