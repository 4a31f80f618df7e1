"""Correction for the gap between the policy that sampled the tokens and the one the trainer scores them with.

The sampler (vLLM; in async mode also older weights) and the trainer compute different log-probs for the same
tokens. With `old_logprobs` = the trainer's log-probs of the data (in async mode: the proximal policy, recomputed
at the start of the update) and `rollout_logprobs` = the sampler's (the behaviour policy), per token

    rho_t = pi_old(y_t) / pi_sampler(y_t) = exp(old_logprobs_t - rollout_logprobs_t)

Two tools, used alone or together (names as in veRL's rollout correction):

- importance weight (`rollout_is`), truncated at C = `rollout_is_threshold` (TIS; Yao et al. 2025, "Your
  efficient RL framework secretly brings you off-policy RL training"), multiplies each token's policy loss:
      "token":     w_t = min(rho_t, C)
      "sequence":  w_t = min(prod_s rho_s, C)          the same weight on every token of the response
- rejection (`rollout_rs`): tokens outside the band [lo, hi] are removed from the loss (the response mask):
      "token":     drop token t when rho_t leaves [lo, hi]                 (IcePop, token masking)
      "sequence":  drop the whole response when prod_s rho_s leaves [lo, hi]
      "geometric": drop the whole response when exp(mean_s log rho_s) leaves [lo, hi]  (length-independent)
  lo defaults to 1 / hi.

The PPO ratio pi_theta / pi_old is then clipped as usual: together this is the decoupled PPO objective (Hilton et
al. 2022, "Batch size-invariance for policy optimization"; AReaL), the proximal policy pi_old anchoring the trust
region and the weight correcting for the behaviour policy. With pi_old == pi_sampler every weight is 1 and no
token is dropped, so the loss is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from rlhf_ray.algorithms.masking import masked_mean, masked_sum

RolloutISLevel = Literal["token", "sequence"]
RolloutRSLevel = Literal["token", "sequence", "geometric"]
ROLLOUT_IS_LEVELS: tuple[str, ...] = get_args(RolloutISLevel)
ROLLOUT_RS_LEVELS: tuple[str, ...] = get_args(RolloutRSLevel)
# exp() of a log-ratio beyond this is inf in float32 (a sequence product of many tokens gets there quickly).
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class RolloutCorrectionParams:
    """rollout_is: None (no weight) | "token" | "sequence"; rollout_is_threshold: the cap C of the weight.
    rollout_rs: None (no rejection) | "token" | "sequence" | "geometric"; the band is [rollout_rs_threshold_lower
    (default 1 / rollout_rs_threshold), rollout_rs_threshold]."""

    rollout_is: str | None = None
    rollout_is_threshold: float = 2.0
    rollout_rs: str | None = None
    rollout_rs_threshold: float = 2.0
    rollout_rs_threshold_lower: float | None = None

    def __post_init__(self):
        if self.rollout_is is not None and self.rollout_is not in ROLLOUT_IS_LEVELS:
            raise ValueError(f"rollout_is={self.rollout_is!r} is unknown; expected one of {list(ROLLOUT_IS_LEVELS)} "
                             f"or none")
        if self.rollout_rs is not None and self.rollout_rs not in ROLLOUT_RS_LEVELS:
            raise ValueError(f"rollout_rs={self.rollout_rs!r} is unknown; expected one of {list(ROLLOUT_RS_LEVELS)} "
                             f"or none")
        if self.rollout_is_threshold <= 0:
            raise ValueError(f"rollout_is_threshold must be > 0 (got {self.rollout_is_threshold}); 2.0 is usual")
        if not self.band[0] < self.band[1] or self.band[0] < 0:
            raise ValueError(f"the rejection band [rollout_rs_threshold_lower, rollout_rs_threshold] = "
                             f"[{self.band[0]}, {self.band[1]}] must satisfy 0 <= lower < upper; e.g. 0.5, 2.0")

    @property
    def enabled(self) -> bool:
        return self.rollout_is is not None or self.rollout_rs is not None

    @property
    def band(self) -> tuple[float, float]:
        upper = self.rollout_rs_threshold
        lower = self.rollout_rs_threshold_lower
        return (1.0 / upper if lower is None else lower), upper


@dataclass
class RolloutCorrection:
    """weights `(B, R)`: the detached importance weight per token (1 without `rollout_is`, 0 outside the mask);
    response_mask `(B, R)`: the input mask with the rejected tokens removed (same dtype); metrics: floats."""

    weights: torch.Tensor
    response_mask: torch.Tensor
    metrics: dict[str, float]


@torch.no_grad()
def compute_rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                               response_mask: torch.Tensor,
                               params: RolloutCorrectionParams) -> RolloutCorrection:
    """Importance weights and rejection masks (see the module docstring) for `(B, R)` log-probs and mask.

    Metrics (over the tokens of the input mask unless said otherwise):
    `rollout_corr/logprob_gap` mean |old - rollout|, `rollout_corr/kl` k3 estimate of KL(sampler || old),
    `rollout_corr/is_weight_mean` and `_max` (over the tokens that stay), `rollout_corr/is_truncated_frac` (tokens
    whose weight hit the cap), `rollout_corr/masked_token_frac`, `rollout_corr/masked_seq_frac` (responses that
    lost every token).
    """
    if not old_logprobs.shape == rollout_logprobs.shape == response_mask.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)}, rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} and response_mask {tuple(response_mask.shape)} must "
                         f"share one (batch, response_len) shape")
    mask = response_mask.bool()
    log_ratio = torch.where(mask, old_logprobs.float() - rollout_logprobs.float(), 0.0)
    token_log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    seq_log_ratio = masked_sum(log_ratio, mask, dim=-1).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)      # (B,)

    if params.rollout_is == "token":
        ratio = torch.exp(token_log_ratio)
    elif params.rollout_is == "sequence":
        ratio = torch.exp(seq_log_ratio).unsqueeze(-1).expand_as(log_ratio)
    else:
        ratio = torch.ones_like(log_ratio)
    weights = ratio.clamp(max=params.rollout_is_threshold)

    keep = mask
    if params.rollout_rs is not None:
        lower, upper = params.band
        if params.rollout_rs == "token":
            rho = torch.exp(token_log_ratio)
        elif params.rollout_rs == "sequence":
            rho = torch.exp(seq_log_ratio).unsqueeze(-1)
        else:
            rho = torch.exp(masked_mean(log_ratio, mask, dim=-1)).unsqueeze(-1)
        keep = mask & (rho >= lower) & (rho <= upper)
    weights = torch.where(keep, weights, 0.0)

    tokens = mask.sum().clamp(min=1)
    has_tokens = mask.any(dim=-1)
    kept_weights = weights[keep]
    metrics = {
        "rollout_corr/logprob_gap": masked_mean(log_ratio.abs(), mask).item(),
        "rollout_corr/kl": masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, mask).item(),
        "rollout_corr/is_weight_mean": kept_weights.mean().item() if kept_weights.numel() else 0.0,
        "rollout_corr/is_weight_max": kept_weights.max().item() if kept_weights.numel() else 0.0,
        "rollout_corr/is_truncated_frac": ((ratio > params.rollout_is_threshold) & mask).sum().item()
        / tokens.item(),
        "rollout_corr/masked_token_frac": (mask & ~keep).sum().item() / tokens.item(),
        "rollout_corr/masked_seq_frac": (has_tokens & ~keep.any(dim=-1)).sum().item()
        / max(int(has_tokens.sum()), 1),
    }
    return RolloutCorrection(weights, response_mask * keep.to(response_mask.dtype), metrics)
