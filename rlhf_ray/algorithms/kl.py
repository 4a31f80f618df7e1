"""KL(policy || reference) estimators per token, the KL loss, and KL-coefficient controllers.

Tokens are sampled from the policy, so with log r = ref_logprobs - logprobs (both `(batch, response_len)`),
Schulman's estimators (http://joschu.net/blog/kl-approx.html) of KL(pi || pi_ref) are:

    k1 = -log r                      unbiased, high variance, can be negative per token
    k2 = (log r)^2 / 2               biased, low variance, always >= 0
    k3 = (r - 1) - log r             unbiased, low variance, always >= 0

"low_var_kl" is k3 with log r clamped to [-20, 20] and the result to [-10, 10] (as in verl), so one token with a
wild ratio cannot blow up the loss. "abs" is |log r|.

Used either in the reward (a per-token penalty -beta * kl added to the token-level rewards; PPO/RLHF as in
Ziegler et al. 2019, usually k1) or as a loss term beta * aggregate(kl) (GRPO, usually k3/low_var_kl).
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_ray.algorithms.masking import LossAggregation, masked_mean
from rlhf_ray.algorithms.registry import Registry

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator", setting="kl_estimator")


@KL_ESTIMATORS.register("k1")
def compute_kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref, per token `(batch, response_len)`."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("abs")
def compute_kl_abs(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """|log pi - log pi_ref|, per token."""
    return (logprobs - ref_logprobs).abs()


@KL_ESTIMATORS.register("k2")
def compute_kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2, per token."""
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def compute_kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log r) - 1 - log r with log r = log pi_ref - log pi, per token."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


@KL_ESTIMATORS.register("low_var_kl")
def compute_kl_low_var(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 with log r clamped to [-20, 20] and the estimate clamped to [-10, 10], per token."""
    log_ratio = (ref_logprobs - logprobs).clamp(min=-20.0, max=20.0)
    return (torch.expm1(log_ratio) - log_ratio).clamp(min=-10.0, max=10.0)


def compute_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate `(batch, response_len)` by registered name (see `KL_ESTIMATORS.names()`)."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    return KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs)


def compute_kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
                    estimator: str = "low_var_kl",
                    aggregation: LossAggregation = LossAggregation()) -> tuple[torch.Tensor, dict[str, float]]:
    """KL as a loss term (GRPO): aggregate(kl) with `aggregation`; the caller multiplies by its coefficient.

    Metrics: `loss/kl` (the aggregated value), `policy/kl` (local token mean of the estimate).
    """
    kl = compute_kl(logprobs, ref_logprobs, estimator)
    loss = aggregation(kl, response_mask)
    return loss, {"loss/kl": loss.item(), "policy/kl": masked_mean(kl.detach(), response_mask).item()}


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0 (got {kl_coef})")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", sec. 2.2), a proportional
    controller that steers the measured KL towards `target_kl`:

        e = clip(KL / target_kl - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)

    `current_kl` must be measured the same way as `target_kl` (e.g. the mean over sequences of the summed
    per-token k1, which is what the paper's target of 6 nats refers to). `n_steps` is the number of samples
    (or steps, matching `horizon`) since the last update.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float):
        if init_kl_coef < 0 or target_kl <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs init_kl_coef >= 0, target_kl > 0 and horizon > 0 (got "
                             f"{init_kl_coef}, {target_kl}, {horizon})")
        self.value = float(init_kl_coef)
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def build_kl_controller(kind: str, kl_coef: float, target_kl: float | None = None,
                        horizon: float | None = None) -> KLController:
    """`kind` "fixed" or "adaptive" (the latter needs `target_kl` and `horizon`)."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target_kl is None or horizon is None:
            raise ValueError(f"kl_ctrl_type='adaptive' needs target_kl and horizon (got target_kl={target_kl}, "
                             f"horizon={horizon}); set both, e.g. target_kl=6.0 horizon=10000")
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"kl_ctrl_type={kind!r} is unknown; expected 'fixed' or 'adaptive'")
