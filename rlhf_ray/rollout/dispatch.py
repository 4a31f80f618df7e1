"""Pure dispatch decisions, kept apart from Ray so that they can be read and tested alone.

The generator group splits a batch into chunks (contiguous prompt indices), keeps at most
`max_inflight_per_engine` chunks queued on each engine, and sends the next chunk to the usable engine with the
fewest outstanding prompts (ties: lowest rank). A chunk whose engine dies goes back to the front of the queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# engine status
READY = "ready"            # alive, holds the group's current policy version
RECOVERING = "recovering"  # died; Ray is restarting it (a probe call is pending)
STALE = "stale"            # alive but holds an older policy version (restarted): idle until the next weight sync
DEAD = "dead"              # gone for good (no restarts left)


def chunk_size_for(num_prompts: int, num_engines: int, requested: int) -> int:
    """Prompts per chunk: `requested`, or (0) one chunk per engine."""
    if requested > 0:
        return requested
    return max(1, math.ceil(num_prompts / max(1, num_engines)))


def split_into_chunks(indices: list[int], chunk_size: int) -> list[list[int]]:
    """Contiguous chunks of at most chunk_size indices, in order; nothing lost or duplicated."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    return [indices[start:start + chunk_size] for start in range(0, len(indices), chunk_size)]


@dataclass
class EngineLoad:
    rank: int
    status: str = READY
    inflight_chunks: int = 0
    inflight_prompts: int = 0
    completed_chunks: int = 0
    failures: int = 0
    extra: dict = field(default_factory=dict)


def pick_engine(engines: list[EngineLoad], max_inflight: int) -> EngineLoad | None:
    """The ready engine with the fewest outstanding prompts that can take another chunk, or None."""
    usable = [e for e in engines if e.status == READY and e.inflight_chunks < max_inflight]
    if not usable:
        return None
    return min(usable, key=lambda e: (e.inflight_prompts, e.rank))
