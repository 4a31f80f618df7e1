"""Reference log-probs scored chunk by chunk while the rest of the batch still generates.

    reference = ChunkReference(start, pad_token_id)        # start(scoring batch) -> the reference pass's refs
    generators.generate(prompts, on_chunk=reference.submit) # each finished chunk starts its reference pass at once
    experience.ref_logprobs = reference.result(rollouts, experience.response_len)      # (B, R), rows in batch order

The reference model is frozen and scores each response on its own, so a chunk an engine has returned can be scored
while other engines still generate; the controller then waits only for the last chunk's pass. A chunk is padded on
its own (its longest prompt and response), which changes nothing but the padding: the values of the response
tokens are the ones a pass over the whole batch gives (to float rounding; exactly so with one chunk, the default
of one engine). Positions past a response's end hold 0 (the loss and the KL never read them).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from rlhf_ray.pipelines.rl.experience import build_experience, scoring_batch
from rlhf_ray.rollout.types import PromptRollout


class ChunkReference:
    """The pending reference passes of one generate call, one per chunk."""

    def __init__(self, start: Callable[[dict], list], pad_token_id: int,
                 get: Callable[[list], list] | None = None) -> None:
        """start: scoring batch -> the pass's pending results; get: pending results -> tensors (ray.get)."""
        self.start, self.pad_token_id, self.get = start, pad_token_id, get or _ray_get
        self._pending: list[tuple[list[PromptRollout], list]] = []

    def submit(self, rollouts: Sequence[PromptRollout]) -> None:
        """Start the reference pass over one chunk's finished rollouts (returns at once)."""
        rollouts = list(rollouts)
        self._pending.append((rollouts, self.start(scoring_batch(build_experience(rollouts, self.pad_token_id)))))

    def result(self, rollouts: Sequence[PromptRollout], response_len: int) -> torch.Tensor:
        """Wait for every chunk; the log-probs `(B, response_len)` in the row order of build_experience(rollouts)
        (each prompt submitted exactly once)."""
        first_row, row = {}, 0
        for rollout in rollouts:
            first_row[rollout.prompt_index] = row
            row += len(rollout.samples)
        out, filled = None, set()
        for chunk, refs in self._pending:
            values = torch.cat(self.get(refs))
            if out is None:
                out = torch.zeros(row, response_len, dtype=values.dtype)
            chunk_row = 0
            for rollout in chunk:
                assert rollout.prompt_index not in filled, f"prompt {rollout.prompt_index} scored twice"
                filled.add(rollout.prompt_index)
                for offset, sample in enumerate(rollout.samples):
                    length = len(sample.response_ids)
                    out[first_row[rollout.prompt_index] + offset, :length] = values[chunk_row, :length]
                    chunk_row += 1
        missing = [r.prompt_index for r in rollouts if r.prompt_index not in filled]
        assert not missing, f"prompts {missing[:8]} got no reference pass"
        return out


def _ray_get(refs: list) -> list:
    import ray

    return ray.get(refs)
