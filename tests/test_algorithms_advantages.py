"""Every advantage estimator against an independent per-row python loop (ragged masks with holes, uneven groups),
and reward shaping against a loop."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlhf_ray.algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from rlhf_ray.algorithms.shaping import compute_token_level_rewards, last_token_index
from test_algorithms_masking import ragged_mask

GAMMA, LAM, EPS = 0.97, 0.9, 1e-6


def kept_positions(mask_row):
    return [t for t, m in enumerate(mask_row) if m]


def loop_whiten(rows, mask):
    kept = [rows[b][t] for b in range(len(rows)) for t in kept_positions(mask[b])]
    mean, var = statistics.fmean(kept), statistics.variance(kept)
    return [[(rows[b][t] - mean) / math.sqrt(var + 1e-8) if mask[b][t] else 0.0 for t in range(len(rows[b]))]
            for b in range(len(rows))]


def loop_scores(rewards, mask):
    return [sum(rewards[b][t] for t in kept_positions(mask[b])) for b in range(len(rewards))]


def loop_groups(group_ids):
    groups: dict[int, list[int]] = {}
    for index, gid in enumerate(group_ids):
        groups.setdefault(gid, []).append(index)
    return groups


def broadcast(per_sequence, mask):
    return [[per_sequence[b] if m else 0.0 for m in mask[b]] for b in range(len(mask))]


def ref_gae(rewards, mask, values, group_ids, norm_by_std):
    advantages = [[0.0] * len(row) for row in rewards]
    returns = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        next_value = next_advantage = 0.0
        for t in reversed(kept_positions(mask[b])):
            delta = rewards[b][t] + GAMMA * next_value - values[b][t]
            next_advantage = delta + GAMMA * LAM * next_advantage
            next_value = values[b][t]
            advantages[b][t] = next_advantage
            returns[b][t] = next_advantage + values[b][t]
    return (loop_whiten(advantages, mask) if norm_by_std else advantages), returns


def ref_grpo(rewards, mask, values, group_ids, norm_by_std):
    scores = loop_scores(rewards, mask)
    per_sequence = [0.0] * len(scores)
    for members in loop_groups(group_ids).values():
        if len(members) < 2:
            continue
        group = [scores[i] for i in members]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        for i in members:
            per_sequence[i] = (scores[i] - mean) / (std + EPS) if norm_by_std else scores[i] - mean
    advantages = broadcast(per_sequence, mask)
    return advantages, advantages


def ref_grpo_no_std(rewards, mask, values, group_ids, norm_by_std):
    return ref_grpo(rewards, mask, values, group_ids, norm_by_std=False)


def ref_rloo(rewards, mask, values, group_ids, norm_by_std):
    scores = loop_scores(rewards, mask)
    per_sequence = [0.0] * len(scores)
    for members in loop_groups(group_ids).values():
        if len(members) < 2:
            continue
        for i in members:
            others = [scores[j] for j in members if j != i]
            per_sequence[i] = scores[i] - sum(others) / len(others)
    advantages = broadcast(per_sequence, mask)
    return advantages, advantages


def ref_reinforce_plus_plus(rewards, mask, values, group_ids, norm_by_std):
    returns = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        running = 0.0
        for t in reversed(kept_positions(mask[b])):
            running = rewards[b][t] + GAMMA * running
            returns[b][t] = running
    if norm_by_std:
        return loop_whiten(returns, mask), returns
    kept = [returns[b][t] for b in range(len(returns)) for t in kept_positions(mask[b])]
    mean = statistics.fmean(kept)
    return [[returns[b][t] - mean if mask[b][t] else 0.0 for t in range(len(mask[b]))]
            for b in range(len(mask))], returns


def ref_reinforce_plus_plus_baseline(rewards, mask, values, group_ids, norm_by_std):
    scores = loop_scores(rewards, mask)
    per_sequence = [0.0] * len(scores)
    for members in loop_groups(group_ids).values():
        if len(members) < 2:
            continue
        mean = statistics.fmean(scores[i] for i in members)
        for i in members:
            per_sequence[i] = scores[i] - mean
    advantages = broadcast(per_sequence, mask)
    if norm_by_std:
        advantages = loop_whiten(advantages, mask)
    return advantages, advantages


REFERENCES = {
    "gae": ref_gae,
    "grpo": ref_grpo,
    "grpo_no_std": ref_grpo_no_std,
    "rloo": ref_rloo,
    "reinforce_plus_plus": ref_reinforce_plus_plus,
    "reinforce_plus_plus_baseline": ref_reinforce_plus_plus_baseline,
}


@pytest.fixture
def rollout():
    generator = torch.Generator().manual_seed(11)
    batch, length = 12, 9
    rewards = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    values = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    mask = ragged_mask(batch, length, generator)
    # Uneven, shuffled groups; id 7 is a single response (no baseline).
    group_ids = torch.tensor([3, 0, 3, 0, 5, 0, 5, 3, 5, 0, 7, 5])
    return rewards, values, mask, group_ids


def test_every_registered_estimator_has_a_reference():
    assert set(ADVANTAGE_ESTIMATORS.names()) == set(REFERENCES), "add a loop reference for the new estimator"


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_estimator_matches_loop(rollout, name, norm_by_std):
    rewards, values, mask, group_ids = rollout
    advantages, returns = compute_advantages(name, rewards, mask, values=values, group_ids=group_ids, gamma=GAMMA,
                                             lam=LAM, norm_by_std=norm_by_std, eps=EPS)
    expected_advantages, expected_returns = REFERENCES[name](rewards.tolist(), mask.tolist(), values.tolist(),
                                                             group_ids.tolist(), norm_by_std)
    assert advantages.shape == returns.shape == rewards.shape
    assert torch.allclose(advantages, torch.tensor(expected_advantages, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.allclose(returns, torch.tensor(expected_returns, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)


def test_group_estimators_are_invariant_to_batch_order(rollout):
    rewards, values, mask, group_ids = rollout
    permutation = torch.randperm(rewards.shape[0], generator=torch.Generator().manual_seed(0))
    for name in ("grpo", "rloo", "reinforce_plus_plus_baseline"):
        advantages, _ = compute_advantages(name, rewards, mask, group_ids=group_ids)
        permuted, _ = compute_advantages(name, rewards[permutation], mask[permutation],
                                         group_ids=group_ids[permutation])
        assert torch.allclose(permuted, advantages[permutation], atol=1e-12)


def test_gae_with_gamma_lambda_one_is_return_minus_value():
    """Hand-derived: gamma = lam = 1 makes A_t = sum_{k>=t} r_k - V_t (the Monte-Carlo advantage)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    advantages, returns = compute_advantages("gae", rewards, mask, values=values, gamma=1.0, lam=1.0,
                                             norm_by_std=False)
    assert advantages.tolist() == [[0.5, 0.75, 0.25, 0.0]]
    assert returns.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_estimators_name_what_they_miss(rollout):
    rewards, values, mask, group_ids = rollout
    with pytest.raises(ValueError, match="needs critic values"):
        compute_advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="n_samples_per_prompt > 1"):
        compute_advantages("grpo", rewards, mask)
    with pytest.raises(ValueError, match="known: gae, grpo"):
        compute_advantages("ppo", rewards, mask)


def loop_token_level_rewards(scores, mask, kl, kl_coef):
    rewards = []
    for b in range(len(mask)):
        row = [-kl_coef * kl[b][t] if mask[b][t] else 0.0 for t in range(len(mask[b]))]
        kept = kept_positions(mask[b])
        if kept:
            row[kept[-1]] += scores[b]
        rewards.append(row)
    return rewards


def test_token_level_rewards_match_loop(rollout):
    _, _, mask, _ = rollout
    generator = torch.Generator().manual_seed(12)
    scores = torch.randn(mask.shape[0], generator=generator, dtype=torch.float64)
    kl = torch.rand(mask.shape, generator=generator, dtype=torch.float64)
    rewards, metrics = compute_token_level_rewards(scores, mask, kl=kl, kl_coef=0.05)
    expected = loop_token_level_rewards(scores.tolist(), mask.tolist(), kl.tolist(), 0.05)
    assert torch.allclose(rewards, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    kept_rows = [b for b in range(len(mask)) if kept_positions(mask[b].tolist())]
    assert metrics["reward/kl_sum"] == pytest.approx(
        statistics.fmean(sum(kl[b][t].item() for t in kept_positions(mask[b].tolist())) for b in range(len(mask))))
    assert last_token_index(mask).tolist() == [kept_positions(mask[b].tolist())[-1] if b in kept_rows else -1
                                               for b in range(len(mask))]

    without_kl, metrics = compute_token_level_rewards(scores, mask)
    assert without_kl.sum().item() == pytest.approx(scores[kept_rows].sum().item())
    assert "reward/kl" not in metrics
