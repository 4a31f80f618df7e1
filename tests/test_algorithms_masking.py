"""Masked reductions, loss aggregation (incl. data-parallel sharding) and log-probs, against slow python loops."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algorithms.logprobs import compute_entropy, compute_token_logprobs
from rlhf_ray.algorithms.masking import (LossAggregation, aggregate_loss, count_tokens_and_sequences, masked_mean,
                                         masked_sum, masked_var, masked_whiten)

TOL = dict(rtol=1e-6, atol=1e-6)


def ragged_mask(batch: int, length: int, generator: torch.Generator, holes: bool = True) -> torch.Tensor:
    """Right-padded responses of random lengths; row 0 is empty, row 1 full, and some rows have holes (tool
    tokens inside a multi-turn response)."""
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0], lengths[1] = 0, length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    if holes:
        for row in range(2, batch, 3):
            if lengths[row] > 3:
                mask[row, 1:3] = 0
    return mask


def as_rows(tensor: torch.Tensor) -> list[list[float]]:
    return tensor.tolist()


def loop_mean(values, mask) -> float:
    kept = [v for vr, mr in zip(values, mask) for v, m in zip(vr, mr) if m]
    return sum(kept) / len(kept) if kept else 0.0


def loop_var(values, mask) -> float:
    kept = [v for vr, mr in zip(values, mask) for v, m in zip(vr, mr) if m]
    mean = sum(kept) / len(kept)
    return sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)


def loop_aggregate(loss, mask, mode) -> float:
    if mode == "token-mean":
        return loop_mean(loss, mask)
    per_sequence = []
    for lr, mr in zip(loss, mask):
        kept = [v for v, m in zip(lr, mr) if m]
        if not kept:
            continue
        per_sequence.append(sum(kept) if mode == "seq-mean-token-sum" else sum(kept) / len(kept))
    return sum(per_sequence) / len(per_sequence)


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(9, 7, generator=generator, dtype=torch.float64)
    return values, ragged_mask(9, 7, generator)


def test_masked_sum_mean_var_match_loops(data):
    values, mask = data
    v, m = as_rows(values), as_rows(mask)
    assert masked_sum(values, mask).item() == pytest.approx(sum(a * b for vr, mr in zip(v, m) for a, b in zip(vr, mr)),
                                                            abs=1e-9)
    assert masked_mean(values, mask).item() == pytest.approx(loop_mean(v, m), abs=1e-9)
    assert masked_var(values, mask).item() == pytest.approx(loop_var(v, m), abs=1e-9)
    per_row = masked_mean(values, mask, dim=-1)
    for row in range(values.shape[0]):
        assert per_row[row].item() == pytest.approx(loop_mean([v[row]], [m[row]]), abs=1e-9)
    assert per_row[0].item() == 0.0  # the empty row: 0, not NaN
    # Boolean and integer masks give the same result as float ones.
    assert torch.allclose(masked_mean(values, mask.bool()), masked_mean(values, mask), **TOL)
    assert torch.allclose(masked_mean(values, mask.long(), dim=-1), per_row, **TOL)


def test_half_precision_values_are_reduced_in_float32():
    """bf16 cannot count past 256 exactly; sums and token counts must not be accumulated in it."""
    values = torch.full((1, 1001), 0.5, dtype=torch.bfloat16)
    mask = torch.ones(1, 1001, dtype=torch.bool)
    assert masked_sum(values, mask).item() == 500.5
    assert masked_mean(values, mask).item() == 0.5
    assert aggregate_loss(values, mask, "token-mean", global_num_tokens=1001.0).item() == 0.5
    assert count_tokens_and_sequences(mask) == (1001.0, 1.0)


def test_masked_whiten_matches_loop(data):
    values, mask = data
    v, m = as_rows(values), as_rows(mask)
    mean, std = loop_mean(v, m), math.sqrt(loop_var(v, m) + 1e-8)
    whitened = masked_whiten(values, mask)
    shifted_back = masked_whiten(values, mask, shift_mean=False)
    for row in range(values.shape[0]):
        for col in range(values.shape[1]):
            expected = (v[row][col] - mean) / std if m[row][col] else 0.0
            assert whitened[row, col].item() == pytest.approx(expected, abs=1e-6)
            expected_unshifted = expected + mean if m[row][col] else 0.0
            assert shifted_back[row, col].item() == pytest.approx(expected_unshifted, abs=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_aggregate_loss_matches_loop(data, mode):
    values, mask = data
    assert aggregate_loss(values, mask, mode).item() == pytest.approx(
        loop_aggregate(as_rows(values), as_rows(mask), mode), abs=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_sharded_aggregation_equals_unsharded(mode):
    """Two data-parallel ranks with different token counts, each computing its shard's loss with the global counts
    and dp_size; DDP averages gradients, so the average of the shard losses (and of their gradients) must equal
    the loss (and gradient) of the whole batch."""
    generator = torch.Generator().manual_seed(3)
    params = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    mask = ragged_mask(10, 6, generator)
    shards = [slice(0, 3), slice(3, 10)]  # unequal shards: 3 and 7 rows, so local means would be wrong

    full = params.clone().requires_grad_(True)
    full_loss = aggregate_loss(full.square(), mask, mode)
    full_loss.backward()

    num_tokens, num_sequences = count_tokens_and_sequences(mask)
    shard_losses, shard_grads = [], torch.zeros_like(params)
    for rows in shards:
        local = params[rows].clone().requires_grad_(True)
        aggregation = LossAggregation(mode, global_num_tokens=num_tokens, global_num_sequences=num_sequences,
                                      dp_size=len(shards))
        loss = aggregation(local.square(), mask[rows])
        loss.backward()
        shard_losses.append(loss)
        shard_grads[rows] = local.grad / len(shards)  # what DDP's gradient averaging does
    assert torch.allclose(torch.stack(shard_losses).mean(), full_loss, **TOL)
    assert torch.allclose(shard_grads, full.grad, **TOL)

    # And the naive per-shard local mean differs here, which is why the global counts exist.
    naive = torch.stack([aggregate_loss(params[rows].square(), mask[rows], mode) for rows in shards]).mean()
    if mode != "seq-mean-token-sum":
        assert not torch.allclose(naive, full_loss.detach(), **TOL)


def test_seq_mean_token_sum_norm_is_the_token_sum_over_a_constant(data):
    """Dr. GRPO: every kept token / (sequences with a token × L), L fixed (not the padded width), sharding exact."""
    values, mask = data
    rows = [[v for v, m in zip(vr, mr) if m] for vr, mr in zip(as_rows(values), as_rows(mask))]
    expected = sum(map(sum, rows)) / (sum(1 for r in rows if r) * 32)
    loss = aggregate_loss(values, mask, "seq-mean-token-sum-norm", max_response_len=32)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    padded = torch.nn.functional.pad(values, (0, 5)), torch.nn.functional.pad(mask, (0, 5))
    assert aggregate_loss(*padded, "seq-mean-token-sum-norm", max_response_len=32).item() == pytest.approx(expected)
    num_tokens, num_sequences = count_tokens_and_sequences(mask)
    shards = [LossAggregation("seq-mean-token-sum-norm", num_tokens, num_sequences, dp_size=2,
                              max_response_len=32)(values[rows_], mask[rows_]) for rows_ in (slice(0, 2), slice(2, 9))]
    assert (sum(shards) / 2).item() == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match="needs max_response_len"):
        aggregate_loss(values, mask, "seq-mean-token-sum-norm")


def test_aggregation_refuses_bad_input(data):
    values, mask = data
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(values, mask, "sum")
    with pytest.raises(ValueError, match="global"):
        aggregate_loss(values, mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        LossAggregation("mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_match_cross_entropy(dtype):
    generator = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 5, 17, generator=generator)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 17, (3, 5), generator=generator)
    logprobs = compute_token_logprobs(logits, labels)
    reference = -F.cross_entropy(logits.float().reshape(-1, 17), labels.reshape(-1), reduction="none").view(3, 5)
    assert logprobs.dtype == torch.float32
    assert torch.allclose(logprobs, reference, **TOL)
    # Gradients flow back to the logits in their own dtype.
    logprobs.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == dtype

    tempered = compute_token_logprobs(logits, labels, temperature=0.7)
    reference_t = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(tempered, reference_t, **TOL)


def test_entropy_matches_loop():
    generator = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(2, 4, 9, generator=generator, dtype=torch.float64)
    entropy = compute_entropy(logits)
    for b in range(2):
        for t in range(4):
            row = logits[b, t].tolist()
            top = max(row)
            normaliser = sum(math.exp(x - top) for x in row)
            probs = [math.exp(x - top) / normaliser for x in row]
            expected = -sum(p * math.log(p) for p in probs)
            assert entropy[b, t].item() == pytest.approx(expected, abs=1e-9)
    half = compute_entropy(logits.to(torch.bfloat16))
    assert half.dtype == torch.float32 and torch.allclose(half.double(), entropy, atol=0.05)


@pytest.mark.parametrize("block_elements", [1 << 24, 20])  # one block, and many blocks of two tokens
def test_logprob_and_entropy_gradients_match_autograd(monkeypatch, block_elements):
    import rlhf_ray.algorithms.logprobs as logprobs_module

    monkeypatch.setattr(logprobs_module, "BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(4)
    full = torch.randn(2, 6, 9, generator=generator, dtype=torch.float64)
    logits = full[:, 1:-1].requires_grad_(False).clone().requires_grad_(True)
    labels = torch.randint(0, 9, (2, 4), generator=generator)
    weights = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    for temperature in (1.0, 0.6):
        logits.grad = None
        (compute_token_logprobs(logits, labels, temperature) * weights).sum().backward()
        ours = logits.grad.clone()
        logits.grad = None
        reference = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]
        (reference * weights).sum().backward()
        assert torch.allclose(ours, logits.grad, atol=1e-12)

        logits.grad = None
        (compute_entropy(logits, temperature) * weights).sum().backward()
        ours = logits.grad.clone()
        logits.grad = None
        reference = torch.distributions.Categorical(logits=logits / temperature).entropy()
        (reference * weights).sum().backward()
        assert torch.allclose(ours, logits.grad, atol=1e-12)

    # A non-contiguous slice of the logits (the usual response span) is read in place, not copied.
    span = full[:, 1:-1]
    assert not span.is_contiguous()
    assert torch.allclose(compute_token_logprobs(span, labels),
                          torch.log_softmax(span, -1).gather(-1, labels[..., None])[..., 0], atol=1e-12)


def test_bf16_logprob_gradient_matches_float32_reference():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 11, generator=generator).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 11, (2, 3), generator=generator)
    compute_token_logprobs(logits, labels).sum().backward()
    upcast = logits.detach().float().requires_grad_(True)
    torch.log_softmax(upcast, -1).gather(-1, labels[..., None]).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert torch.allclose(logits.grad.float(), upcast.grad.to(torch.bfloat16).float(), atol=1e-6)


def test_logprobs_reject_misaligned_labels():
    with pytest.raises(ValueError, match="labels"):
        compute_token_logprobs(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_algorithms_import_neither_ray_nor_vllm():
    code = ("import sys, rlhf_ray.algorithms; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm')); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
