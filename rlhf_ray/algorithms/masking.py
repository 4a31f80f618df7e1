"""Masked reductions and loss aggregation.

Every RL quantity here lives on a `(batch, response_len)` grid with a `response_mask` of the same shape that is 1 on
generated tokens and 0 on padding (and, for multi-turn data, on tool/observation tokens). These helpers reduce
only over the positions the mask keeps. Masks may be bool, int or float; float masks act as weights.

Conventions:
- A reduction over nothing (an all-zero mask) returns 0, never NaN.
- `masked_whiten` sets the positions outside the mask to 0 so that later sums over padding stay harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)


def _as_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask as float weights: float64 for float64 values, else float32. Half-precision values are thus
    promoted in every product, so sums and token counts are accumulated in float32 (bf16 cannot even count
    past 256 exactly)."""
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values shape {tuple(like.shape)}")
    return mask.to(dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is set; over all elements (`dim=None`, a scalar) or along `dim`."""
    weights = _as_weights(mask, values)
    product = values * weights
    return product.sum() if dim is None else product.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions `mask` keeps; 0 where the mask keeps nothing.

    `dim=None` gives the global (token-level) mean as a scalar; `dim=-1` on `(batch, seq)` gives one mean per row,
    shape `(batch,)`.
    """
    weights = _as_weights(mask, values)
    total = (values * weights).sum() if dim is None else (values * weights).sum(dim=dim)
    count = weights.sum() if dim is None else weights.sum(dim=dim)
    # An empty row has total 0, so dividing by max(count, tiny) returns 0 instead of NaN.
    return total / count.clamp(min=torch.finfo(count.dtype).tiny)


def masked_var(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
               unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the positions `mask` keeps.

    With `unbiased=True` the result is multiplied by n / (n - 1) (Bessel), where n is the number of kept positions;
    where n <= 1 that correction is undefined and is skipped (the variance of one element is 0 either way).
    """
    mean = masked_mean(values, mask, dim=dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    variance = masked_mean((values - mean) ** 2, mask, dim=dim)
    if unbiased:
        count = _as_weights(mask, values).sum() if dim is None else _as_weights(mask, values).sum(dim=dim)
        correction = torch.where(count > 1, count / (count - 1).clamp(min=1e-12), torch.ones_like(count))
        variance = variance * correction
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalise `values` to unit variance (and zero mean when `shift_mean`) over all positions `mask` keeps.

    Statistics are global over the whole tensor (not per row): `(values - mean) / sqrt(var + eps)`, with the
    unbiased variance. With `shift_mean=False` the mean is added back, so only the scale changes. Output has the
    shape of `values`; positions outside the mask are 0.
    """
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * _as_weights(mask, values)


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
                   global_num_tokens: float | torch.Tensor | None = None,
                   global_num_sequences: float | torch.Tensor | None = None,
                   dp_size: int = 1, max_response_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss `(batch, seq)` to a scalar.

    Modes (what each averages over):
    - "token-mean": sum over every kept token of the batch / number of kept tokens. Every token weighs the same, so
      long responses weigh more than short ones (PPO in most RLHF code, DAPO).
    - "seq-mean-token-sum": per sequence, the sum over its tokens; then the mean over sequences.
    - "seq-mean-token-mean": per sequence, the mean over its tokens; then the mean over sequences (the original
      GRPO paper). Every sequence weighs the same regardless of length.
    - "seq-mean-token-sum-norm": "seq-mean-token-sum" divided by the constant `max_response_len` L: the sum over
      every token / (sequences × L), Dr. GRPO's fixed normaliser (Liu et al. 2025), with no length bias.
    Sequences with no kept token are left out of the sequence count.

    Data parallelism: each rank sees only its shard, and DDP/FSDP *average* gradients over `dp_size` ranks.
    Averaging per-rank token means is not the token mean of the whole batch when ranks hold different token
    counts. To get exactly the unsharded loss, pass the counts of the whole (global) batch: `global_num_tokens`
    (for "token-mean") or `global_num_sequences` (for the seq-mean modes), and `dp_size`. Each rank then returns
    `local_sum / global_count * dp_size`, and the average over ranks equals the global mean. The same holds over
    gradient-accumulation micro-batches when the counts cover all of them and the engine sums (does not average)
    the micro-batch losses. Without global counts, the local count is used and `dp_size` must be 1.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss aggregation mode {mode!r} is unknown; expected one of {list(LOSS_AGG_MODES)}")
    if loss_mat.dim() != 2:
        raise ValueError(f"aggregate_loss expects a (batch, seq) loss, got shape {tuple(loss_mat.shape)}")
    weights = _as_weights(mask, loss_mat)

    if mode == "seq-mean-token-sum-norm" and (max_response_len is None or max_response_len < 1):
        raise ValueError(f"loss_agg_mode 'seq-mean-token-sum-norm' needs max_response_len >= 1 (the fixed length "
                         f"normaliser, e.g. max_new_tokens); got {max_response_len}")
    if mode == "token-mean":
        numerator = (loss_mat * weights).sum()
        global_count = global_num_tokens
        local_count = weights.sum()
    else:
        if mode == "seq-mean-token-mean":
            per_sequence = masked_mean(loss_mat, weights, dim=-1)
        else:
            per_sequence = (loss_mat * weights).sum(dim=-1)
            if mode == "seq-mean-token-sum-norm":
                per_sequence = per_sequence / max_response_len
        numerator = per_sequence.sum()
        global_count = global_num_sequences
        local_count = (weights.sum(dim=-1) > 0).sum().to(numerator.dtype)

    if global_count is None:
        if dp_size != 1:
            raise ValueError(f"aggregate_loss with dp_size={dp_size} needs the global batch counts "
                             f"(global_num_tokens / global_num_sequences) to normalise shards exactly")
        count = local_count
    else:
        count = torch.as_tensor(global_count, dtype=numerator.dtype, device=loss_mat.device)
    return numerator / count.clamp(min=torch.finfo(numerator.dtype).tiny) * dp_size


def count_tokens_and_sequences(mask: torch.Tensor) -> tuple[float, float]:
    """(kept tokens, sequences with at least one kept token) of a `(batch, seq)` mask: the global counts that
    `aggregate_loss` needs, to be summed over data-parallel shards and micro-batches."""
    weights = mask.to(torch.float64)
    return float(weights.sum()), float((weights.sum(dim=-1) > 0).sum())


@dataclass(frozen=True)
class LossAggregation:
    """How a loss reduces `(batch, seq)` to a scalar: the mode and, under data parallelism, the global counts.

    Build one per optimizer step (the counts cover every rank and micro-batch of that step) and hand it to every
    loss of that step. `LossAggregation()` is the local token mean.
    """

    mode: str = "token-mean"
    global_num_tokens: float | None = None
    global_num_sequences: float | None = None
    dp_size: int = 1
    max_response_len: int | None = None          # the constant L of "seq-mean-token-sum-norm"

    def __post_init__(self):
        if self.mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode={self.mode!r} is unknown; expected one of {list(LOSS_AGG_MODES)}")
        if self.dp_size < 1:
            raise ValueError(f"dp_size must be >= 1 (got {self.dp_size})")

    def __call__(self, loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(loss_mat, mask, self.mode, global_num_tokens=self.global_num_tokens,
                              global_num_sequences=self.global_num_sequences, dp_size=self.dp_size,
                              max_response_len=self.max_response_len)
