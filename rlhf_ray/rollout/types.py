"""What goes into a generator and what comes out: plain dataclasses that cross Ray boundaries cheaply.

A rollout is keyed by prompt index (the position of the prompt in the caller's batch), never by arrival order, so
that retries after an engine failure can neither lose nor duplicate a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class PromptChunk:
    """A slice of a batch sent to one engine: prompt indices and their (already length-checked) token ids."""

    indices: list[int]
    prompt_ids: list[list[int]]
    truncated: list[bool]
    sampling: dict[str, Any]
    seed_offset: int = 0

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Sample:
    """One completion of one prompt.

    response_ids: `(response_len,)` generated token ids; includes the EOS / stop token when one ended it.
    logprobs:     `(response_len,)` log-prob of each generated token under the sampling distribution
                  (see GeneratorSection.logprobs_mode), aligned with response_ids.
    finish_reason: 'stop' (EOS, stop token or stop string) or 'length' (max_new_tokens reached).
    token_versions: `(response_len,)` the policy version that generated each token, set by partial rollouts
                  (rollout/partial.py: a response continued across a weight sync); None = every token is the
                  rollout's policy_version.
    """

    response_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    token_versions: list[int] | None = None


@dataclass
class PromptRollout:
    """All samples of one prompt, stamped with the policy version and engine that produced them (with partial
    rollouts: the oldest version of any of their tokens, see Sample.token_versions)."""

    prompt_index: int
    prompt_ids: list[int]
    truncated: bool
    samples: list[Sample]
    policy_version: int
    engine_rank: int


@dataclass
class RolloutResult:
    """A whole batch, ordered by prompt index, plus what happened on the way (retries, truncations)."""

    rollouts: list[PromptRollout]
    retried_chunks: int = 0
    failed_engines: list[int] = field(default_factory=list)
    generate_seconds: float = 0.0
    segments: int = 1                   # engine calls per sample (partial rollouts generate in segments)
    syncs_crossed: int = 0              # weight syncs that happened while this batch was being generated

    def __len__(self) -> int:
        return len(self.rollouts)

    def __getitem__(self, index: int) -> PromptRollout:
        return self.rollouts[index]

    @property
    def policy_versions(self) -> set[int]:
        return {r.policy_version for r in self.rollouts}

    def metrics(self) -> dict[str, float]:
        """`rollout/...` metrics: counts, mean response length, finish reasons, truncations, retries."""
        samples = [s for r in self.rollouts for s in r.samples]
        lengths = [len(s.response_ids) for s in samples]
        n = max(1, len(samples))
        return {
            "rollout/prompts": float(len(self.rollouts)),
            "rollout/samples": float(len(samples)),
            "rollout/response_len_mean": sum(lengths) / n,
            "rollout/response_len_max": float(max(lengths, default=0)),
            "rollout/finish_stop_frac": sum(s.finish_reason == "stop" for s in samples) / n,
            "rollout/finish_length_frac": sum(s.finish_reason == "length" for s in samples) / n,
            "rollout/prompts_truncated": float(sum(r.truncated for r in self.rollouts)),
            "rollout/retried_chunks": float(self.retried_chunks),
            "perf/rollout_tokens_per_s": sum(lengths) / self.generate_seconds if self.generate_seconds else 0.0,
            **self._partial_metrics(samples),
        }

    def _partial_metrics(self, samples: list[Sample]) -> dict[str, float]:
        """`rollout/partial_...`: how much of the batch continued across a weight sync (partial rollouts only)."""
        if not any(s.token_versions is not None for s in samples):
            return {}
        resumed = [s for s in samples if s.token_versions and s.token_versions[-1] != s.token_versions[0]]
        newer = sum(sum(v != s.token_versions[0] for v in s.token_versions) for s in resumed)
        tokens = max(1, sum(len(s.response_ids) for s in samples))
        return {"rollout/partial_segments": float(self.segments),
                "rollout/partial_syncs_crossed": float(self.syncs_crossed),
                "rollout/partial_resumed_frac": len(resumed) / max(1, len(samples)),
                "rollout/partial_newer_token_frac": newer / tokens}


def apply_prompt_limit(prompts: Sequence[Sequence[int]], max_prompt_len: int,
                       policy: str) -> tuple[list[list[int]], list[bool]]:
    """Enforce max_prompt_len on token-id prompts.

    policy 'left' keeps the last max_prompt_len tokens (a chat prompt ends with the assistant header, which must
    survive) and flags the prompt as truncated; 'refuse' raises ValueError naming the first offending prompt.
    Empty prompts are refused under both policies (an engine cannot start from nothing).
    Returns (prompt_ids, truncated) in input order.
    """
    kept, truncated = [], []
    for index, ids in enumerate(prompts):
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
        if len(ids) > max_prompt_len:
            if policy == "refuse":
                raise ValueError(f"prompt {index} has {len(ids)} tokens > max_prompt_len ({max_prompt_len}); "
                                 f"raise --max_prompt_len, shorten it, or set --prompt_truncation left")
            if policy != "left":
                raise ValueError(f"prompt_truncation must be 'left' or 'refuse' (got {policy!r})")
            ids = ids[-max_prompt_len:]
            truncated.append(True)
        else:
            truncated.append(False)
        kept.append(ids)
    return kept, truncated


def request_seed(base_seed: int | None, seed_offset: int, prompt_index: int) -> int | None:
    """A per-prompt sampling seed that depends only on (base seed, call offset, prompt index), not on the engine."""
    if base_seed is None:
        return None
    return (base_seed * 1_000_003 + seed_offset * 7_919 + prompt_index) % (2**31 - 1)
