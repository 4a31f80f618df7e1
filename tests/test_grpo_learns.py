"""GRPO learns a verifiable task from scratch: real local Ray, the real vLLM CPU engine, the 'debug' tiny Llama.

Task: the bundled arithmetic prompts ("What is 3 + 5?"); the rule reward `rlhf_ray/assets/rewards/number_only.py`
(loaded through --reward_fn, the rule-reward path) is the share of the response's characters that are digits.
A randomly initialised model (model seed 0) answers with random tokens: mean reward ~0.12 in the first episode.
With train seed 42, 8 samples per prompt and lr 5e-3 it answers in digits only after ~15 episodes (measured:
episode 1: 0.126, episode 10: 0.51, episodes 18-20: 1.0). The test asks for the last three episodes' mean >= 0.7.

`rlhf-ray grpo` runs in-process (main(argv), the flags a user types) on the session's Ray cluster.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from rl_data import REWARD_FN, TEMPLATE, prepare_prompts, prepare_ptx  # noqa: E402

from rlhf_ray.telemetry.tracker import read_jsonl_metrics  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_grpo_raises_a_verifiable_reward_from_scratch(ray_cluster, tiny_model_dir, tmp_path):
    from rlhf_ray.pipelines import grpo

    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts")
    ptx = prepare_ptx(tiny_model_dir, tmp_path / "ptx")
    episodes = 20
    status = grpo.main([
        "--pretrain", str(tiny_model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
        "--conversation_template_config", TEMPLATE, "--colocate_policy_reference",
        "--pretrain_dataset", str(ptx), "--ptx_coef", "0.01", "--ptx_batch_size", "2",
        "--n_samples_per_prompt", "8", "--max_new_tokens", "4", "--max_prompt_len", "32", "--kv_cache_gib", "0.25",
        "--num_episodes", str(episodes), "--experience_batch_size", "4", "--train_batch_size", "16",
        "--accumulation_steps", "2", "--num_update_steps", "2", "--lr", "5e-3", "--warmup_steps", "0",
        "--kl_coef", "0.001", "--save_path", str(tmp_path / "policy"), "--save_interval", "10",
        "--log_dir", str(tmp_path / "log"), "--tensorboard", "false"])
    assert status == 0

    rows = read_jsonl_metrics(tmp_path / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, episodes + 1))
    rewards = [row["reward/mean"] for row in rows]
    before, after = rewards[0], sum(rewards[-3:]) / 3
    print(f"GRPO number-only reward: before {before:.3f}, after {after:.3f} (last 3 episodes), seed 42")
    assert before < 0.3
    assert after >= 0.7 and after - before >= 0.4
    # the sampler's and the trainer's log-probs of the same tokens agree (same weights, same temperature)
    assert max(row["rollout/logprob_gap_mean"] for row in rows) < 1e-3
    assert all(row["rollout/staleness_max"] == 0 for row in rows)           # sync mode: always on-policy
    assert rows[-1]["rl/policy_version"] == episodes
    for key in ("loss/policy", "loss/kl", "policy/clip_frac", "policy/entropy", "advantages/std", "returns/mean",
                "rollout/response_len_mean", "timing/generate", "timing/score", "timing/advantage", "timing/update",
                "timing/weight_sync", "reward/rule/all_digits", "loss/ptx"):
        assert key in rows[-1], key
    assert any(row["policy/clip_frac"] > 0 for row in rows)                  # the second update step clips

    checkpoints = sorted(p.name for p in (tmp_path / "policy-checkpoints").iterdir() if p.name.startswith("step_"))
    assert checkpoints == ["step_10", "step_20"]
    state = json.loads((tmp_path / "policy-checkpoints" / "step_20" / "rl_state.json").read_text())
    assert state["episode"] == episodes and state["policy_version"] == episodes
    assert (tmp_path / "policy" / "config.json").is_file()


def test_grpo_async_with_dapo_and_off_policy_correction_runs_end_to_end(ray_cluster, tiny_model_dir, tmp_path):
    """The wiring of DAPO's dynamic sampling and overlong handling and of the off-policy correction (on by default in
    async mode) through the controller and the trainer ranks: a short async run whose metrics carry each piece."""
    from rlhf_ray.pipelines import grpo

    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts")
    episodes = 3
    status = grpo.main([
        "--pretrain", str(tiny_model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
        "--conversation_template_config", TEMPLATE, "--colocate_policy_reference",
        "--n_samples_per_prompt", "4", "--max_new_tokens", "4", "--max_prompt_len", "32", "--kv_cache_gib", "0.25",
        "--num_episodes", str(episodes), "--experience_batch_size", "4", "--train_batch_size", "8",
        "--accumulation_steps", "2", "--lr", "5e-3", "--warmup_steps", "0", "--kl_coef", "0.001",
        "--async_mode", "--max_staleness", "1", "--rollout_rs", "token", "--rollout_rs_threshold", "5",
        "--filter_groups", "true", "--max_num_gen_batches", "3", "--overlong_filter", "true",
        "--overlong_buffer_len", "2", "--loss_agg_mode", "seq-mean-token-sum-norm", "--policy_loss", "cispo",
        "--clip_ratio_low", "0.99", "--clip_ratio_high", "4",
        "--save_path", str(tmp_path / "policy"), "--log_dir", str(tmp_path / "log"), "--tensorboard", "false"])
    assert status == 0
    rows = read_jsonl_metrics(tmp_path / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, episodes + 1))
    for row in rows:
        assert 1 <= row["dynamic_sampling/rounds"] <= 3
        assert row["dynamic_sampling/groups_kept"] + row["dynamic_sampling/padded_groups"] == 4
        assert 0 <= row["rollout/overlong_filtered_frac"] <= 1 and row["reward/overlong_penalty_mean"] <= 0
        # async: the proximal policy (recomputed at the update) against the sampler's log-probs, one version older
        assert row["rollout_corr/is_weight_max"] <= 2.0 + 1e-6 and 0 <= row["rollout_corr/masked_token_frac"] <= 1
        assert row["rollout_corr/logprob_gap"] >= 0
    assert rows[0]["rollout_corr/logprob_gap"] < 1e-3      # episode 0 trains on samples of the same weights
