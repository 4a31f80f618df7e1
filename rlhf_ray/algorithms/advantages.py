"""Advantage estimators behind one signature, registered by name.

Every estimator is called as

    advantages, returns = fn(token_level_rewards, response_mask, values=..., group_ids=..., gamma=..., lam=...,
                             norm_by_std=..., eps=...)

- token_level_rewards `(batch, response_len)`: the reward of each response token (see `shaping.py`: the sequence
  score on the last response token, minus a per-token KL penalty when KL goes into the reward).
- response_mask `(batch, response_len)`: 1 on generated tokens.
- values `(batch, response_len)`: critic values, needed by "gae" only.
- group_ids `(batch,)` int: which prompt each response answers, needed by the group estimators ("grpo",
  "grpo_no_std", "rloo", "reinforce_plus_plus_baseline"). Responses to the same prompt share an id.
- gamma, lam: discount and GAE lambda. norm_by_std: divide by the (group or batch) standard deviation.

Outputs are `(batch, response_len)` and 0 outside the mask. `returns` are the critic's regression targets for
"gae"; the outcome estimators return their advantages as returns too (no critic reads them).

Group estimators take the sequence score as the masked sum of `token_level_rewards` over the response. A group
with a single response has no baseline and gets advantage 0 (it carries no relative signal).
"""

from __future__ import annotations

from typing import Protocol

import torch

from rlhf_ray.algorithms.masking import masked_whiten
from rlhf_ray.algorithms.registry import Registry


class AdvantageEstimator(Protocol):
    def __call__(self, token_level_rewards: torch.Tensor, response_mask: torch.Tensor, *,
                 values: torch.Tensor | None = None, group_ids: torch.Tensor | None = None, gamma: float = 1.0,
                 lam: float = 1.0, norm_by_std: bool = True,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator",
                                                              setting="advantage_estimator")
# Estimators that need several responses per prompt (n_samples_per_prompt > 1) and no critic.
GROUP_ESTIMATORS = frozenset({"grpo", "grpo_no_std", "rloo", "reinforce_plus_plus_baseline"})
CRITIC_ESTIMATORS = frozenset({"gae"})


def compute_advantages(name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor, *,
                       values: torch.Tensor | None = None, group_ids: torch.Tensor | None = None,
                       gamma: float = 1.0, lam: float = 1.0, norm_by_std: bool = True,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Look up the estimator `name` in `ADVANTAGE_ESTIMATORS` and apply it (no grad)."""
    estimator = ADVANTAGE_ESTIMATORS.get(name)
    with torch.no_grad():
        return estimator(token_level_rewards, response_mask, values=values, group_ids=group_ids, gamma=gamma,
                         lam=lam, norm_by_std=norm_by_std, eps=eps)


def _check(name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor, *,
           values: torch.Tensor | None = None, group_ids: torch.Tensor | None = None,
           needs_values: bool = False, needs_groups: bool = False) -> torch.Tensor:
    """Validate inputs; return the mask as a float tensor like the rewards."""
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(f"{name}: token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must share one (batch, response_len) shape")
    if needs_values:
        if values is None:
            raise ValueError(f"advantage_estimator={name!r} needs critic values; configure a critic or choose an "
                             f"estimator without one ({', '.join(sorted(GROUP_ESTIMATORS))}, reinforce_plus_plus)")
        if values.shape != token_level_rewards.shape:
            raise ValueError(f"{name}: values {tuple(values.shape)} must match token_level_rewards "
                             f"{tuple(token_level_rewards.shape)}")
    if needs_groups:
        if group_ids is None:
            raise ValueError(f"advantage_estimator={name!r} needs group_ids (which prompt each response answers); "
                             f"generate n_samples_per_prompt > 1 responses per prompt")
        if group_ids.shape != token_level_rewards.shape[:1]:
            raise ValueError(f"{name}: group_ids {tuple(group_ids.shape)} must be (batch,) = "
                             f"({token_level_rewards.shape[0]},)")
    return response_mask.to(token_level_rewards.dtype)


@ADVANTAGE_ESTIMATORS.register("gae")
def compute_gae_advantages(token_level_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0,
                           lam=1.0, norm_by_std=True, eps=1e-6):
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE").

        delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1};   returns_t = A_t + V_t

    walked backwards over the kept tokens only: a masked position (padding, or a tool-output token inside the
    response) is skipped, so V_{t+1} and A_{t+1} come from the next *kept* token, and both are 0 after the last.
    With `norm_by_std` the advantages are whitened (global mean 0, std 1 over kept tokens); returns are not.
    """
    mask = _check("gae", token_level_rewards, response_mask, values=values, needs_values=True)
    batch, length = token_level_rewards.shape
    next_value = torch.zeros(batch, dtype=token_level_rewards.dtype, device=token_level_rewards.device)
    next_advantage = torch.zeros_like(next_value)
    advantages = torch.zeros_like(token_level_rewards)
    for t in reversed(range(length)):
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        kept = mask[:, t]
        # Masked positions leave the running "next" values untouched.
        next_value = kept * values[:, t] + (1 - kept) * next_value
        next_advantage = kept * advantage + (1 - kept) * next_advantage
        advantages[:, t] = advantage
    returns = (advantages + values) * mask
    advantages = masked_whiten(advantages, mask) if norm_by_std else advantages * mask
    return advantages, returns


def _group_statistics(scores: torch.Tensor, group_ids: torch.Tensor):
    """Per-sample (group size, group mean, unbiased group std) for `scores` `(batch,)` grouped by `group_ids`."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    counts = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, torch.ones_like(scores))
    sums = torch.zeros_like(counts).index_add_(0, inverse, scores)
    means = sums / counts
    squared = torch.zeros_like(counts).index_add_(0, inverse, (scores - means[inverse]).square())
    stds = torch.sqrt(squared / (counts - 1).clamp(min=1))
    return counts[inverse], means[inverse], stds[inverse]


def _sequence_scores(token_level_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (token_level_rewards * mask).sum(dim=-1)


@ADVANTAGE_ESTIMATORS.register("grpo")
def compute_grpo_advantages(token_level_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0,
                            lam=1.0, norm_by_std=True, eps=1e-6):
    """GRPO outcome advantages (Shao et al. 2024, "DeepSeekMath"): per group of responses to one prompt,

        A_i = (s_i - mean_g(s)) / (std_g(s) + eps)     (std unbiased)
        A_i = s_i - mean_g(s)                           with norm_by_std=False (Dr. GRPO, Liu et al. 2025)

    broadcast to every kept token of response i. gamma/lam are unused.
    """
    mask = _check("grpo", token_level_rewards, response_mask, group_ids=group_ids, needs_groups=True)
    scores = _sequence_scores(token_level_rewards, mask)
    counts, means, stds = _group_statistics(scores, group_ids)
    centred = scores - means
    advantages = centred / (stds + eps) if norm_by_std else centred
    advantages = torch.where(counts > 1, advantages, torch.zeros_like(advantages))
    advantages = advantages.unsqueeze(-1) * mask
    return advantages, advantages.clone()


@ADVANTAGE_ESTIMATORS.register("grpo_no_std")
def compute_grpo_no_std_advantages(token_level_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0,
                                   lam=1.0, norm_by_std=True, eps=1e-6):
    """GRPO without the std division (Dr. GRPO), whatever `norm_by_std` says: A_i = s_i - mean_g(s)."""
    return compute_grpo_advantages(token_level_rewards, response_mask, group_ids=group_ids, norm_by_std=False,
                                   eps=eps)


@ADVANTAGE_ESTIMATORS.register("rloo")
def compute_rloo_advantages(token_level_rewards, response_mask, *, values=None, group_ids=None, gamma=1.0,
                            lam=1.0, norm_by_std=True, eps=1e-6):
    """RLOO, REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024):

        A_i = s_i - (1 / (n - 1)) * sum_{j != i} s_j  =  n / (n - 1) * (s_i - mean_g(s))

    over the n responses of one prompt, broadcast to the response tokens. No normalisation (`norm_by_std` unused).
    """
    mask = _check("rloo", token_level_rewards, response_mask, group_ids=group_ids, needs_groups=True)
    scores = _sequence_scores(token_level_rewards, mask)
    counts, means, _ = _group_statistics(scores, group_ids)
    advantages = torch.where(counts > 1, counts / (counts - 1).clamp(min=1) * (scores - means),
                             torch.zeros_like(scores))
    advantages = advantages.unsqueeze(-1) * mask
    return advantages, advantages.clone()


def _discounted_returns(token_level_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{k >= t, kept} gamma^(number of kept tokens between) r_k, walked backwards over kept tokens."""
    running = torch.zeros(token_level_rewards.shape[0], dtype=token_level_rewards.dtype,
                          device=token_level_rewards.device)
    returns = torch.zeros_like(token_level_rewards)
    for t in reversed(range(token_level_rewards.shape[1])):
        kept = mask[:, t]
        running = kept * (token_level_rewards[:, t] + gamma * running) + (1 - kept) * running
        returns[:, t] = running
    return returns * mask


@ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus")
def compute_reinforce_plus_plus_advantages(token_level_rewards, response_mask, *, values=None, group_ids=None,
                                           gamma=1.0, lam=1.0, norm_by_std=True, eps=1e-6):
    """REINFORCE++ (Hu 2025, "REINFORCE++"): discounted returns of the token-level rewards (which carry the
    per-token KL penalty), whitened over the whole batch:

        G_t = r_t + gamma * G_{t+1};   A = whiten(G) over kept tokens (mean 0, std 1; mean-centring only when
        norm_by_std=False)

    returns = G (not whitened).
    """
    mask = _check("reinforce_plus_plus", token_level_rewards, response_mask)
    returns = _discounted_returns(token_level_rewards, mask, gamma)
    if norm_by_std:
        advantages = masked_whiten(returns, mask)
    else:
        advantages = (returns - (returns * mask).sum() / mask.sum().clamp(min=1)) * mask
    return advantages, returns


@ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus_baseline")
def compute_reinforce_plus_plus_baseline_advantages(token_level_rewards, response_mask, *, values=None,
                                                    group_ids=None, gamma=1.0, lam=1.0, norm_by_std=True,
                                                    eps=1e-6):
    """REINFORCE++-baseline (Hu 2025): subtract the group mean score as the baseline, broadcast to the tokens,
    then whiten over the whole batch (global, not per group):

        A_i = s_i - mean_g(s);   A = whiten(A) over kept tokens (skipped when norm_by_std=False)

    A group with one response gets 0 before whitening. gamma/lam are unused.
    """
    mask = _check("reinforce_plus_plus_baseline", token_level_rewards, response_mask, group_ids=group_ids,
                  needs_groups=True)
    scores = _sequence_scores(token_level_rewards, mask)
    counts, means, _ = _group_statistics(scores, group_ids)
    centred = torch.where(counts > 1, scores - means, torch.zeros_like(scores))
    advantages = centred.unsqueeze(-1) * mask
    if norm_by_std:
        advantages = masked_whiten(advantages, mask)
    return advantages, advantages.clone()
