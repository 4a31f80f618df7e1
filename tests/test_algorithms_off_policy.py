"""Off-policy / sampler-mismatch correction (algorithms/off_policy.py) against per-token python loops, with an
injected mismatch (perturbed sampler log-probs): truncated IS weights, IcePop token masks, sequence masks, the
metrics, and the loss they feed. With no mismatch the loss is exactly the uncorrected one."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.masking import LossAggregation
from rlhf_ray.algorithms.off_policy import RolloutCorrectionParams, compute_rollout_correction
from rlhf_ray.algorithms.policy_loss import POLICY_LOSSES, compute_policy_loss
from test_algorithms_losses import loop_ppo_token_loss, rollout_tensors
from test_algorithms_masking import loop_aggregate, ragged_mask


def mismatched(seed: int, batch: int = 9, length: int = 7, scale: float = 0.8):
    """Trainer (old) log-probs and sampler log-probs perturbed by up to ±scale nats per token."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 3
    sampler = old + (torch.rand(batch, length, generator=generator, dtype=torch.float64) - 0.5) * 2 * scale
    return old, sampler, ragged_mask(batch, length, generator)


def loop_correction(old, sampler, mask, params: RolloutCorrectionParams):
    """(weights, kept mask) as nested lists, from the formulas, one token at a time."""
    lower, upper = params.rollout_rs_threshold_lower or 1 / params.rollout_rs_threshold, params.rollout_rs_threshold
    weights, kept = [], []
    for o_row, s_row, m_row in zip(old, sampler, mask):
        logs = [o - s for o, s, m in zip(o_row, s_row, m_row) if m]
        seq_ratio = math.exp(sum(logs))
        geo_ratio = math.exp(sum(logs) / len(logs)) if logs else 1.0
        w_row, k_row = [], []
        for o, s, m in zip(o_row, s_row, m_row):
            token_ratio = math.exp(o - s)
            ratio = {"token": token_ratio, "sequence": seq_ratio, None: 1.0}[params.rollout_is]
            rho = {"token": token_ratio, "sequence": seq_ratio, "geometric": geo_ratio, None: 1.0}[params.rollout_rs]
            keep = bool(m) and lower <= rho <= upper
            k_row.append(1.0 if keep else 0.0)
            w_row.append(min(ratio, params.rollout_is_threshold) if keep else 0.0)
        weights.append(w_row)
        kept.append(k_row)
    return weights, kept


CASES = [RolloutCorrectionParams("token", 1.5), RolloutCorrectionParams("sequence", 3.0),
         RolloutCorrectionParams(None, rollout_rs="token", rollout_rs_threshold=1.4),
         RolloutCorrectionParams("token", 2.0, rollout_rs="token", rollout_rs_threshold=1.6,
                                 rollout_rs_threshold_lower=0.8),
         RolloutCorrectionParams("token", 2.0, rollout_rs="sequence", rollout_rs_threshold=4.0),
         RolloutCorrectionParams("sequence", 2.0, rollout_rs="geometric", rollout_rs_threshold=1.2)]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"is={p.rollout_is}-rs={p.rollout_rs}")
def test_weights_and_masks_follow_the_formulas(params):
    old, sampler, mask = mismatched(0)
    result = compute_rollout_correction(old, sampler, mask, params)
    weights, kept = loop_correction(old.tolist(), sampler.tolist(), mask.tolist(), params)
    assert torch.allclose(result.weights.double(), torch.tensor(weights, dtype=torch.float64), atol=1e-6)
    assert result.response_mask.tolist() == kept and result.response_mask.dtype == mask.dtype

    # The injected mismatch is large enough that every tool acts somewhere, and not everywhere.
    tokens = int(mask.sum())
    if params.rollout_is == "token":
        over = [math.exp(o - s) > params.rollout_is_threshold
                for rows in zip(old.tolist(), sampler.tolist(), mask.tolist()) for o, s, m in zip(*rows) if m]
        assert 0 < sum(over) < tokens
        assert result.metrics["rollout_corr/is_truncated_frac"] == pytest.approx(sum(over) / tokens)
    if params.rollout_rs:
        assert 0 < result.metrics["rollout_corr/masked_token_frac"] < 1
        assert result.metrics["rollout_corr/masked_token_frac"] == pytest.approx(
            (tokens - sum(map(sum, kept))) / tokens)
    flat_kept = [w for w_row, k_row in zip(weights, kept) for w, k in zip(w_row, k_row) if k]
    assert result.metrics["rollout_corr/is_weight_mean"] == pytest.approx(sum(flat_kept) / len(flat_kept), abs=1e-6)
    assert result.metrics["rollout_corr/is_weight_max"] == pytest.approx(max(flat_kept), abs=1e-6)
    gaps = [abs(o - s) for rows in zip(old.tolist(), sampler.tolist(), mask.tolist()) for o, s, m in zip(*rows) if m]
    assert result.metrics["rollout_corr/logprob_gap"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-6)
    k3 = [math.expm1(o - s) - (o - s)
          for rows in zip(old.tolist(), sampler.tolist(), mask.tolist()) for o, s, m in zip(*rows) if m]
    assert result.metrics["rollout_corr/kl"] == pytest.approx(sum(k3) / len(k3), abs=1e-6)


def test_sequence_masking_drops_whole_responses_and_counts_them():
    old, sampler, mask = mismatched(1, scale=1.0)
    params = RolloutCorrectionParams(rollout_rs="sequence", rollout_rs_threshold=2.0)
    result = compute_rollout_correction(old, sampler, mask, params)
    rows_with_tokens = mask.sum(-1) > 0
    dropped = rows_with_tokens & (result.response_mask.sum(-1) == 0)
    partial = (result.response_mask.sum(-1) > 0) & (result.response_mask.sum(-1) < mask.sum(-1))
    assert dropped.any() and not partial.any()
    assert result.metrics["rollout_corr/masked_seq_frac"] == pytest.approx(
        dropped.sum().item() / rows_with_tokens.sum().item())


def test_no_mismatch_changes_nothing():
    old, _, mask = mismatched(2)
    for params in CASES:
        result = compute_rollout_correction(old, old.clone(), mask, params)
        assert torch.equal(result.response_mask, mask)
        assert torch.equal(result.weights, mask.to(result.weights.dtype))
        assert result.metrics["rollout_corr/logprob_gap"] == 0 and result.metrics["rollout_corr/kl"] == 0


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES.names()))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_unit_weights_leave_every_policy_loss_unchanged(name, mode):
    logprobs, old_logprobs, advantages, mask = rollout_tensors(3)
    plain_lp, weighted_lp = logprobs.clone().requires_grad_(True), logprobs.clone().requires_grad_(True)
    plain, _ = compute_policy_loss(name, plain_lp, old_logprobs, advantages, mask, aggregation=LossAggregation(mode))
    ones = compute_rollout_correction(old_logprobs, old_logprobs, mask, CASES[3]).weights.double()
    weighted, _ = compute_policy_loss(name, weighted_lp, old_logprobs, advantages, mask,
                                      aggregation=LossAggregation(mode), rollout_is_weights=ones)
    plain.backward()
    weighted.backward()
    assert weighted.item() == plain.item()
    assert torch.equal(plain_lp.grad, weighted_lp.grad)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_corrected_ppo_loss_matches_loop(mode):
    """PPO on the proximal policy, each token weighted by its truncated IS weight, rejected tokens out of the mean."""
    logprobs, old_logprobs, advantages, _ = rollout_tensors(5, batch=9, length=7)
    _, sampler, mask = mismatched(5)
    sampler = old_logprobs + (sampler - sampler.mean())           # a mismatch against these old log-probs
    params = RolloutCorrectionParams("token", 1.5, rollout_rs="token", rollout_rs_threshold=2.0)
    correction = compute_rollout_correction(old_logprobs, sampler, mask, params)
    loss, _ = compute_policy_loss("ppo", logprobs, old_logprobs, advantages, correction.response_mask,
                                  aggregation=LossAggregation(mode), rollout_is_weights=correction.weights)
    weights, kept = loop_correction(old_logprobs.tolist(), sampler.tolist(), mask.tolist(), params)
    token_losses = [[w * loop_ppo_token_loss(a, b, c, 0.2, 0.2, None) for a, b, c, w in zip(*rows)]
                    for rows in zip(logprobs.tolist(), old_logprobs.tolist(), advantages.tolist(), weights)]
    assert loss.item() == pytest.approx(loop_aggregate(token_losses, kept, mode), abs=1e-6)


def test_bad_settings_are_refused_with_the_name():
    with pytest.raises(ValueError, match="rollout_is='tok' is unknown"):
        RolloutCorrectionParams("tok")
    with pytest.raises(ValueError, match="rejection band"):
        RolloutCorrectionParams(rollout_rs="token", rollout_rs_threshold=2.0, rollout_rs_threshold_lower=3.0)
    with pytest.raises(ValueError, match="share one"):
        compute_rollout_correction(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), CASES[0])
