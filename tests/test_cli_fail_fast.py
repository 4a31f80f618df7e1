"""Every training job refuses a GPU-only --plugin on a CPU-only layout before Ray starts: `rlhf-ray <job>` in a
subprocess exits 2 within seconds with one message naming the flag, the value and the CPU alternative, and no
traceback (the ranks used to find out after the actors started, wrapped in a RayTaskError)."""

import os
import subprocess
import sys
import time

import pytest

# One GPU-only plugin per job, so that every job and every plugin is run once.
CASES = [("sft", "zero2", "fsdp"), ("rm", "zero2_cpu", "fsdp_cpu"), ("dpo", "gemini", "fsdp"),
         ("ppo", "gemini_auto", "fsdp_cpu"), ("grpo", "zero2", "fsdp")]


@pytest.mark.parametrize("job, plugin, alternative", CASES, ids=[f"{job}-{plugin}" for job, plugin, _ in CASES])
def test_gpu_only_plugin_is_refused_before_ray_starts(job, plugin, alternative, tmp_path):
    data_flag = "--prompt_dataset" if job in ("ppo", "grpo") else "--dataset"
    command = [sys.executable, "-m", "rlhf_ray.cli", job, "--plugin", plugin, "--pretrain", str(tmp_path / "model"),
               data_flag, str(tmp_path / "data")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    done = subprocess.run(command, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--plugin {plugin} is ColossalAI's" in done.stderr and "--gpus_per_worker is 0" in done.stderr
    assert f"Use the torch-native --plugin {alternative} instead" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    output = done.stdout + done.stderr
    assert "Ray instance" not in output and "Ray cluster" not in output     # Ray was neither started nor joined
    assert elapsed < 8.0, f"refused after {elapsed:.1f}s; starting Ray alone takes ~10s"


def test_the_critic_is_checked_against_its_own_gpus(monkeypatch):
    """PPO's critic shares the policy's --plugin but reserves --critic_gpus_per_worker: checked too, named so."""
    from rlhf_ray.config.base import ConfigError, parse_config
    from rlhf_ray.engines import plugins
    from rlhf_ray.pipelines.rl.config import PPOConfig
    from rlhf_ray.pipelines.rl.run import _check_engines

    monkeypatch.setattr(plugins, "colossalai_installed", lambda: True)     # absent here; the GPU rule is tested
    argv = ["--plugin", "zero2", "--gpus_per_worker", "1"]
    with pytest.raises(ConfigError, match=r"^the critic: --plugin zero2 .* and --critic_gpus_per_worker is 0\. "
                                          r"Use the torch-native --plugin fsdp instead"):
        _check_engines(parse_config(PPOConfig, argv, "rlhf-ray ppo"))
    _check_engines(parse_config(PPOConfig, argv + ["--critic_gpus_per_worker", "1"], "rlhf-ray ppo"))
