"""An injected sampler/trainer mismatch in a real GRPO run: the off-policy correction reacts as its formulas say, and
learning still rises. Real local Ray, the real vLLM CPU engine, the 'debug' tiny Llama, the demo's arithmetic task.

The mismatch: --sampler_weight_noise_std 0.05 adds seeded N(0, 0.05^2) noise to every weight the vLLM engine loads
(at start and at each weight sync), so the sampler's log-probs differ from the trainer's. The correction:
--rollout_is token (weights min(rho, 2)) with --rollout_rs token (IcePop: tokens whose rho = pi_old / pi_sampler
leaves [0.5, 2] leave the loss). A 2-episode run without the noise first: there the two agree to < 1e-3, every
weight is ~1 and nothing is masked.

Measured (sync mode, train seed 42, 20 episodes): log-prob gap ~0.44 nats, ~21% of tokens masked, reward
0.10 -> 0.75 (last 3 episodes); the same run without noise reaches 0.92.
"""

from __future__ import annotations

import pytest

from rl_data import REWARD_FN, TEMPLATE, prepare_prompts

from rlhf_ray.telemetry.tracker import read_jsonl_metrics

CAP = 2.0          # --rollout_is_threshold and --rollout_rs_threshold (band [1/2, 2])


def test_weight_noise_is_seeded_gaussian_and_leaves_integer_tensors_alone():
    import torch

    from rlhf_ray.rollout.vllm_extension import add_weight_noise

    weight = torch.zeros(200, 300)
    first = add_weight_noise(weight, 0.05, torch.Generator().manual_seed(3))
    again = add_weight_noise(weight, 0.05, torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and torch.equal(weight, torch.zeros(200, 300))      # a new tensor, same draw
    assert abs(first.std().item() - 0.05) < 0.002 and abs(first.mean().item()) < 0.002
    half = add_weight_noise(weight.bfloat16(), 0.05, torch.Generator().manual_seed(3))
    assert half.dtype == torch.bfloat16
    ids = torch.arange(6)
    assert add_weight_noise(ids, 0.05, torch.Generator().manual_seed(3)) is ids


def test_weight_noise_needs_the_vllm_backend():
    from rlhf_ray.config.base import ConfigError
    from rlhf_ray.rollout.config import GeneratorSection

    with pytest.raises((ValueError, ConfigError), match="sampler_weight_noise_std"):
        GeneratorSection.model_validate({"backend": "hf", "sampler_weight_noise_std": 0.05})
    assert GeneratorSection.model_validate({"sampler_weight_noise_std": 0.05}).sampler_weight_noise_std == 0.05


def run_grpo(model_dir, prompts, out, episodes: int, *extra: str) -> list[dict]:
    """The demo's GRPO stage with TIS + IcePop on; returns the metrics rows, one per episode."""
    pytest.importorskip("vllm")
    from rlhf_ray.pipelines import grpo

    status = grpo.main([
        "--pretrain", str(model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
        "--conversation_template_config", TEMPLATE, "--colocate_all",
        "--n_samples_per_prompt", "8", "--max_new_tokens", "4", "--max_prompt_len", "32", "--kv_cache_gib", "0.25",
        "--num_episodes", str(episodes), "--experience_batch_size", "4", "--train_batch_size", "16",
        "--accumulation_steps", "2", "--num_update_steps", "2", "--lr", "5e-3", "--warmup_steps", "0",
        "--kl_coef", "0.001", "--seed", "42", "--rollout_is", "token", "--rollout_is_threshold", str(CAP),
        "--rollout_rs", "token", "--rollout_rs_threshold", str(CAP), "--save_path", str(out / "policy"),
        "--log_dir", str(out / "log"), "--tensorboard", "false", "--progress", "false", *extra])
    assert status == 0
    rows = read_jsonl_metrics(out / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, episodes + 1))
    return rows


@pytest.mark.ray
@pytest.mark.vllm
def test_injected_mismatch_moves_the_weights_and_masks_and_grpo_still_learns(ray_cluster, tiny_model_dir, tmp_path):
    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts")
    # without the noise: same weights on both sides, every weight ~1 and nothing masked
    for row in run_grpo(tiny_model_dir, prompts, tmp_path / "clean", 2):
        assert row["rollout_corr/logprob_gap"] < 1e-3
        assert abs(row["rollout_corr/is_weight_max"] - 1) < 1e-2 and row["rollout_corr/masked_token_frac"] == 0

    episodes = 15
    rows = run_grpo(tiny_model_dir, prompts, tmp_path / "noisy", episodes, "--sampler_weight_noise_std", "0.05")
    for row in rows:
        # the injected noise shows as a gap between the sampler's and the trainer's log-probs of the same tokens
        assert row["rollout_corr/logprob_gap"] > 0.05, row
        assert row["rollout_corr/kl"] > 0
        # weights are min(rho, C) on the tokens kept in [1/C, C]: inside the band, never above the cap
        assert 1 / CAP <= row["rollout_corr/is_weight_mean"] <= CAP
        assert 1 / CAP <= row["rollout_corr/is_weight_max"] <= CAP + 1e-6
        # a token whose rho exceeds C is truncated by the weight and also leaves the band: masked >= truncated
        assert row["rollout_corr/masked_token_frac"] >= row["rollout_corr/is_truncated_frac"] - 1e-9
        assert row["rollout/staleness_max"] == 0                       # sync mode: the gap is the noise alone
    # the masks act: some tokens leave the loss, and some leave it from below the band (rho < 1/C, not truncated)
    assert sum(row["rollout_corr/masked_token_frac"] for row in rows) / episodes > 0.02
    assert any(row["rollout_corr/masked_token_frac"] > row["rollout_corr/is_truncated_frac"] for row in rows)
    assert any(row["rollout_corr/is_truncated_frac"] > 0 for row in rows)

    rewards = [row["reward/mean"] for row in rows]
    before, after = rewards[0], sum(rewards[-3:]) / 3
    print(f"GRPO with sampler weight noise 0.05 and TIS + IcePop: reward {before:.3f} -> {after:.3f} (last 3), "
          f"gap {sum(row['rollout_corr/logprob_gap'] for row in rows) / episodes:.3f} nats")
    assert before < 0.3
    assert after - before >= 0.2
