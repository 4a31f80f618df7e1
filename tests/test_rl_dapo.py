"""DAPO's pieces without Ray: the soft overlong punishment and overlong filtering in finalize_experience, and dynamic
sampling (fill_informative_groups): no zero-variance group reaches the loss and the batch arithmetic holds."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf_ray.algorithms.shaping import compute_overlong_penalty
from rlhf_ray.config.base import ConfigError, parse_config
from rlhf_ray.pipelines.rl.config import GRPOConfig, PPOConfig, check_rl_config
from rlhf_ray.pipelines.rl.experience import (AdvantageSettings, build_experience, fill_informative_groups,
                                              finalize_experience)
from rlhf_ray.rollout.types import PromptRollout, Sample

N = 4          # samples per prompt
PROMPTS = 6    # groups per collect step


def test_overlong_penalty_matches_the_formula():
    lengths = torch.arange(0, 25)
    penalty = compute_overlong_penalty(lengths, max_response_len=20, buffer_len=8, penalty_factor=0.5)
    for length, value in zip(lengths.tolist(), penalty.tolist()):
        expected = 0.0 if length <= 12 else (0.5 * (12 - length) / 8 if length <= 20 else -0.5)
        assert value == pytest.approx(expected, abs=1e-7)
    with pytest.raises(ValueError, match="overlong_buffer_len must be in"):
        compute_overlong_penalty(lengths, 20, 21)


def _round(rng: random.Random, refill: int, prompts: int = PROMPTS, equal_share: float = 0.5, max_new: int = 6):
    """One generated and scored round: `prompts` groups of N samples, about `equal_share` of them with equal scores;
    group ids offset by the round as the controller does."""
    rollouts, scores = [], []
    for prompt in range(prompts):
        samples = []
        for _ in range(N):
            length = rng.randint(1, max_new)
            samples.append(Sample([rng.randint(3, 30) for _ in range(length)], "", [-1.0] * length,
                                  "length" if length == max_new else "stop"))
        rollouts.append(PromptRollout(prompt, [1, 2, prompt + 3], False, samples, policy_version=0, engine_rank=0))
        equal = rng.random() < equal_share
        scores += [float(rng.randint(0, 1))] * N if equal else [float(rng.randint(0, 1)) for _ in range(N - 1)] + [0.5]
    experience = build_experience(rollouts, 0, group_offset=refill * prompts)
    experience.scores = torch.tensor(scores)
    return experience


def _zero_variance_groups_with_tokens(experience) -> list[int]:
    out = []
    for group in set(experience.group_ids.tolist()):
        rows = experience.group_ids == group
        if experience.scores[rows].unique().numel() == 1 and experience.response_mask[rows].any():
            out.append(group)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_sampling_keeps_only_informative_groups_and_the_batch_size(seed):
    rng = random.Random(seed)
    rounds = []

    def make_batch(refill):
        rounds.append(_round(rng, refill))
        return rounds[-1]

    experience, metrics = fill_informative_groups(make_batch, PROMPTS, max_rounds=10, pad_token_id=0)
    assert experience.batch_size == PROMPTS * N                             # the buffer arithmetic holds exactly
    assert len(set(experience.group_ids.tolist())) == PROMPTS
    assert all((experience.group_ids == g).sum() == N for g in set(experience.group_ids.tolist()))
    assert _zero_variance_groups_with_tokens(experience) == []
    assert metrics["dynamic_sampling/padded_groups"] == 0 and metrics["dynamic_sampling/groups_kept"] == PROMPTS
    generated_equal = sum(len(_zero_variance_groups_with_tokens(r)) for r in rounds)
    assert metrics["dynamic_sampling/groups_dropped"] == generated_equal > 0
    assert metrics["dynamic_sampling/rounds"] == len(rounds) > 1
    assert metrics["dynamic_sampling/extra_prompts"] == PROMPTS * (len(rounds) - 1)
    # Through the advantages: every group that trains has a signal.
    finalized, _ = finalize_experience(experience, AdvantageSettings(advantage_estimator="grpo", kl_mode="loss"), 0)
    for group in set(finalized.group_ids.tolist()):
        rows = finalized.group_ids == group
        assert finalized.advantages[rows][finalized.response_mask[rows].bool()].abs().sum() > 0


def test_dynamic_sampling_out_of_rounds_pads_with_masked_groups():
    rng = random.Random(7)
    experience, metrics = fill_informative_groups(lambda refill: _round(rng, refill, equal_share=0.9), PROMPTS,
                                                  max_rounds=1, pad_token_id=0)
    padded = int(metrics["dynamic_sampling/padded_groups"])
    assert padded > 0 and metrics["dynamic_sampling/rounds"] == 1 and metrics["dynamic_sampling/extra_prompts"] == 0
    assert experience.batch_size == PROMPTS * N and len(set(experience.group_ids.tolist())) == PROMPTS
    assert _zero_variance_groups_with_tokens(experience) == []
    assert int((experience.response_mask.sum(-1) == 0).sum()) >= padded * N


def test_overlong_punishment_and_filtering_in_finalize():
    rng = random.Random(3)
    experience = _round(rng, 0, max_new=6)
    lengths = experience.response_mask.sum(-1)
    truncated = experience.extras["truncated"]
    assert truncated.tolist() == (lengths == 6).tolist() and truncated.any()
    settings = AdvantageSettings(advantage_estimator="grpo", kl_mode="loss", overlong_buffer_len=3,
                                 overlong_penalty_factor=1.0, overlong_filter=True, max_response_len=6)
    plain, _ = finalize_experience(_round(random.Random(3), 0, max_new=6),
                                   AdvantageSettings(advantage_estimator="grpo", kl_mode="loss"), 0)
    shaped, metrics = finalize_experience(experience, settings, 0)
    penalty = compute_overlong_penalty(lengths, 6, 3)
    assert torch.allclose(shaped.rewards[~truncated].sum(-1), (experience.scores + penalty)[~truncated])
    assert shaped.response_mask[truncated].sum() == 0 and shaped.advantages[truncated].abs().sum() == 0
    assert metrics["rollout/overlong_filtered_frac"] == pytest.approx(truncated.float().mean().item())
    assert metrics["reward/overlong_penalized_frac"] == pytest.approx((lengths > 3).float().mean().item())
    assert not torch.equal(plain.advantages[~truncated], shaped.advantages[~truncated])


@pytest.mark.parametrize("cls, flags, message", [
    (PPOConfig, ["--filter_groups", "true"], "--filter_groups drops groups of equal rewards"),
    (GRPOConfig, ["--overlong_buffer_len", "300", "--max_new_tokens", "256"], "exceeds --max_new_tokens 256"),
])
def test_dapo_settings_are_checked(tiny_model_dir, cls, flags, message):
    per_rank = "2" if cls is GRPOConfig else "8"                  # 8 samples per rank either way
    cfg = parse_config(cls, ["--pretrain", str(tiny_model_dir), "--prompt_dataset", "d", "--reward_source", "gsm8k",
                             "--experience_batch_size", per_rank, "--train_batch_size", "8",
                             "--accumulation_steps", "1", *flags], "test")
    with pytest.raises(ConfigError, match=message):
        check_rl_config(cfg, "grpo" if cls is GRPOConfig else "ppo")
