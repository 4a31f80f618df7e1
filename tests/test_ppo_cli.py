"""`rlhf-ray ppo` as a user types it (a subprocess with CLI flags, its own local Ray cluster), with a reward model
trained by `rlhf-ray rm`:

  1. data: bundled arithmetic prompts, and preference pairs in which the chosen response has more number tokens
     (tests/rl_data.py), both through `rlhf-ray prepare`;
  2. `rlhf-ray rm` trains the 'debug' tiny Llama as a reward model on them (in-process, the session's Ray);
  3. `rlhf-ray ppo`, from a randomly initialised policy: 2 policy ranks (DDP), a critic initialised from the
     reward model, separate reference and reward-model groups, 2 vLLM engines, async mode (max_staleness 1),
     12 episodes with a checkpoint every 4. The reward model's score rises (measured, train seed 42: episodes 1-2
     about -1.2, episodes 11-12 about 1.2); the test asks for +1.0 between the first two and the last two;
  4. the same command with --checkpoint_path and --num_episodes 14 resumes at episode 12 and runs two more.

Resources: the job starts its own Ray with the machine's CPUs (2 here), so the roles ask for fractions of a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from rl_data import TEMPLATE, prepare_number_preferences, prepare_prompts  # noqa: E402

from rlhf_ray.telemetry.tracker import read_jsonl_metrics  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

EPISODES = 12


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir, ray_cluster):
    from rlhf_ray.pipelines import rm

    root = tmp_path_factory.mktemp("ppo-cli")
    prepare_prompts(tiny_model_dir, root / "prompts")
    preferences = prepare_number_preferences(tiny_model_dir, root / "preferences")
    assert rm.main(["--pretrain", str(tiny_model_dir), "--dataset", str(preferences), "--batch_size", "16",
                    "--lr", "2e-3", "--warmup_steps", "0", "--max_epochs", "2", "--max_len", "64",
                    "--save_path", str(root / "rm"), "--tensorboard", "false",
                    "--log_dir", str(root / "rm-log")]) == 0
    accuracy = [row["rm/acc"] for row in read_jsonl_metrics(root / "rm-log" / "metrics.jsonl") if "rm/acc" in row]
    assert sum(accuracy[-8:]) / 8 >= 0.7, f"the reward model did not learn the preference: {accuracy[-8:]}"
    return root


def ppo_command(root, tiny_model_dir, episodes: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_ray.cli", "ppo",
            "--pretrain", str(tiny_model_dir), "--rm_checkpoint_path", str(root / "rm"),
            "--prompt_dataset", str(root / "prompts"), "--conversation_template_config", TEMPLATE,
            "--num_episodes", str(episodes), "--num_collect_steps", "1", "--num_update_steps", "2",
            "--experience_batch_size", "16", "--train_batch_size", "8", "--accumulation_steps", "2",
            "--num_workers", "2", "--plugin", "ddp", "--lr", "5e-3", "--critic_lr", "5e-3", "--warmup_steps", "0",
            "--kl_coef", "0.001", "--kl_ctrl_type", "adaptive", "--target_kl", "1.0", "--kl_horizon", "1000",
            "--dual_clip", "3.0", "--max_new_tokens", "4", "--max_prompt_len", "32",
            "--num_engines", "2", "--kv_cache_gib", "0.25", "--async_mode", "--max_staleness", "1",
            "--cpus_per_worker", "0.25", "--critic_cpus_per_worker", "0.25", "--ref_cpus_per_worker", "0.25",
            "--reward_cpus_per_worker", "0.25", "--cpus_per_engine", "0.25",
            "--save_path", str(root / "policy"), "--save_interval", "4",
            "--log_dir", str(root / "log"), "--tensorboard", "false", *extra]


def run_ppo(command: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RLHF_RAY_NO_PROGRESS="1", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def trained(workdir, tiny_model_dir) -> subprocess.CompletedProcess:
    """The 12-episode run and its checkpoints: a fixture, so that the resume test runs it when it runs alone."""
    return run_ppo(ppo_command(workdir, tiny_model_dir, EPISODES))


def test_ppo_cli_learns_from_a_trained_reward_model_and_checkpoints(workdir, trained):
    result = trained
    assert ("experience buffer = dp (2) × num_collect_steps (1) × experience_batch_size (16) = 32 samples"
            in result.stdout)
    rows = read_jsonl_metrics(workdir / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, EPISODES + 1))
    rewards = [row["reward/mean"] for row in rows]
    before, after = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    print(f"PPO reward-model score: before {before:.3f}, after {after:.3f}, seed 42")
    assert after - before >= 1.0
    # async mode: experience is at most max_staleness = 1 policy versions old, and generation did overlap
    assert max(row["rollout/staleness_max"] for row in rows) == 1
    assert rows[0]["rollout/staleness_max"] == 0
    for key in ("loss/policy", "loss/value", "value/explained_variance", "policy/clip_frac", "reward/kl",
                "critic/grad_norm", "policy/grad_norm", "timing/generate", "timing/update", "timing/weight_sync",
                "weight_sync/bytes", "timing/startup"):
        assert key in rows[0] or key in rows[-1], key
    # the adaptive controller moved the KL coefficient, and the checkpoint keeps where it stood
    assert rows[-1]["reward/kl_coef"] != 0.001
    directory = workdir / "policy-checkpoints"
    saved = json.loads((directory / "step_12" / "rl_state.json").read_text())
    assert saved["kl_coef"] == pytest.approx(rows[-1]["reward/kl_coef"])
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith("step_")) == ["step_12", "step_4",
                                                                                         "step_8"]
    for name in ("policy", "critic"):
        assert (directory / "step_12" / name / "COMPLETE").is_file()
    assert (workdir / "policy" / "config.json").is_file() and (workdir / "policy-critic" / "config.json").is_file()


def test_ppo_cli_resumes_from_its_checkpoint(workdir, tiny_model_dir, trained):
    directory = workdir / "policy-checkpoints"
    assert (directory / "step_12" / "COMPLETE").is_file()
    result = run_ppo(ppo_command(workdir, tiny_model_dir, EPISODES + 2, "--checkpoint_path", str(directory)))
    assert f"resumed from {directory / 'step_12'}: episode 12, policy version 12" in result.stdout
    rows = read_jsonl_metrics(workdir / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows][-2:] == [13, 14]
    assert rows[-1]["rl/policy_version"] == 14
    state = json.loads((directory / "step_14" / "rl_state.json").read_text())
    assert state["episode"] == 14 and state["policy_version"] == 14
