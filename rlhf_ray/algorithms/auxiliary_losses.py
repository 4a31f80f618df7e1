"""The other terms of the PPO objective: clipped value loss (critic), entropy bonus and the ptx (pretraining
cross-entropy) loss. Each returns `(loss, metrics)` like the policy losses; the trainer combines them:

    policy objective = policy_loss + entropy_coef * entropy_loss + ptx_coef * ptx_loss [+ kl_coef * kl_loss]
    critic objective = value_loss
"""

from __future__ import annotations

import torch

from rlhf_ray.algorithms.masking import LossAggregation, masked_mean, masked_var


def compute_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       response_mask: torch.Tensor, clip_range_value: float | None = 0.2,
                       aggregation: LossAggregation = LossAggregation()) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (PPO2 baselines; Andrychowicz et al. 2021 list it among PPO's implementation choices).

    Per token, with values `(batch, response_len)` from the critic being trained, `old_values` from the critic that
    scored the experience and `returns` the regression targets:

        v_clip = old_values + clip(values - old_values, -eps_v, eps_v)
        l = 0.5 * max((values - returns)^2, (v_clip - returns)^2)

    then `aggregation(l, response_mask)`. `clip_range_value=None` gives the plain 0.5 * (values - returns)^2.

    Metrics: `loss/value`; `value/clip_frac` (tokens where the clipped branch is larger), `value/mean`,
    `value/returns_mean`, `value/explained_variance` = 1 - Var(returns - values) / Var(returns) on kept tokens.
    """
    shapes = {tuple(t.shape) for t in (values, old_values, returns, response_mask)}
    if len(shapes) != 1:
        raise ValueError(f"value loss inputs must share one (batch, response_len) shape; got {sorted(shapes)}")
    unclipped = (values - returns).square()
    if clip_range_value is None:
        token_loss = 0.5 * unclipped
        clipped_larger = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        if clip_range_value <= 0:
            raise ValueError(f"clip_range_value must be > 0 or None to disable (got {clip_range_value})")
        values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
        clipped = (values_clipped - returns).square()
        token_loss = 0.5 * torch.maximum(unclipped, clipped)
        clipped_larger = clipped > unclipped
    loss = aggregation(token_loss, response_mask)
    with torch.no_grad():
        returns_var = masked_var(returns, response_mask, unbiased=False)
        residual_var = masked_var(returns - values.detach(), response_mask, unbiased=False)
        explained = 1.0 - residual_var / returns_var if returns_var.item() > 0 else torch.tensor(float("nan"))
        metrics = {
            "loss/value": loss.item(),
            "value/clip_frac": masked_mean(clipped_larger.to(values.dtype), response_mask).item(),
            "value/mean": masked_mean(values.detach(), response_mask).item(),
            "value/returns_mean": masked_mean(returns, response_mask).item(),
            "value/explained_variance": float(explained),
        }
    return loss, metrics


def compute_entropy_loss(entropy: torch.Tensor, response_mask: torch.Tensor,
                         aggregation: LossAggregation = LossAggregation()) -> tuple[torch.Tensor, dict[str, float]]:
    """Entropy bonus as a loss: -aggregate(entropy), so that adding `entropy_coef * loss` to the objective pushes
    entropy up. `entropy` is `(batch, response_len)` from `compute_entropy`. Metrics: `policy/entropy` (the
    aggregated entropy, a positive number)."""
    aggregated = aggregation(entropy, response_mask)
    return -aggregated, {"policy/entropy": aggregated.item()}


def compute_ptx_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor,
                     aggregation: LossAggregation = LossAggregation()) -> tuple[torch.Tensor, dict[str, float]]:
    """Pretraining (ptx) cross-entropy from InstructGPT (Ouyang et al. 2022): -aggregate(log p(label)).

    `logprobs` `(batch, seq)` are the label log-probs from `compute_token_logprobs` on pretraining rows, and
    `loss_mask` marks the label tokens (1) against prompt/padding (0). With the default token mean this equals
    `F.cross_entropy(..., ignore_index=...)` on the same tokens. Metrics: `loss/ptx`.
    """
    if logprobs.shape != loss_mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    loss = aggregation(-logprobs, loss_mask)
    return loss, {"loss/ptx": loss.item()}
