"""Multi-host faults: a host's Ray node lost mid-run. Five hosts (network namespaces, tests/multihost.py), a Ray
cluster across them (HostfileCluster, as `rlhf-ray cluster up --hostfile`), and one GRPO job that loses two hosts,
each by SIGKILL of every process on it (its raylet and the job's actors there: a host that loses power):

    10.77.0.1  head   the job's driver
    10.77.0.2  train  \\ the policy rank runs on one of them; the other is the spare
    10.77.0.3  train  /
    10.77.0.4  gen    \\ one vLLM engine each
    10.77.0.5  gen    /

1. the trainer's host: the job notices the lost rank, tears down, and resumes on its own (--max_restarts 1) from
   its newest complete checkpoint (one per episode), the policy now on the spare host;
2. a generator host: the job goes on with the remaining engine (a chunk sent to the dead one is re-queued) and
   finishes; weight syncs go to the one live engine.
Every episode's batch is complete (all prompts, all samples), the episodes after the resume follow the checkpoint,
and the actor -> host table is printed before and after.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

import multihost
from rl_data import prepare_prompts
from test_multihost import RAY, REPO, actor_hosts

from rlhf_ray.checkpoint.atomic import COMPLETE_MARKER
from rlhf_ray.hostfile_cluster import HostfileCluster, parse_hostfile

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

POOLS = ("head", "train", "train", "gen", "gen")
EPISODES = 20


@pytest.fixture(scope="module")
def hosts():
    yield from multihost.netns_hosts(len(POOLS), need_gib=8)


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory):
    hostfile = "".join(f"{ip} {pool} cpus=1 object_store_mb=100\n" for ip, pool in zip(hosts.ips, POOLS))
    made = HostfileCluster(parse_hostfile(hostfile), name=f"mhf{os.getpid()}", runner=hosts.runner,
                           env={"GLOO_SOCKET_IFNAME": multihost.IFNAME},
                           state_dir=tmp_path_factory.mktemp("fault-cluster")).up()
    try:
        yield made
    finally:
        made.down()


class BackgroundJob:
    """`ray job submit` (it follows the job's log) in the background; the output lines collected as they come."""

    def __init__(self, env: dict, job_id: str, argv: list[str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([RAY, "job", "submit", "--submission-id", job_id, "--working-dir", ".",
                                      "--runtime-env", "launch/runtime_env.yaml", "--", "python", "-m",
                                      "rlhf_ray.cli", *argv], cwd=REPO, env={**os.environ, **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition, what: str, timeout_s: float = 240.0) -> float:
        """Poll `condition()` until true; seconds it took. Fails naming `what` if the job ends or time runs out."""
        start = time.monotonic()
        while not condition():
            if self.proc.poll() is not None:
                self.reader.join(10)
                pytest.fail(f"the job ended (exit {self.proc.returncode}) before {what}:\n{self.output[-6000:]}")
            if time.monotonic() - start > timeout_s:
                pytest.fail(f"no {what} within {timeout_s:.0f}s:\n{self.output[-6000:]}")
            time.sleep(0.5)
        return time.monotonic() - start

    def finish(self, timeout_s: float = 300.0) -> int:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the job did not finish within {timeout_s:.0f}s:\n{self.output[-6000:]}")
        self.reader.join(10)
        return self.proc.returncode


def metric_rows(out: Path) -> list[dict]:
    """The job's metrics.jsonl rows so far (a line still being written is left for the next look)."""
    path = out / "log" / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]


def newest_complete_step(checkpoints: Path) -> int:
    return max(int(step.name[len("step_"):]) for step in checkpoints.glob("step_*")
               if (step / COMPLETE_MARKER).exists())


def alive_ips(cluster: HostfileCluster) -> set[str]:
    return {node["node_ip"] for node in cluster.alive_nodes()}


def ips_of(rows: list[dict], cls: str) -> set[str]:
    """Where the actors of class `cls` ran (the restarted attempt's may be still waiting for a node: ip "-")."""
    return {row["ip"] for row in rows if row["class"] == cls and row["ip"] != "-"}


def test_grpo_survives_losing_its_trainer_host_then_a_generator_host(cluster, hosts, tiny_model_dir, tmp_path):
    env, out, job_id = cluster.client_env(), tmp_path / "job", f"mh-faults-{os.getpid()}"
    train_ips, gen_ips = set(hosts.ips[1:3]), set(hosts.ips[3:5])
    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts", count=32)
    argv = multihost.small_grpo_job(tiny_model_dir, prompts, out, "--pool", "train", "--generator_pool", "gen",
                                    "--weight_sync_channel", "gloo", "--num_engines", "2", "--cpus_per_engine", "1",
                                    "--num_episodes", str(EPISODES), "--save_interval", "1", "--max_restarts", "1")
    job = BackgroundJob(env, job_id, argv)
    job.wait_for(lambda: len(metric_rows(out)) >= 2, "two episodes logged")
    (trainer_ip,) = hosts.hosts_running("ray::RLWorker")       # episodes take a second: no time to ask Ray first
    (spare_ip,) = train_ips - {trainer_ip}

    # 1. the trainer's host is lost: resume from the newest complete checkpoint, on the spare
    logged_at_loss, killed_at = len(metric_rows(out)), time.monotonic()
    print(f"\nkilling trainer host {trainer_ip}: {hosts.kill_host(trainer_ip)} processes; "
          f"{logged_at_loss} episodes logged; the placement before:")
    before = actor_hosts(env, job_id)
    assert ips_of(before, "GeneratorWorker") == gen_ips and ips_of(before, "RLWorker") == {trainer_ip}
    job.wait_for(lambda: trainer_ip not in alive_ips(cluster), f"node {trainer_ip} declared dead")
    print(f"Ray declared node {trainer_ip} dead {time.monotonic() - killed_at:.0f}s after the kill")
    restart = r"lost policy rank 0; restart 1/1 from checkpoint (\S+/step_(\d+))"
    job.wait_for(lambda: re.search(restart, job.output), "the restart line")
    resumed_from, resumed_step = re.search(restart, job.output).groups()
    resumed_step = int(resumed_step)
    # the newest complete one (the resumed attempt writes its next only after a whole episode), and no older than
    # the episode in progress at the loss
    assert resumed_step == newest_complete_step(Path(resumed_from).parent) >= logged_at_loss - 1, job.output[-4000:]
    rows_at_restart = len(metric_rows(out))
    job.wait_for(lambda: len(metric_rows(out)) > rows_at_restart, "an episode after the resume")

    # 2. a generator host is lost: the job finishes on the other engine
    gen_lost = hosts.ips[4]
    rows_at_gen_loss = len(metric_rows(out))
    print(f"killing generator host {gen_lost}: {hosts.kill_host(gen_lost)} processes; "
          f"{rows_at_gen_loss} episodes logged")
    assert job.finish() == 0, job.output[-6000:]
    assert f"Job '{job_id}' succeeded" in job.output and "restart 2/" not in job.output
    after = actor_hosts(env, job_id)
    assert alive_ips(cluster) == set(hosts.ips) - {trainer_ip, gen_lost}
    assert ips_of(after, "RLWorker") == {trainer_ip, spare_ip}     # the lost rank, and its successor on the spare
    assert ips_of(after, "GeneratorWorker") == gen_ips

    rows = metric_rows(out)
    steps = [row["step"] for row in rows]
    logged_before = len(steps) - (EPISODES - resumed_step)          # rows the first attempt wrote
    assert steps == list(range(1, logged_before + 1)) + list(range(resumed_step + 1, EPISODES + 1)), steps
    assert logged_before in (resumed_step, resumed_step + 1)         # at most the episode whose checkpoint was cut
    # every episode's batch whole: each prompt once, with all its samples (the group asserts each index once)
    prompts, samples = map(int, re.search(r"(\d+) prompts × (\d+) samples", job.output).groups())
    assert all(row["rollout/prompts"] == prompts and row["rollout/samples"] == prompts * samples for row in rows)
    engines = [row["weight_sync/engines"] for row in rows]
    assert engines[:rows_at_gen_loss] == [2.0] * rows_at_gen_loss and engines[-1] == 1.0, engines
    print(f"episodes {steps}; engines synced per episode {engines}; "
          f"chunks re-queued {sum(row['rollout/retried_chunks'] for row in rows):g}")
