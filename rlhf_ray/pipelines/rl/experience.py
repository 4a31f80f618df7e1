"""Experience making without Ray: rollouts -> padded tensors, and the math glue from scores to advantages.

    rollouts (RolloutResult, per prompt: n samples of token ids + sampler log-probs + policy version)
      -> build_experience           Experience: sequences (prompt left-padded | response right-padded), masks,
                                    rollout_logprobs, policy_version, group_ids (one id per prompt)
      -> the controller scores it   scores (B,), ref_logprobs / old_logprobs / values (B, R)
      -> finalize_experience        KL -> token-level rewards (score on the last token, KL penalty when kl_mode
                                    is "reward") -> advantages and returns by the registered estimator

Everything here is a pure function of tensors and plain settings, so it is tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf_ray.algorithms import (build_kl_controller, compute_advantages, compute_kl, compute_token_level_rewards,
                                 masked_mean)
from rlhf_ray.algorithms.kl import KLController
from rlhf_ray.buffer.experience import Experience
from rlhf_ray.config.base import settings_from


@dataclass(frozen=True)
class AdvantageSettings:
    """What finalize_experience needs from the algorithm section (plain values, no config object); the field names
    are the section's."""

    advantage_estimator: str = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    norm_adv_by_std: bool = True
    kl_mode: str = "reward"          # "reward": penalty in the token rewards; "loss": the trainer adds a KL term
    kl_estimator: str = "k1"
    score_clip: float | None = None

    @classmethod
    def from_algorithm(cls, algo) -> "AdvantageSettings":
        """The algorithm section's fields of the same names, with the KL estimator resolved from kl_mode."""
        return settings_from(cls, algo, kl_estimator=algo.resolved_kl_estimator)


def kl_controller_from(algo) -> KLController:
    return build_kl_controller(algo.kl_ctrl_type, algo.kl_coef, algo.target_kl, algo.kl_horizon)


def build_experience(rollouts: Sequence, pad_token_id: int, group_offset: int = 0) -> Experience:
    """Pad the samples of `rollouts` (PromptRollout, in prompt order) into one Experience.

    Row order: prompt 0's samples, then prompt 1's, ... `group_ids` is `group_offset + prompt index`, so the
    responses to one prompt share an id. The response span keeps every generated token, the EOS / stop token
    included (the reward model and the trainer see what the sampler produced). A response with no tokens keeps
    one masked padding column so that shapes stay valid.
    """
    prompts, responses, logprobs, versions, groups = [], [], [], [], []
    for rollout in rollouts:
        for sample in rollout.samples:
            prompts.append(list(rollout.prompt_ids))
            responses.append(list(sample.response_ids))
            logprobs.append(list(sample.logprobs))
            versions.append(int(rollout.policy_version))
            groups.append(group_offset + int(rollout.prompt_index))
    if not prompts:
        raise ValueError("build_experience got no samples")
    batch = len(prompts)
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for r in responses))
    sequences = torch.full((batch, prompt_len + response_len), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros_like(sequences)
    response_mask = torch.zeros(batch, response_len, dtype=torch.long)
    rollout_logprobs = torch.zeros(batch, response_len, dtype=torch.float32)
    for row, (prompt, response, row_logprobs) in enumerate(zip(prompts, responses, logprobs)):
        start = prompt_len - len(prompt)                     # prompts end at column prompt_len - 1
        sequences[row, start:prompt_len] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, start:prompt_len] = 1
        if response:
            end = prompt_len + len(response)
            sequences[row, prompt_len:end] = torch.tensor(response, dtype=torch.long)
            attention_mask[row, prompt_len:end] = 1
            response_mask[row, :len(response)] = 1
            rollout_logprobs[row, :len(response)] = torch.tensor(row_logprobs, dtype=torch.float32)
    return Experience(sequences=sequences, attention_mask=attention_mask, response_mask=response_mask,
                      rollout_logprobs=rollout_logprobs, policy_version=torch.tensor(versions, dtype=torch.long),
                      group_ids=torch.tensor(groups, dtype=torch.long))


def scoring_batch(experience: Experience) -> dict:
    """What scoring workers need: sequences, attention_mask (B, P + R) and the response length R."""
    return {"sequences": experience.sequences, "attention_mask": experience.attention_mask,
            "response_len": experience.response_len}


def reward_model_inputs(experience: Experience, stop_ids: Sequence[int], end_ids: Sequence[int],
                        pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for the reward model, rendered as `rlhf-ray prepare` rendered its training pairs: prompt + response
    with a trailing stop token dropped, then the template's assistant line end `end_ids` (e.g. '<|im_end|>\\n').
    A truncated response (no stop token) gets the same ending, so every row ends the way the reward model learned
    to score. Returns right-padded sequences and attention_mask `(B, L')`.
    """
    prompt_len, stops, end = experience.prompt_len, set(int(i) for i in stop_ids), list(end_ids)
    rows = []
    for row in range(experience.batch_size):
        prompt = experience.sequences[row, :prompt_len][experience.attention_mask[row, :prompt_len].bool()]
        response = experience.sequences[row, prompt_len:][experience.response_mask[row].bool()].tolist()
        if response and response[-1] in stops:
            response = response[:-1]
        rows.append(prompt.tolist() + response + end)
    width = max(len(r) for r in rows)
    sequences = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros_like(sequences)
    for index, ids in enumerate(rows):
        sequences[index, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[index, :len(ids)] = 1
    return sequences, attention_mask


def finalize_experience(experience: Experience, settings: AdvantageSettings,
                        kl_coef: float) -> tuple[Experience, dict[str, float]]:
    """Token-level rewards, advantages and returns for a scored experience (`scores` set; `ref_logprobs` when
    kl_coef > 0; `values` for "gae"). The policy log-probs of the KL are `old_logprobs` when present, else the
    sampler's `rollout_logprobs` (both are the behaviour policy's).

    Returns the experience with `rewards`, `advantages`, `returns` set, and metrics: `reward/...` (shaping),
    `advantages/mean|std|min|max`, `returns/mean`, `rollout/...` lengths.
    """
    if experience.scores is None:
        raise ValueError("finalize_experience needs scores (one per response)")
    mask = experience.response_mask
    kl = None
    if kl_coef > 0 and experience.ref_logprobs is not None:
        behaviour = experience.old_logprobs if experience.old_logprobs is not None else experience.rollout_logprobs
        kl = compute_kl(behaviour, experience.ref_logprobs, settings.kl_estimator)
    in_reward = kl if settings.kl_mode == "reward" else None
    rewards, metrics = compute_token_level_rewards(experience.scores, mask, in_reward, kl_coef, settings.score_clip)
    if kl is not None and in_reward is None:
        # KL as a loss: still report the rollout's KL to the reference (the trainer reports its loss term).
        metrics["reward/kl"] = masked_mean(kl, mask, dim=-1).mean().item()
        metrics["reward/kl_sum"] = (kl * mask).sum(dim=-1).mean().item()
    advantages, returns = compute_advantages(settings.advantage_estimator, rewards, mask, values=experience.values,
                                             group_ids=experience.group_ids, gamma=settings.gamma,
                                             lam=settings.lam, norm_by_std=settings.norm_adv_by_std)
    kept = advantages[mask.bool()]
    lengths = mask.sum(dim=-1).float()
    metrics.update({
        "advantages/mean": kept.mean().item() if kept.numel() else 0.0,
        "advantages/std": kept.std().item() if kept.numel() > 1 else 0.0,
        "advantages/min": kept.min().item() if kept.numel() else 0.0,
        "advantages/max": kept.max().item() if kept.numel() else 0.0,
        "returns/mean": masked_mean(returns, mask).item(),
        "rollout/response_len_mean": lengths.mean().item(),
        "rollout/response_len_min": lengths.min().item(),
    })
    if experience.values is not None:
        metrics["value/rollout_mean"] = masked_mean(experience.values, mask).item()
    experience.rewards, experience.advantages, experience.returns = rewards, advantages, returns
    return experience, metrics
