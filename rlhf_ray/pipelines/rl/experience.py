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
from typing import Callable, Sequence

import torch

from rlhf_ray.algorithms import (build_kl_controller, compute_advantages, compute_kl, compute_token_level_rewards,
                                 masked_mean)
from rlhf_ray.algorithms.kl import KLController
from rlhf_ray.algorithms.shaping import compute_overlong_penalty
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
    overlong_buffer_len: int = 0      # DAPO soft overlong punishment over the last N tokens before max_response_len
    overlong_penalty_factor: float = 1.0
    overlong_filter: bool = False     # truncated responses (finish reason "length") leave the loss
    max_response_len: int = 0         # the generator's max_new_tokens

    @classmethod
    def from_algorithm(cls, algo, max_response_len: int = 0) -> "AdvantageSettings":
        """The algorithm section's fields of the same names, with the KL estimator resolved from kl_mode."""
        return settings_from(cls, algo, kl_estimator=algo.resolved_kl_estimator, max_response_len=max_response_len)


def kl_controller_from(algo) -> KLController:
    return build_kl_controller(algo.kl_ctrl_type, algo.kl_coef, algo.target_kl, algo.kl_horizon)


class EpisodeKLController:
    """The KL coefficient when collection runs ahead of training (async mode; in sync mode the two coincide).

    `collecting` belongs to the collection, which runs the episodes in order: each collect step reads its
    coefficient there and updates it with the KL it measured, the same sequence of updates as in sync mode, however
    far collection runs ahead. `finish(e)` records its state after episode e's collection; `commit(e)`, called once
    episode e is trained, makes that state `trained`: the value that is logged with episode e and checkpointed
    with it, so a resume after e re-collects e + 1 with the coefficient the uninterrupted run used.
    """

    def __init__(self, algo) -> None:
        self.collecting, self.trained = kl_controller_from(algo), kl_controller_from(algo)
        self._finished: dict[int, dict[str, float]] = {}

    def finish(self, episode: int) -> None:
        self._finished[episode] = self.collecting.state_dict()

    def commit(self, episode: int) -> None:
        self.trained.load_state_dict(self._finished.pop(episode))

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Resume: both continue from the checkpointed (trained) state."""
        self.collecting.load_state_dict(state)
        self.trained.load_state_dict(state)


def build_experience(rollouts: Sequence, pad_token_id: int, group_offset: int = 0) -> Experience:
    """Pad the samples of `rollouts` (PromptRollout, in prompt order) into one Experience.

    Row order: prompt 0's samples, then prompt 1's, ... `group_ids` is `group_offset + prompt index`, so the
    responses to one prompt share an id. `extras["truncated"]` `(B,)` bool marks responses cut at max_new_tokens
    (finish reason "length"); with partial rollouts `extras["token_versions"]` `(B, R)` int64 is the policy version of
    each response token (0 on padding). The response span keeps every generated token, the EOS / stop token
    included (the reward model and the trainer see what the sampler produced). A response with no tokens keeps
    one masked padding column so that shapes stay valid.
    """
    prompts, responses, logprobs, versions, groups, truncated, token_versions = [], [], [], [], [], [], []
    for rollout in rollouts:
        for sample in rollout.samples:
            truncated.append(sample.finish_reason == "length")
            token_versions.append(sample.token_versions)
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
    extras = {"truncated": torch.tensor(truncated, dtype=torch.bool)}
    if all(row is not None for row in token_versions):                   # partial rollouts
        extras["token_versions"] = torch.zeros(batch, response_len, dtype=torch.long)
        for row, row_versions in enumerate(token_versions):
            extras["token_versions"][row, :len(row_versions)] = torch.tensor(row_versions, dtype=torch.long)
    return Experience(sequences=sequences, attention_mask=attention_mask, response_mask=response_mask,
                      rollout_logprobs=rollout_logprobs, policy_version=torch.tensor(versions, dtype=torch.long),
                      group_ids=torch.tensor(groups, dtype=torch.long), extras=extras)


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

    DAPO's overlong handling (settings): `overlong_buffer_len` > 0 adds the soft overlong punishment to the scores
    before shaping; `overlong_filter` removes truncated responses (`extras["truncated"]`) from `response_mask`
    after the advantages (they still count in their group's baseline, as in DAPO).

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
    scores, overlong_metrics = experience.scores, {}
    if settings.overlong_buffer_len > 0:
        penalty = compute_overlong_penalty(mask.sum(dim=-1), settings.max_response_len, settings.overlong_buffer_len,
                                           settings.overlong_penalty_factor)
        scores = scores + penalty
        overlong_metrics = {"reward/overlong_penalty_mean": penalty.mean().item(),
                            "reward/overlong_penalized_frac": (penalty < 0).float().mean().item()}
    rewards, metrics = compute_token_level_rewards(scores, mask, in_reward, kl_coef, settings.score_clip)
    metrics.update(overlong_metrics)
    if kl is not None and in_reward is None:
        # KL as a loss: still report the rollout's KL to the reference (the trainer reports its loss term).
        metrics["reward/kl"] = masked_mean(kl, mask, dim=-1).mean().item()
        metrics["reward/kl_sum"] = (kl * mask).sum(dim=-1).mean().item()
    advantages, returns = compute_advantages(settings.advantage_estimator, rewards, mask, values=experience.values,
                                             group_ids=experience.group_ids, gamma=settings.gamma,
                                             lam=settings.lam, norm_by_std=settings.norm_adv_by_std)
    lengths = mask.sum(dim=-1).float()
    if settings.overlong_filter:
        if "truncated" not in experience.extras:
            raise ValueError("overlong_filter needs extras['truncated'] (set by build_experience)")
        truncated = experience.extras["truncated"].bool()
        mask = experience.response_mask = mask * (~truncated).unsqueeze(-1).to(mask.dtype)
        advantages, returns = advantages * mask, returns * mask
        metrics["rollout/overlong_filtered_frac"] = truncated.float().mean().item()
    kept = advantages[mask.bool()]
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


def informative_rows(experience: Experience) -> torch.Tensor:
    """`(B,)` bool: rows whose group's scores are not all equal (a group of equal scores has zero advantage under
    every group estimator, so it carries no policy gradient)."""
    _, inverse = torch.unique(experience.group_ids, return_inverse=True)
    scores = experience.scores.double()
    groups = int(inverse.max()) + 1
    highest = torch.full((groups,), -torch.inf, dtype=scores.dtype).scatter_reduce(0, inverse, scores, "amax")
    lowest = torch.full((groups,), torch.inf, dtype=scores.dtype).scatter_reduce(0, inverse, scores, "amin")
    return (highest > lowest)[inverse]


def _first_groups(experience: Experience, count: int) -> Experience:
    """The rows of the first `count` groups (in row order)."""
    order = list(dict.fromkeys(experience.group_ids.tolist()))[:count]
    chosen = torch.isin(experience.group_ids, torch.tensor(order, dtype=experience.group_ids.dtype))
    return experience.select(chosen.nonzero().squeeze(-1))


def fill_informative_groups(make_batch: Callable[[int], Experience], groups_needed: int, max_rounds: int,
                            pad_token_id: int) -> tuple[Experience, dict[str, float]]:
    """DAPO's dynamic sampling: `make_batch(r)` generates and scores round r (an Experience with `scores` and
    `group_ids` distinct across rounds); groups whose scores are all equal are dropped and rounds continue until
    `groups_needed` groups remain, at most `max_rounds` rounds. The result has exactly `groups_needed` groups (the
    first ones found), so the buffer arithmetic holds. If the rounds run out, the shortfall is made up with dropped
    groups whose response_mask is all 0: they fill the batch but no token of theirs reaches a loss.

    Metrics: `dynamic_sampling/rounds`, `groups_kept`, `groups_dropped` (zero-variance groups generated),
    `extra_prompts` (prompts generated beyond the first round), `padded_groups`.
    """
    kept, dropped, generated = [], [], []
    while len(generated) < max_rounds and sum(_group_count(part) for part in kept) < groups_needed:
        batch = make_batch(len(generated))
        generated.append(_group_count(batch))
        informative = informative_rows(batch)
        kept.append(batch.select(informative.nonzero().squeeze(-1)))
        dropped.append(batch.select((~informative).nonzero().squeeze(-1)))
    found = min(sum(_group_count(part) for part in kept), groups_needed)
    parts = [_first_groups(Experience.concat(kept, pad_token_id), found)] if found else []
    if found < groups_needed:
        padding = _first_groups(Experience.concat(dropped, pad_token_id), groups_needed - found)
        padding.response_mask = torch.zeros_like(padding.response_mask)
        parts.append(padding)
    metrics = {"dynamic_sampling/rounds": float(len(generated)), "dynamic_sampling/groups_kept": float(found),
               "dynamic_sampling/groups_dropped": float(sum(_group_count(part) for part in dropped)),
               "dynamic_sampling/extra_prompts": float(sum(generated[1:])),
               "dynamic_sampling/padded_groups": float(groups_needed - found)}
    return Experience.concat(parts, pad_token_id), metrics


def _group_count(experience: Experience) -> int:
    return len(set(experience.group_ids.tolist()))
