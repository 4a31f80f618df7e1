"""Pairwise preference losses: reward-model losses (log_sig, log_exp) and direct preference optimisation (DPO, IPO,
SimPO). Pure torch: inputs are tensors and floats.

Reward models score a (chosen, rejected) pair with one scalar each, `(batch,)` tensors:

    loss, metrics = REWARD_MODEL_LOSSES.get("log_sig")(chosen_rewards, rejected_rewards)

Direct preference losses take sequence log-probabilities `(batch,)` of the chosen and rejected responses under the
policy being trained and, except SimPO, under a frozen reference:

    logps = compute_sequence_logprobs(token_logprobs, loss_mask, length_normalize=False)      # (batch,)
    loss, metrics = PREFERENCE_LOSSES.get("dpo")(pc, pr, rc, rr, params=PreferenceLossParams(beta=0.1))

Every loss is the mean over pairs (each pair weighs the same, whatever its length); `metrics` are detached floats,
also means over the pairs of the batch, so a caller can average them over micro-batches of equal size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from rlhf_ray.algorithms.masking import masked_mean, masked_sum
from rlhf_ray.algorithms.registry import Registry


def compute_sequence_logprobs(token_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                              length_normalize: bool = False) -> torch.Tensor:
    """Log-probability of each response: `(batch, seq)` token log-probs -> `(batch,)`.

    Sums over the positions `loss_mask` keeps (log p(y|x), what DPO uses), or with `length_normalize` takes their
    mean (log p(y|x) / |y|, what SimPO uses and what IPO is usually run with). A row with an empty mask gives 0.
    """
    if token_logprobs.shape != loss_mask.shape:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    if length_normalize:
        return masked_mean(token_logprobs, loss_mask, dim=-1)
    return masked_sum(token_logprobs, loss_mask, dim=-1)


# ---------------------------------------------------------------- reward-model losses


class RewardModelLossFn(Protocol):
    def __call__(self, chosen_rewards: torch.Tensor,
                 rejected_rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]: ...


REWARD_MODEL_LOSSES: Registry[RewardModelLossFn] = Registry("reward-model loss", setting="loss_fn")


def _check_pair(chosen: torch.Tensor, rejected: torch.Tensor, what: str) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"{what}: expected two (batch,) tensors of one shape, got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, loss: torch.Tensor) -> dict[str, float]:
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {
        "loss/rm": loss.item(),
        "rm/acc": (chosen > rejected).float().mean().item(),
        "rm/reward_chosen": chosen.mean().item(),
        "rm/reward_rejected": rejected.mean().item(),
        "rm/margin": (chosen - rejected).mean().item(),
    }


@REWARD_MODEL_LOSSES.register("log_sig")
def compute_log_sig_loss(chosen_rewards: torch.Tensor,
                         rejected_rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry pairwise loss (InstructGPT, Ouyang et al. 2022): mean over pairs of
    -log sigmoid(r_chosen - r_rejected).

    Metrics (means over the pairs): `loss/rm`, `rm/acc` (fraction with r_chosen > r_rejected; ties count as wrong),
    `rm/reward_chosen`, `rm/reward_rejected`, `rm/margin`.
    """
    _check_pair(chosen_rewards, rejected_rewards, "log_sig loss")
    loss = -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()
    return loss, _reward_metrics(chosen_rewards, rejected_rewards, loss)


@REWARD_MODEL_LOSSES.register("log_exp")
def compute_log_exp_loss(chosen_rewards: torch.Tensor,
                         rejected_rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The seed's `log_exp` form: mean over pairs of log(1 + exp(r_rejected - r_chosen)).

    In exact arithmetic this equals `log_sig`; it is kept because the seed offers both names. It is computed as
    softplus(r_rejected - r_chosen), which does not overflow to inf when the rejected reward leads by > ~88
    (the literal log(1 + exp(x)) does, in float32). Same metrics as `log_sig`.
    """
    _check_pair(chosen_rewards, rejected_rewards, "log_exp loss")
    loss = F.softplus(rejected_rewards.float() - chosen_rewards.float()).mean()
    return loss, _reward_metrics(chosen_rewards, rejected_rewards, loss)


# ---------------------------------------------------------------- direct preference losses


@dataclass(frozen=True)
class PreferenceLossParams:
    """Settings of the direct preference losses (each loss reads the ones it needs).

    beta: DPO's inverse temperature on the implicit reward beta * log(pi / pi_ref) (0.1 is usual); IPO's tau
        (the target margin is 1 / (2 tau)); SimPO's reward scale (2.0-2.5 in its paper).
    gamma: SimPO's target reward margin (0.5-1.5 in its paper); unused by DPO and IPO.
    label_smoothing: conservative DPO (cDPO, Mitchell 2023): the probability that a label is flipped, 0 <= eps < 0.5.
    """

    beta: float = 0.1
    gamma: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 (got {self.beta}); 0.1 is usual for DPO, 2.0 for SimPO")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")


class PreferenceLossFn(Protocol):
    def __call__(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
                 params: PreferenceLossParams) -> tuple[torch.Tensor, dict[str, float]]: ...


PREFERENCE_LOSSES: Registry[PreferenceLossFn] = Registry("preference loss", setting="loss_type")

#: which losses need the frozen reference model's log-probs
NEEDS_REFERENCE = {"dpo": True, "ipo": True, "simpo": False}


def _preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, loss: torch.Tensor,
                        policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> dict[str, float]:
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "loss/preference": loss.item(),
        "dpo/reward_chosen": chosen.mean().item(),
        "dpo/reward_rejected": rejected.mean().item(),
        "dpo/reward_margin": (chosen - rejected).mean().item(),
        "dpo/acc": (chosen > rejected).float().mean().item(),
        "dpo/logps_chosen": policy_chosen_logps.detach().float().mean().item(),
        "dpo/logps_rejected": policy_rejected_logps.detach().float().mean().item(),
    }


def _reference_log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"{what} needs the reference model's log-probs (got None); keep the reference model "
                         f"enabled, or use loss_type=simpo, which has none")
    for name, tensor in (("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                         ("ref_rejected_logps", ref_rejected_logps)):
        _check_pair(policy_chosen_logps, tensor, f"{what} ({name})")
    return (policy_chosen_logps.float() - ref_chosen_logps.float(),
            policy_rejected_logps.float() - ref_rejected_logps.float())


@PREFERENCE_LOSSES.register("dpo")
def compute_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                     ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
                     params: PreferenceLossParams = PreferenceLossParams()) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023), with cDPO label smoothing. All inputs `(batch,)` sequence log-probs.

        h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
        loss = mean over pairs of  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    Implicit rewards r = beta * (log pi - log ref). Metrics (pair means): `loss/preference`, `dpo/reward_chosen`,
    `dpo/reward_rejected`, `dpo/reward_margin` (chosen - rejected), `dpo/acc` (fraction with margin > 0),
    `dpo/logps_chosen`, `dpo/logps_rejected` (policy).
    """
    chosen_ratio, rejected_ratio = _reference_log_ratios(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, "dpo loss")
    logits = params.beta * (chosen_ratio - rejected_ratio)
    eps = params.label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)).mean()
    return loss, _preference_metrics(params.beta * chosen_ratio, params.beta * rejected_ratio, loss,
                                     policy_chosen_logps, policy_rejected_logps)


@PREFERENCE_LOSSES.register("ipo")
def compute_ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                     ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
                     params: PreferenceLossParams = PreferenceLossParams()) -> tuple[torch.Tensor, dict[str, float]]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences").

        h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
        loss = mean over pairs of (h - 1 / (2 beta))^2

    A squared loss towards a fixed margin, so it does not push the margin to infinity as DPO can on deterministic
    preferences. Usually run on length-normalised log-probs. Same metrics as DPO (rewards beta * log-ratio).
    """
    chosen_ratio, rejected_ratio = _reference_log_ratios(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, "ipo loss")
    loss = ((chosen_ratio - rejected_ratio) - 1.0 / (2.0 * params.beta)).square().mean()
    return loss, _preference_metrics(params.beta * chosen_ratio, params.beta * rejected_ratio, loss,
                                     policy_chosen_logps, policy_rejected_logps)


@PREFERENCE_LOSSES.register("simpo")
def compute_simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                       ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None, *,
                       params: PreferenceLossParams = PreferenceLossParams(beta=2.0)
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO (Meng et al. 2024): no reference model, a target margin gamma.

        loss = mean over pairs of -log sigmoid(beta * logp(y_w) - beta * logp(y_l) - gamma)

    where logp is meant to be length-normalised (the average token log-prob). The reference arguments are
    ignored. Rewards are beta * logp; same metrics as DPO.
    """
    _check_pair(policy_chosen_logps, policy_rejected_logps, "simpo loss")
    chosen_rewards = params.beta * policy_chosen_logps.float()
    rejected_rewards = params.beta * policy_rejected_logps.float()
    logits = chosen_rewards - rejected_rewards - params.gamma
    eps = params.label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)).mean()
    return loss, _preference_metrics(chosen_rewards, rejected_rewards, loss, policy_chosen_logps,
                                     policy_rejected_logps)


assert set(NEEDS_REFERENCE) == set(PREFERENCE_LOSSES.names())
