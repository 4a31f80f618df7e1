"""Reward shaping: from one score per response to a reward per response token.

RLHF with a reward model or a rule gives one number per response. The token-level reward that the advantage
estimators read puts that score on the last response token and, when KL goes into the reward (Ziegler et al. 2019;
InstructGPT), subtracts a KL penalty from every response token:

    r_t = -kl_coef * kl_t + [t == last kept token] * score
"""

from __future__ import annotations

import torch

from rlhf_ray.algorithms.masking import masked_mean


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last kept position of each row `(batch,)`; -1 for a row with no kept position."""
    positions = torch.arange(response_mask.shape[-1], device=response_mask.device).expand_as(response_mask)
    marked = torch.where(response_mask.bool(), positions, torch.full_like(positions, -1))
    return marked.max(dim=-1).values


def compute_token_level_rewards(scores: torch.Tensor, response_mask: torch.Tensor, kl: torch.Tensor | None = None,
                                kl_coef: float = 0.0,
                                score_clip: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level rewards `(batch, response_len)` from sequence `scores` `(batch,)` and an optional per-token `kl`.

    The score lands on the last kept token of each response (a response with no kept token gets nothing);
    `-kl_coef * kl` is added on every kept token. `score_clip` clips scores to [-score_clip, score_clip] first
    (a guard against reward-model outliers). Positions outside the mask are 0.

    Metrics: `reward/score_mean`; with `kl`: `reward/kl` (per-token mean KL, averaged over sequences),
    `reward/kl_sum` (per-sequence summed KL, averaged over sequences: the quantity Ziegler et al. steer towards a
    target), `reward/kl_coef`, `reward/kl_penalty_mean` (mean summed penalty per sequence).
    """
    if scores.dim() != 1 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(f"scores must be (batch,) = ({response_mask.shape[0]},), got {tuple(scores.shape)}")
    mask = response_mask.to(torch.float32 if not scores.is_floating_point() else scores.dtype)
    scores = scores.to(mask.dtype)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)

    rewards = torch.zeros_like(mask)
    last = last_token_index(response_mask)
    has_tokens = last >= 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)[has_tokens]
    rewards[rows, last[has_tokens]] = scores[has_tokens]

    metrics = {"reward/score_mean": scores.mean().item() if scores.numel() else 0.0}
    if kl is not None:
        if kl.shape != response_mask.shape:
            raise ValueError(f"kl {tuple(kl.shape)} must match response_mask {tuple(response_mask.shape)}")
        penalty = -kl_coef * kl.to(mask.dtype) * mask
        rewards = rewards + penalty
        metrics.update({
            "reward/kl": masked_mean(kl, response_mask, dim=-1).mean().item(),
            "reward/kl_sum": (kl * mask).sum(dim=-1).mean().item(),
            "reward/kl_coef": float(kl_coef),
            "reward/kl_penalty_mean": penalty.sum(dim=-1).mean().item(),
        })
    return rewards, metrics


def compute_overlong_penalty(response_lengths: torch.Tensor, max_response_len: int, buffer_len: int,
                             penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), added to the sequence scores `(batch,)`:

        0                                          L <= L_max - L_buffer
        penalty_factor * (L_max - L_buffer - L) / L_buffer     L_max - L_buffer < L <= L_max   (0 down to -factor)
        -penalty_factor                            L > L_max

    with L the response length in tokens, L_max `max_response_len`, L_buffer `buffer_len` (0 < L_buffer <= L_max).
    """
    if not 0 < buffer_len <= max_response_len:
        raise ValueError(f"overlong_buffer_len must be in (0, max_new_tokens = {max_response_len}] (got "
                         f"{buffer_len}); DAPO uses 4096 of 20480")
    excess = response_lengths.to(torch.float32) - (max_response_len - buffer_len)
    return -penalty_factor * (excess / buffer_len).clamp(min=0.0, max=1.0)
