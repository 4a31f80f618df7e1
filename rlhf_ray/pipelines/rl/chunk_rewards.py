"""Text rewards scored chunk by chunk while the rest of the batch still generates.

    rewards = ChunkRewards(source, texts_of)                 # texts_of(rollouts) -> RewardBatch of their samples
    generators.generate(prompts, on_chunk=rewards.submit)    # each finished chunk starts scoring at once
    result = rewards.result(rollouts)                        # one RewardResult, rows in rollout order

A text source (rule, math checker, remote) needs only a finished response, so a chunk that an engine has returned
can be scored while the other engines still generate; the controller then waits only for the last chunk's
scoring. The combined result is what one call on the whole batch gives: rewards in row order (prompt-major, each
prompt's samples in order), `reward/mean|std|min|max` over the whole batch, and the source's own metrics as the
sample-weighted mean of the chunks' values (they are batch means or fractions). The reward-model source reads
token rows of the padded batch, so it keeps scoring the whole batch after generation.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Callable, Sequence

from rlhf_ray.rewards.base import RewardBatch, RewardResult, RewardSource, summarize_rewards
from rlhf_ray.rollout.types import PromptRollout


class ChunkRewards:
    """The pending reward futures of one generate call, one per chunk."""

    def __init__(self, source: RewardSource, texts_of: Callable[[Sequence[PromptRollout]], RewardBatch]) -> None:
        assert not source.reads_tokens, "a token-reading source scores the padded batch, not chunks"
        self.source, self.texts_of = source, texts_of
        self._pending: list[tuple[list[PromptRollout], RewardBatch, Future]] = []
        self.texts: RewardBatch | None = None      # after result(): the whole batch's texts, in row order

    def submit(self, rollouts: Sequence[PromptRollout]) -> None:
        """Start scoring one chunk's finished rollouts (returns at once)."""
        rollouts = list(rollouts)
        texts = self.texts_of(rollouts)
        self._pending.append((rollouts, texts, self.source.score_async(texts)))

    def result(self, rollouts: Sequence[PromptRollout]) -> RewardResult:
        """Wait for every chunk and return the rewards of `rollouts`' samples in row order (each prompt submitted
        exactly once), with the batch's metrics; `self.texts` is then the batch's texts in the same order."""
        by_prompt: dict[int, list[float]] = {}
        texts_by_prompt: dict[int, list[tuple]] = {}
        weighted: dict[str, float] = {}
        total = 0
        for chunk, texts, future in self._pending:
            scored = future.result()
            rewards = iter(scored.rewards)
            rows = iter(zip(texts.prompts, texts.responses, texts.gt_answers))
            for rollout in chunk:
                assert rollout.prompt_index not in by_prompt, f"prompt {rollout.prompt_index} scored twice"
                by_prompt[rollout.prompt_index] = [next(rewards) for _ in rollout.samples]
                texts_by_prompt[rollout.prompt_index] = [next(rows) for _ in rollout.samples]
            count = len(scored.rewards)
            for key, value in scored.metrics.items():
                weighted[key] = weighted.get(key, 0.0) + value * count
            total += count
        missing = [r.prompt_index for r in rollouts if r.prompt_index not in by_prompt]
        assert not missing, f"prompts {missing[:8]} were never scored"
        rewards = [reward for rollout in rollouts for reward in by_prompt[rollout.prompt_index]]
        ordered = [row for rollout in rollouts for row in texts_by_prompt[rollout.prompt_index]]
        self.texts = RewardBatch(*map(list, zip(*ordered))) if ordered else RewardBatch([], [], [])
        metrics = {key: value / max(1, total) for key, value in weighted.items()}
        return RewardResult(rewards, {**metrics, **summarize_rewards(rewards)})
