"""Policy, value, entropy, ptx and KL losses against independent per-token python loops (ragged masks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algorithms.auxiliary_losses import compute_entropy_loss, compute_ptx_loss, compute_value_loss
from rlhf_ray.algorithms.kl import compute_kl_loss
from rlhf_ray.algorithms.logprobs import compute_token_logprobs
from rlhf_ray.algorithms.masking import LossAggregation
from rlhf_ray.algorithms.policy_loss import POLICY_LOSSES, PolicyLossParams, compute_policy_loss
from test_algorithms_masking import loop_aggregate, ragged_mask

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def rollout_tensors(seed: int, batch: int = 8, length: int = 6):
    generator = torch.Generator().manual_seed(seed)
    old_logprobs = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 3
    # Ratios spread over [e^-1, e^1] so that both clip edges and the dual clip are exercised.
    logprobs = old_logprobs + (torch.rand(batch, length, generator=generator, dtype=torch.float64) - 0.5) * 2.0
    advantages = torch.randn(batch, length, generator=generator, dtype=torch.float64) * 2
    mask = ragged_mask(batch, length, generator)
    return logprobs, old_logprobs, advantages, mask


def loop_ppo_token_loss(logprob, old_logprob, advantage, low, high, dual_clip):
    ratio = math.exp(logprob - old_logprob)
    surrogate = -advantage * ratio
    clipped = -advantage * min(max(ratio, 1 - low), 1 + high)
    loss = max(surrogate, clipped)
    if dual_clip is not None and advantage < 0:
        loss = min(loss, -dual_clip * advantage)
    return loss


def loop_gspo_loss(logprobs, old_logprobs, advantages, mask, low, high, mode):
    token_losses = []
    for lp, olp, adv, m in zip(logprobs, old_logprobs, advantages, mask):
        kept = [a - b for a, b, k in zip(lp, olp, m) if k]
        seq_ratio = math.exp(sum(kept) / len(kept)) if kept else 1.0
        token_losses.append([max(-a * seq_ratio, -a * min(max(seq_ratio, 1 - low), 1 + high)) for a in adv])
    return loop_aggregate(token_losses, mask, mode)


def loop_cispo_token_loss(logprob, old_logprob, advantage, low, high):
    """Value of -sg[clip(ratio)] * A * logprob; its gradient in logprob is -clip(ratio) * A."""
    return -min(max(math.exp(logprob - old_logprob), 1 - low), 1 + high) * advantage * logprob


REFERENCES = {"ppo", "gspo", "cispo"}  # every registered policy loss must have a loop reference below


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_ppo_loss_matches_loop(mode, dual_clip):
    logprobs, old_logprobs, advantages, mask = rollout_tensors(0)
    params = PolicyLossParams(clip_ratio_low=0.2, clip_ratio_high=0.28, dual_clip=dual_clip)
    loss, metrics = compute_policy_loss("ppo", logprobs, old_logprobs, advantages, mask, params,
                                        LossAggregation(mode))
    token_losses = [[loop_ppo_token_loss(a, b, c, 0.2, 0.28, dual_clip) for a, b, c in zip(*rows)]
                    for rows in zip(logprobs.tolist(), old_logprobs.tolist(), advantages.tolist())]
    assert loss.item() == pytest.approx(loop_aggregate(token_losses, mask.tolist(), mode), abs=1e-6)

    # Diagnostics from the same loops.
    kept = [(a, b, c) for rows in zip(logprobs.tolist(), old_logprobs.tolist(), advantages.tolist(), mask.tolist())
            for a, b, c, m in zip(*rows) if m]
    clipped = [(-c * min(max(math.exp(a - b), 0.8), 1.28)) > (-c * math.exp(a - b)) for a, b, c in kept]
    assert metrics["policy/clip_frac"] == pytest.approx(sum(clipped) / len(kept), abs=1e-9)
    approx_kl = [math.exp(a - b) - 1 - (a - b) for a, b, _ in kept]
    assert metrics["policy/approx_kl"] == pytest.approx(sum(approx_kl) / len(kept), abs=1e-9)
    if dual_clip is None:
        assert metrics["policy/clip_frac_dual"] == 0.0
    else:
        dual = [c < 0 and max(-c * math.exp(a - b), -c * min(max(math.exp(a - b), 0.8), 1.28)) > -dual_clip * c
                for a, b, c in kept]
        assert sum(dual) > 0, "the test data should exercise the dual clip"
        assert metrics["policy/clip_frac_dual"] == pytest.approx(sum(dual) / len(kept), abs=1e-9)


def test_ppo_gradient_is_zero_where_clipped():
    logprobs, old_logprobs, advantages, mask = rollout_tensors(1)
    logprobs = logprobs.clone().requires_grad_(True)
    loss, _ = compute_policy_loss("ppo", logprobs, old_logprobs, advantages, mask, PolicyLossParams(0.2, 0.2),
                                  LossAggregation("token-mean"))
    loss.backward()
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    clipped_out = ((advantages > 0) & (ratio > 1.2)) | ((advantages < 0) & (ratio < 0.8))
    assert torch.all(logprobs.grad[clipped_out] == 0)
    assert torch.all(logprobs.grad[mask == 0] == 0)
    # Elsewhere the gradient is the on-policy one: -A * ratio / num_tokens.
    active = (~clipped_out) & (mask == 1)
    expected = -advantages * ratio / mask.sum()
    assert torch.allclose(logprobs.grad[active], expected[active], atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_gspo_loss_matches_loop(mode):
    logprobs, old_logprobs, advantages, mask = rollout_tensors(2)
    logprobs = old_logprobs + (logprobs - old_logprobs) * 0.01  # GSPO's tiny clip range needs small ratios
    sequence_advantages = advantages[:, :1].expand_as(advantages).contiguous()
    params = PolicyLossParams(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    loss, metrics = compute_policy_loss("gspo", logprobs, old_logprobs, sequence_advantages, mask, params,
                                        LossAggregation(mode))
    expected = loop_gspo_loss(logprobs.tolist(), old_logprobs.tolist(), sequence_advantages.tolist(),
                              mask.tolist(), 3e-4, 4e-4, mode)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert 0.0 < metrics["policy/clip_frac"] < 1.0


def test_gspo_gradient_equals_sequence_level_objective():
    """With one advantage per sequence and seq-mean-token-mean, GSPO's token form is the sequence objective
    -A_i * s_i (unclipped region) with s_i = exp(mean_t log-ratio): same value, same gradient."""
    logprobs, old_logprobs, advantages, mask = rollout_tensors(3)
    mask[0, :2] = 1  # no empty sequence, the sequence objective needs a length
    logprobs = (old_logprobs + (logprobs - old_logprobs) * 1e-4).clone().requires_grad_(True)
    sequence_advantages = advantages[:, :1].expand_as(advantages).contiguous()
    params = PolicyLossParams(clip_ratio_low=0.5, clip_ratio_high=0.5)  # nothing is clipped
    loss, _ = compute_policy_loss("gspo", logprobs, old_logprobs, sequence_advantages, mask, params,
                                  LossAggregation("seq-mean-token-mean"))
    loss.backward()

    independent = logprobs.detach().clone().requires_grad_(True)
    seq_ratio = torch.exp(((independent - old_logprobs) * mask).sum(-1) / mask.sum(-1))
    sequence_loss = (-advantages[:, 0] * seq_ratio).mean()
    sequence_loss.backward()
    assert loss.item() == pytest.approx(sequence_loss.item(), abs=1e-9)
    assert torch.allclose(logprobs.grad, independent.grad, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_cispo_loss_and_gradient_match_loop(mode):
    logprobs, old_logprobs, advantages, mask = rollout_tensors(7)
    params = PolicyLossParams(clip_ratio_low=0.2, clip_ratio_high=0.28)
    trainable = logprobs.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss("cispo", trainable, old_logprobs, advantages, mask, params,
                                        LossAggregation(mode))
    rows = list(zip(logprobs.tolist(), old_logprobs.tolist(), advantages.tolist()))
    token_losses = [[loop_cispo_token_loss(a, b, c, 0.2, 0.28) for a, b, c in zip(*row)] for row in rows]
    assert loss.item() == pytest.approx(loop_aggregate(token_losses, mask.tolist(), mode), abs=1e-6)
    # Gradient: the loop loss with the weight held constant, through plain autograd on each token.
    independent = logprobs.clone().requires_grad_(True)
    weight = torch.exp(logprobs - old_logprobs).clamp(0.8, 1.28)
    token_loss = -weight * advantages * independent
    if mode == "token-mean":
        reference = (token_loss * mask).sum() / mask.sum()
    else:
        per_row = (token_loss * mask).sum(-1)
        counts = mask.sum(-1)
        if mode == "seq-mean-token-mean":
            per_row = per_row / counts.clamp(min=1)
        reference = per_row[counts > 0].mean()
    loss.backward()
    reference.backward()
    assert torch.allclose(trainable.grad, independent.grad, atol=1e-9)
    # No token's gradient is cut: every kept token with a non-zero advantage moves.
    assert torch.all(trainable.grad[(mask > 0) & (advantages != 0)] != 0)
    kept = [(a, b) for row, m_row in zip(rows, mask.tolist()) for a, b, _, m in zip(*row, m_row) if m]
    clipped = [not 0.8 <= math.exp(a - b) <= 1.28 for a, b in kept]
    assert 0 < sum(clipped) and metrics["policy/clip_frac"] == pytest.approx(sum(clipped) / len(kept), abs=1e-9)


def test_every_registered_policy_loss_is_checked_and_well_formed():
    assert set(POLICY_LOSSES.names()) == REFERENCES, "add a loop reference test for the new policy loss"
    logprobs, old_logprobs, advantages, mask = rollout_tensors(4)
    for name in POLICY_LOSSES.names():
        trainable = logprobs.clone().requires_grad_(True)
        loss, metrics = compute_policy_loss(name, trainable, old_logprobs, advantages, mask)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert {"loss/policy", "policy/clip_frac", "policy/approx_kl"} <= set(metrics)
        assert all(isinstance(v, float) for v in metrics.values())
        loss.backward()
        assert torch.all(trainable.grad[mask == 0] == 0)
        # On-policy (ratio 1) every loss has the policy gradient -A / tokens per kept token; the ratio losses
        # also have the value -aggregate(advantages) (CISPO's value is -aggregate(A * logprobs)).
        at_old = old_logprobs.clone().requires_grad_(True)
        on_policy, _ = compute_policy_loss(name, at_old, old_logprobs, advantages, mask)
        on_policy.backward()
        assert torch.allclose(at_old.grad, -advantages * mask / mask.sum(), atol=1e-12)
        scale = old_logprobs if name == "cispo" else torch.ones_like(advantages)
        expected = loop_aggregate((-advantages * scale).tolist(), mask.tolist(), "token-mean")
        assert on_policy.item() == pytest.approx(expected, abs=1e-9)


def test_policy_loss_errors_name_the_setting():
    with pytest.raises(ValueError, match="known: cispo, gspo, ppo"):
        POLICY_LOSSES.get("ppo2")
    with pytest.raises(ValueError, match="dual_clip must be > 1.0"):
        PolicyLossParams(dual_clip=0.5)
    with pytest.raises(ValueError, match="already registered"):
        POLICY_LOSSES.register("ppo")(lambda *a, **k: None)


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("mode", MODES)
def test_value_loss_matches_loop(clip, mode):
    generator = torch.Generator().manual_seed(5)
    values, old_values, returns = torch.randn(3, 8, 6, generator=generator, dtype=torch.float64)
    mask = ragged_mask(8, 6, generator)
    loss, metrics = compute_value_loss(values, old_values, returns, mask, clip, LossAggregation(mode))
    token_losses, clipped_larger, kept = [], 0, 0
    for v_row, o_row, r_row, m_row in zip(values.tolist(), old_values.tolist(), returns.tolist(), mask.tolist()):
        row = []
        for v, o, r, m in zip(v_row, o_row, r_row, m_row):
            unclipped = (v - r) ** 2
            if clip is None:
                row.append(0.5 * unclipped)
                continue
            v_clip = o + min(max(v - o, -clip), clip)
            row.append(0.5 * max(unclipped, (v_clip - r) ** 2))
            if m:
                kept += 1
                clipped_larger += (v_clip - r) ** 2 > unclipped
        token_losses.append(row)
    assert loss.item() == pytest.approx(loop_aggregate(token_losses, mask.tolist(), mode), abs=1e-6)
    if clip is not None:
        assert metrics["value/clip_frac"] == pytest.approx(clipped_larger / kept, abs=1e-9)


def test_value_loss_explained_variance():
    generator = torch.Generator().manual_seed(6)
    returns = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.float64)
    _, perfect = compute_value_loss(returns.clone(), returns.clone(), returns, mask)
    _, constant = compute_value_loss(torch.full_like(returns, returns.mean().item()), returns, returns, mask)
    assert perfect["value/explained_variance"] == pytest.approx(1.0)
    assert constant["value/explained_variance"] == pytest.approx(0.0, abs=1e-9)


def test_entropy_loss_is_negative_aggregated_entropy():
    generator = torch.Generator().manual_seed(7)
    entropy = torch.rand(6, 5, generator=generator, dtype=torch.float64)
    mask = ragged_mask(6, 5, generator)
    loss, metrics = compute_entropy_loss(entropy, mask, LossAggregation("seq-mean-token-mean"))
    expected = loop_aggregate(entropy.tolist(), mask.tolist(), "seq-mean-token-mean")
    assert loss.item() == pytest.approx(-expected, abs=1e-9)
    assert metrics["policy/entropy"] == pytest.approx(expected, abs=1e-9)


def test_ptx_loss_equals_cross_entropy():
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 7, 23, generator=generator)
    labels = torch.randint(0, 23, (3, 7), generator=generator)
    ignore = torch.zeros(3, 7, dtype=torch.bool)
    ignore[0, :3] = True  # prompt tokens
    ignore[2, 5:] = True  # padding
    loss, metrics = compute_ptx_loss(compute_token_logprobs(logits, labels), (~ignore).float())
    reference = F.cross_entropy(logits.reshape(-1, 23), labels.masked_fill(ignore, -100).reshape(-1),
                                ignore_index=-100)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    assert metrics["loss/ptx"] == pytest.approx(reference.item(), abs=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k3", "low_var_kl"])
def test_kl_loss_matches_loop(estimator):
    logprobs, ref_logprobs, _, mask = rollout_tensors(9)
    loss, metrics = compute_kl_loss(logprobs, ref_logprobs, mask, estimator, LossAggregation("seq-mean-token-mean"))
    per_token = []
    for lp_row, ref_row in zip(logprobs.tolist(), ref_logprobs.tolist()):
        row = []
        for lp, ref in zip(lp_row, ref_row):
            log_ratio = ref - lp
            row.append(-log_ratio if estimator == "k1" else math.exp(log_ratio) - 1 - log_ratio)
        per_token.append(row)
    assert loss.item() == pytest.approx(loop_aggregate(per_token, mask.tolist(), "seq-mean-token-mean"), abs=1e-6)
    assert metrics["policy/kl"] == pytest.approx(loop_aggregate(per_token, mask.tolist(), "token-mean"), abs=1e-6)


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo"])
def test_policy_loss_sharded_over_two_ranks_equals_unsharded(name):
    """Two data-parallel ranks with uneven shards, each normalising by the global token count and dp_size: the
    average of their losses and of their gradients (what DDP computes) equals the whole-batch loss and gradient."""
    from rlhf_ray.algorithms.masking import count_tokens_and_sequences

    logprobs, old_logprobs, advantages, mask = rollout_tensors(10, batch=9)
    full = logprobs.clone().requires_grad_(True)
    full_loss, _ = compute_policy_loss(name, full, old_logprobs, advantages, mask)
    full_loss.backward()

    num_tokens, num_sequences = count_tokens_and_sequences(mask)
    aggregation = LossAggregation("token-mean", global_num_tokens=num_tokens, global_num_sequences=num_sequences,
                                  dp_size=2)
    losses, grads = [], torch.zeros_like(logprobs)
    for rows in (slice(0, 2), slice(2, 9)):
        local = logprobs[rows].clone().requires_grad_(True)
        loss, _ = compute_policy_loss(name, local, old_logprobs[rows], advantages[rows], mask[rows],
                                      aggregation=aggregation)
        loss.backward()
        losses.append(loss.item())
        grads[rows] = local.grad / 2
    assert sum(losses) / 2 == pytest.approx(full_loss.item(), abs=1e-9)
    assert torch.allclose(grads, full.grad, atol=1e-12)
