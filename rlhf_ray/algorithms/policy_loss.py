"""Policy-gradient losses behind one signature, registered by name.

Every policy loss is called as

    loss, metrics = fn(logprobs, old_logprobs, advantages, response_mask, params=PolicyLossParams(...),
                       aggregation=LossAggregation(...))

with `(batch, response_len)` tensors: `logprobs` from the policy being trained (with grad), `old_logprobs` from the
policy that generated the data (no grad), `advantages` and the `response_mask`. `loss` is a scalar to minimise;
`metrics` holds detached Python floats named `loss/...` and `policy/...`, measured as local token means.
`rollout_is_weights` `(batch, response_len)` (optional, detached; off_policy.py) multiply each token's loss before
aggregation: the sampler-mismatch / off-policy importance weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rlhf_ray.algorithms.masking import LossAggregation, masked_mean
from rlhf_ray.algorithms.registry import Registry

# exp() of a log-ratio beyond this is inf in float32; both PPO implementations in wide use clamp here.
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class PolicyLossParams:
    """Settings shared by the policy losses (each loss reads the ones it needs).

    clip_ratio_low / clip_ratio_high: the ratio is clipped to [1 - low, 1 + high] (PPO: 0.2 / 0.2; DAPO's
        "clip-higher": 0.2 / 0.28; GSPO uses ~3e-4 / 4e-4 on its sequence-level ratio).
    dual_clip: c > 1 bounds the loss of a negative-advantage token at -c * A (Ye et al. 2020, "Mastering Complex
        Control in MOBA Games"); None disables it.
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    dual_clip: float | None = None

    def __post_init__(self):
        if self.clip_ratio_low < 0 or self.clip_ratio_high < 0:
            raise ValueError(f"clip_ratio_low/clip_ratio_high must be >= 0 (got {self.clip_ratio_low}, "
                             f"{self.clip_ratio_high})")
        if self.clip_ratio_low >= 1:
            raise ValueError(f"clip_ratio_low must be < 1 so that 1 - clip_ratio_low > 0 (got "
                             f"{self.clip_ratio_low})")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1.0 (got {self.dual_clip}); 3.0 is the usual value, or leave "
                             f"it unset to disable dual clipping")


class PolicyLossFn(Protocol):
    def __call__(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 response_mask: torch.Tensor, *, params: PolicyLossParams, aggregation: LossAggregation,
                 rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]: ...


POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss", setting="policy_loss")


def _check_shapes(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"policy loss inputs must share one (batch, response_len) shape; got {shapes}")


@POLICY_LOSSES.register("ppo")
def compute_ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, *, params: PolicyLossParams = PolicyLossParams(),
                            aggregation: LossAggregation = LossAggregation(),
                            rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate (Schulman et al. 2017), asymmetric clip range, optional dual clip.

    Per token, with ratio = exp(logprobs - old_logprobs):

        l = max(-A * ratio, -A * clip(ratio, 1 - low, 1 + high))
        dual clip (A < 0 only):  l = min(l, -c * A)

    then `aggregation(l, response_mask)`.

    Metrics: `loss/policy`; `policy/clip_frac` (tokens where the clipped branch is active), `policy/clip_frac_dual`
    (tokens where the dual clip bounds the loss), `policy/approx_kl` (k3 estimate of KL(old || new)),
    `policy/ppo_kl` (k1: mean of old - new log-prob), `policy/ratio_mean`, `policy/ratio_max`.
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, response_mask=response_mask,
                  rollout_is_weights=rollout_is_weights)
    log_ratio = (logprobs - old_logprobs).clamp(min=-MAX_LOG_RATIO, max=MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - params.clip_ratio_low, 1.0 + params.clip_ratio_high)
    token_loss = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(token_loss, dtype=torch.bool)
    if params.dual_clip is not None:
        dual_bound = -advantages * params.dual_clip
        dual_active = (advantages < 0) & (token_loss > dual_bound)
        token_loss = torch.where(advantages < 0, torch.minimum(token_loss, dual_bound), token_loss)

    loss = aggregation(_weighted(token_loss, rollout_is_weights), response_mask)
    with torch.no_grad():
        metrics = _ratio_metrics(loss, ratio, log_ratio, response_mask, clipped=clipped > unclipped)
        metrics["policy/clip_frac_dual"] = masked_mean(dual_active.to(ratio.dtype), response_mask).item()
    return loss, metrics


@POLICY_LOSSES.register("gspo")
def compute_gspo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, *, params: PolicyLossParams = PolicyLossParams(),
                             aggregation: LossAggregation = LossAggregation(),
                             rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the clipped surrogate on a sequence-level
    ratio, the geometric mean of the token ratios of each response:

        s_i = exp(mean_t (logprobs - old_logprobs))        over the response tokens of sequence i
        s_it = sg[s_i] * exp(logprobs_t - sg[logprobs_t])   (value s_i; gradient of token t scaled by s_i)
        l_it = max(-A_it * s_it, -A_it * clip(s_it, 1 - low, 1 + high))

    then `aggregation(l, response_mask)`; the paper uses "seq-mean-token-mean" and clip ranges ~3e-4 / 4e-4.
    Dual clip is not applied. Metrics as for "ppo", with `policy/clip_frac` counted per token.
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, response_mask=response_mask,
                  rollout_is_weights=rollout_is_weights)
    token_log_ratio = logprobs - old_logprobs
    seq_log_ratio = masked_mean(token_log_ratio, response_mask, dim=-1)  # (batch,)
    combined = (seq_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach())
    combined = combined.clamp(max=MAX_LOG_RATIO)
    ratio = torch.exp(combined)

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - params.clip_ratio_low, 1.0 + params.clip_ratio_high)
    token_loss = torch.maximum(unclipped, clipped)
    loss = aggregation(_weighted(token_loss, rollout_is_weights), response_mask)
    with torch.no_grad():
        clamped_token = token_log_ratio.clamp(min=-MAX_LOG_RATIO, max=MAX_LOG_RATIO)
        metrics = {
            "loss/policy": loss.item(),
            "policy/clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), response_mask).item(),
            "policy/clip_frac_dual": 0.0,
            "policy/approx_kl": masked_mean(torch.expm1(clamped_token) - clamped_token, response_mask).item(),
            "policy/ppo_kl": masked_mean(-token_log_ratio, response_mask).item(),
            "policy/ratio_mean": masked_mean(ratio, response_mask).item(),
            "policy/ratio_max": _masked_max(ratio, response_mask),
        }
    return loss, metrics


@POLICY_LOSSES.register("cispo")
def compute_cispo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                              response_mask: torch.Tensor, *, params: PolicyLossParams = PolicyLossParams(),
                              aggregation: LossAggregation = LossAggregation(),
                              rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax 2025, "MiniMax-M1"): REINFORCE with a clipped, stop-gradient importance weight.

        l = -sg[clip(ratio, 1 - low, 1 + high)] * A * logprobs,     ratio = exp(logprobs - old_logprobs)

    Unlike PPO no token's gradient is cut: a clipped token still contributes, with its weight bounded. The paper
    clips only above (clip_ratio_low close to 1 is close to no lower clip). Metrics as for "ppo";
    `policy/clip_frac` counts tokens whose weight was clipped.
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, response_mask=response_mask,
                  rollout_is_weights=rollout_is_weights)
    log_ratio = (logprobs - old_logprobs).clamp(min=-MAX_LOG_RATIO, max=MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    weight = ratio.detach().clamp(1.0 - params.clip_ratio_low, 1.0 + params.clip_ratio_high)
    token_loss = -advantages * weight * logprobs
    loss = aggregation(_weighted(token_loss, rollout_is_weights), response_mask)
    with torch.no_grad():
        metrics = _ratio_metrics(loss, ratio, log_ratio, response_mask, clipped=weight != ratio)
    return loss, metrics


def _ratio_metrics(loss: torch.Tensor, ratio: torch.Tensor, log_ratio: torch.Tensor, response_mask: torch.Tensor,
                   clipped: torch.Tensor) -> dict[str, float]:
    return {
        "loss/policy": loss.item(),
        "policy/clip_frac": masked_mean(clipped.to(ratio.dtype), response_mask).item(),
        "policy/clip_frac_dual": 0.0,
        "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask).item(),
        "policy/ppo_kl": masked_mean(-log_ratio, response_mask).item(),
        "policy/ratio_mean": masked_mean(ratio, response_mask).item(),
        "policy/ratio_max": _masked_max(ratio, response_mask),
    }


def compute_policy_loss(name: str, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, params: PolicyLossParams = PolicyLossParams(),
                        aggregation: LossAggregation = LossAggregation(),
                        rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Look up the policy loss `name` in `POLICY_LOSSES` and apply it."""
    return POLICY_LOSSES.get(name)(logprobs, old_logprobs, advantages, response_mask, params=params,
                                   aggregation=aggregation, rollout_is_weights=rollout_is_weights)


def _weighted(token_loss: torch.Tensor, rollout_is_weights: torch.Tensor | None) -> torch.Tensor:
    return token_loss if rollout_is_weights is None else token_loss * rollout_is_weights.detach()


def _masked_max(values: torch.Tensor, mask: torch.Tensor) -> float:
    kept = values[mask.bool()]
    return kept.max().item() if kept.numel() else 0.0
