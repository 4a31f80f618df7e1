"""Partial rollouts: a batch generated in bounded segments, so that a weight sync can happen between two of them.

    batch = PartialBatch(prompt_ids, truncated, n_samples=4, max_new_tokens=256, segment_tokens=32, max_resumes=1)
    while batch.unfinished:
        prompts, max_tokens = batch.next_segment()      # prompt + response so far, one per unfinished sample
        batch.absorb(segment_rollouts)                  # what the engines returned (n = 1 each), same order
        ... a weight sync may run here when batch.may_cross_sync()
    rollouts = batch.rollouts(decode)                   # one PromptRollout per prompt, n samples each, in order

A sample continues from its prompt plus the tokens it has so far; each segment appends its tokens, the sampler's
log-probs of them and the policy version of the engine that produced them (Sample.token_versions). The log-probs
are therefore exactly the behaviour policy's, token by token, whichever weights produced which part. A sample ends
at a stop (EOS / stop token; finish reason 'stop') or with max_new_tokens tokens ('length'). Every unfinished
sample has produced exactly segment_tokens per segment, so one segment's max_tokens is the same for all of them.

A sample resumes (continues under newer weights) at most max_resumes times: while one that has used them all is
unfinished, may_cross_sync() is False and a waiting sync waits for it. Every sample is owned by exactly one slot
from the first segment to the last, so none is lost or duplicated (asserted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from rlhf_ray.rollout.types import PromptRollout, Sample


@dataclass
class _Slot:
    """One sample of one prompt being generated."""

    prompt_index: int
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)
    first_version: int | None = None
    finish_reason: str | None = None     # None while unfinished
    text: str | None = None              # the engine's text while the sample has one segment
    segments: int = 0
    resumes: int = 0
    engine_rank: int = -1


class PartialBatch:
    """The continuation bookkeeping of one generate call (no Ray, no engine: tested alone)."""

    def __init__(self, prompt_ids: Sequence[Sequence[int]], truncated: Sequence[bool], n_samples: int,
                 max_new_tokens: int, segment_tokens: int, max_resumes: int) -> None:
        if segment_tokens < 1 or max_resumes < 0:
            raise ValueError(f"segment_tokens must be >= 1 and max_resumes >= 0 (got {segment_tokens}, "
                             f"{max_resumes})")
        self.prompt_ids = [list(ids) for ids in prompt_ids]
        self.truncated = list(truncated)
        self.n_samples, self.max_new_tokens = n_samples, max_new_tokens
        self.segment_tokens, self.max_resumes = segment_tokens, max_resumes
        # prompt-major, as the engines return them: prompt 0's n samples, then prompt 1's, ...
        self.slots = [_Slot(index) for index in range(len(self.prompt_ids)) for _ in range(n_samples)]
        self.segments = 0
        self._pending: list[_Slot] = []

    @property
    def unfinished(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.finish_reason is None]

    def next_segment(self) -> tuple[list[list[int]], int]:
        """The continuation prompts (prompt + response so far) of the unfinished samples, in slot order, and the
        max_tokens of this segment."""
        assert not self._pending, "next_segment called twice without absorb"
        self._pending = self.unfinished
        assert self._pending, "next_segment on a finished batch"
        done = {len(slot.response_ids) for slot in self._pending}
        assert len(done) == 1, f"unfinished samples at different lengths {sorted(done)}"
        max_tokens = min(self.segment_tokens, self.max_new_tokens - done.pop())
        return [self.prompt_ids[slot.prompt_index] + slot.response_ids for slot in self._pending], max_tokens

    def absorb(self, rollouts: Sequence[PromptRollout]) -> None:
        """Append one segment: rollouts[j] (one sample) continues the j-th prompt of next_segment()."""
        pending, self._pending = self._pending, []
        assert len(rollouts) == len(pending), f"{len(rollouts)} segment results for {len(pending)} samples"
        for slot, rollout in zip(pending, rollouts):
            assert len(rollout.samples) == 1, "a continuation is one sample"
            sample, version = rollout.samples[0], int(rollout.policy_version)
            if slot.first_version is None:
                slot.first_version, slot.engine_rank = version, rollout.engine_rank
            elif version != (slot.token_versions[-1] if slot.token_versions else slot.first_version):
                slot.resumes += 1
            assert slot.resumes <= self.max_resumes, "a sample crossed more weight syncs than max_resumes"
            slot.response_ids += sample.response_ids
            slot.logprobs += sample.logprobs
            slot.token_versions += [version] * len(sample.response_ids)
            slot.text = sample.text if slot.segments == 0 else None
            slot.segments += 1
            if sample.finish_reason != "length":
                slot.finish_reason = sample.finish_reason
            elif len(slot.response_ids) >= self.max_new_tokens:
                slot.finish_reason = "length"
        self.segments += 1

    def may_cross_sync(self) -> bool:
        """True when every unfinished sample may still continue under newer weights."""
        return all(slot.resumes < self.max_resumes for slot in self.unfinished)

    def rollouts(self, decode: Callable[[list[list[int]]], list[str]]) -> list[PromptRollout]:
        """One PromptRollout per prompt (its policy_version: the oldest of its tokens). `decode` turns the
        responses made of several segments into text in one call (segment texts do not concatenate exactly when
        a character spans two tokens)."""
        assert not self.unfinished, "rollouts() before every sample finished"
        joined = [slot for slot in self.slots if slot.text is None]
        for slot, text in zip(joined, decode([slot.response_ids for slot in joined]) if joined else []):
            slot.text = text
        result = []
        for index, ids in enumerate(self.prompt_ids):
            slots = self.slots[index * self.n_samples:(index + 1) * self.n_samples]
            assert all(slot.prompt_index == index for slot in slots)
            samples = [Sample(slot.response_ids, slot.text, slot.logprobs, slot.finish_reason, slot.token_versions)
                       for slot in slots]
            result.append(PromptRollout(index, ids, self.truncated[index], samples,
                                        min(slot.first_version for slot in slots), slots[0].engine_rank))
        return result
