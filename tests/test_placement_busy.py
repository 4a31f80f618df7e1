"""A pool that exists but is busy: `rlhf-ray grpo|sft --placement_timeout_s 3` fails after about 3 s with one line that
names the pool's free resources (not the cluster's) and the placement group holding them, and no traceback.

A subprocess starts its own local Ray (2 CPUs, the node labelled `pool=busy` and with Ray's accelerator label
`ray.io/accelerator-type=H100`, as Ray sets it on an H100 node), reserves both CPUs through the accelerator pool
(so the `accelerator_type:H100` selector is checked on real Ray), then runs the CLI on that cluster.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from rl_data import TEMPLATE, prepare_prompts
from supervised_data import sft_data

pytestmark = [pytest.mark.ray]

SCRIPT = """
import sys, time, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, labels={"pool": "busy",
         "ray.io/accelerator-type": "H100"})
from rlhf_ray.cli import main
from rlhf_ray.placement.groups import GroupSpec, build_placement_group
build_placement_group(GroupSpec(num_workers=2, cpus_per_worker=1, pool="accelerator_type:H100"), name="holder",
                      timeout_s=60)
start = time.perf_counter()
status = main(sys.argv[1:])
print(f"status={status} seconds={time.perf_counter() - start:.1f}")
"""


def _flags(job: str, tiny_model_dir, tmp_path) -> list[str]:
    """The job's flags on pool 'busy' with a 3 s placement timeout."""
    common = ["--pool", "busy", "--placement_timeout_s", "3", "--num_workers", "1", "--cpus_per_worker", "0.5",
              "--save_path", str(tmp_path / "out"), "--log_dir", str(tmp_path / "log"), "--tensorboard", "false"]
    if job == "sft":
        train_dir, _ = sft_data(tmp_path / "data", n_train=16, n_eval=4)
        return ["sft", "--pretrain", str(tiny_model_dir), "--dataset", str(train_dir), "--max_steps", "1", *common]
    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts", count=16)
    return ["grpo", "--pretrain", str(tiny_model_dir), "--prompt_dataset", str(prompts),
            "--conversation_template_config", TEMPLATE, "--reward_source", "arithmetic", "--kl_coef", "0",
            "--num_engines", "1", "--cpus_per_engine", "0.5", "--generator_pool", "busy",
            "--num_episodes", "1", "--experience_batch_size", "2", "--train_batch_size", "2",
            "--accumulation_steps", "4", *common]


@pytest.mark.parametrize("job", ["grpo", "sft"])
def test_a_busy_pool_fails_within_its_timeout_naming_the_pool_and_its_holder(job, tiny_model_dir, tmp_path):
    flags = _flags(job, tiny_model_dir, tmp_path)
    run = subprocess.run([sys.executable, "-c", SCRIPT, *flags], capture_output=True, text=True, timeout=240,
                         cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    status, seconds = (float(part.split("=")[1]) for part in run.stdout.strip().splitlines()[-1].split())
    assert status == 2, out
    assert 3 <= seconds < 30, out                  # waited for the timeout, not the old fixed 120 s
    message = [line for line in run.stderr.splitlines() if line.startswith(f"rlhf-ray {job}:")]
    assert message and "not free within 3s" in message[0], out
    print(message[0])
    assert "pool 'busy' (1 node(s)) has CPU=0, GPU=0 free of CPU=2, GPU=0" in message[0], out
    assert "'holder' (job 01000000) CPU=2" in message[0], out
    assert "--placement_timeout_s" in message[0], out
    assert "Traceback" not in out, out
