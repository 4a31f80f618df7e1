"""One replay-buffer shard: an async Ray actor holding object refs of experience chunks for one trainer rank.

The shard never sees tensors. The driver puts each chunk into the object store once and hands the shard its ref
(wrapped in a list so that Ray passes the ref instead of resolving it); the trainer rank that owns the shard takes
the refs and fetches the chunks itself, from whichever node holds them.

    driver: ray.put(chunk) -> ref --reserve/commit--> shard (refs + policy versions) --take/sample--> rank: ray.get

Capacity counts samples, not chunks. `when_full="block"` gives backpressure: `reserve` waits (without blocking the
actor: it is async) until a consumer takes samples, a staleness eviction or `clear` frees space, or its timeout
passes. `when_full="evict_oldest"` makes room by dropping the oldest chunks instead (a replay buffer for
off-policy reuse). With `max_staleness=k`, a chunk made by policy version v is dropped once the current policy
version exceeds v + k.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray

WHEN_FULL = ("block", "evict_oldest")


@dataclass
class StoredChunk:
    ref: Any                 # ray.ObjectRef of an Experience
    num_samples: int
    policy_version: int
    put_time: float


class ReplayShard:
    """Async actor body; started through `ReplayBuffer` (see `ReplayShardActor`)."""

    def __init__(self, rank: int, capacity: int, max_staleness: int | None = None, when_full: str = "block"):
        if capacity < 1:
            raise ValueError(f"buffer capacity per shard must be >= 1 sample (got {capacity})")
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full={when_full!r} is unknown; expected one of {list(WHEN_FULL)}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None (got {max_staleness})")
        self.rank = rank
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.when_full = when_full
        self._chunks: deque[StoredChunk] = deque()
        self._stored = 0          # samples held
        self._reserved = 0        # samples promised to producers that have not committed yet
        self._policy_version = 0
        self._space_freed = asyncio.Condition()
        self._waiting = 0
        self._counters = {"put_samples": 0, "taken_samples": 0, "evicted_stale": 0, "evicted_full": 0,
                          "put_wait_s": 0.0, "put_timeouts": 0}

    # --- producer side ---------------------------------------------------------------------------------------
    async def reserve(self, num_samples: int, timeout_s: float | None = None) -> bool:
        """Claim room for `num_samples`; waits while the shard is full (mode "block"). False on timeout."""
        if num_samples > self.capacity:
            raise ValueError(f"a chunk of {num_samples} samples can never fit in shard {self.rank} of capacity "
                             f"{self.capacity}; raise the buffer capacity or put smaller batches")
        if self.when_full == "evict_oldest":
            self._evict_oldest_until_room(num_samples)
            self._reserved += num_samples
            return True
        start = time.monotonic()
        self._waiting += 1
        try:
            async with self._space_freed:
                await asyncio.wait_for(
                    self._space_freed.wait_for(lambda: self._used() + num_samples <= self.capacity), timeout_s)
                self._reserved += num_samples
            return True
        except asyncio.TimeoutError:
            self._counters["put_timeouts"] += 1
            return False
        finally:
            self._waiting -= 1
            self._counters["put_wait_s"] += time.monotonic() - start

    async def release(self, num_samples: int) -> None:
        """Give back a reservation that will not be committed."""
        self._reserved -= num_samples
        await self._notify_space()

    async def commit(self, wrapped_ref: list, num_samples: int, policy_version: int) -> None:
        """Store a chunk for which `reserve(num_samples)` succeeded. `wrapped_ref` is `[ref]`."""
        (ref,) = wrapped_ref
        self._reserved -= num_samples
        self._chunks.append(StoredChunk(ref, num_samples, policy_version, time.time()))
        self._stored += num_samples
        self._counters["put_samples"] += num_samples
        if self._evict_stale():
            await self._notify_space()

    # --- consumer side ---------------------------------------------------------------------------------------
    async def take(self, max_samples: int | None = None) -> list[tuple[list, int, int]]:
        """Remove and return whole chunks, oldest first, up to `max_samples` samples (all when None).

        Returns `[([ref], num_samples, policy_version), ...]`; at least one chunk when any is stored, even if it is
        larger than `max_samples`.
        """
        self._evict_stale()
        taken: list[tuple[list, int, int]] = []
        count = 0
        while self._chunks and (max_samples is None or count == 0
                                or count + self._chunks[0].num_samples <= max_samples):
            chunk = self._chunks.popleft()
            taken.append(([chunk.ref], chunk.num_samples, chunk.policy_version))
            count += chunk.num_samples
        self._stored -= count
        self._counters["taken_samples"] += count
        await self._notify_space()
        return taken

    async def sample(self, num_samples: int, seed: int | None = None) -> list[tuple[list, list[int]]]:
        """`num_samples` samples drawn uniformly without replacement, left in place (off-policy reuse).

        Returns `[([ref], row_indices), ...]` grouped by chunk. Asking for more than is stored is an error.
        """
        if self._evict_stale():
            await self._notify_space()
        if num_samples > self._stored:
            raise ValueError(f"shard {self.rank} holds {self._stored} samples; cannot sample {num_samples}")
        chosen = sorted(random.Random(seed).sample(range(self._stored), num_samples))
        picks: list[tuple[list, list[int]]] = []
        offset, cursor = 0, 0
        for chunk in self._chunks:
            rows = []
            while cursor < len(chosen) and chosen[cursor] < offset + chunk.num_samples:
                rows.append(chosen[cursor] - offset)
                cursor += 1
            if rows:
                picks.append(([chunk.ref], rows))
            offset += chunk.num_samples
        return picks

    # --- maintenance -----------------------------------------------------------------------------------------
    async def set_policy_version(self, version: int) -> int:
        """Record the current policy version; drop chunks now too stale. Returns how many samples were dropped."""
        self._policy_version = version
        before = self._counters["evicted_stale"]
        if self._evict_stale():
            await self._notify_space()
        return self._counters["evicted_stale"] - before

    async def clear(self) -> int:
        dropped = self._stored
        self._chunks.clear()
        self._stored = 0
        await self._notify_space()
        return dropped

    async def stats(self) -> dict[str, Any]:
        """Size, waiting producers, per-chunk (samples, version) pairs for staleness, and counters."""
        return {"rank": self.rank, "size": self._stored, "reserved": self._reserved, "capacity": self.capacity,
                "num_chunks": len(self._chunks), "waiting_puts": self._waiting,
                "policy_version": self._policy_version,
                "chunk_versions": [(c.num_samples, c.policy_version) for c in self._chunks],
                "oldest_put_time": self._chunks[0].put_time if self._chunks else None, **self._counters}

    async def node_id(self) -> str:
        """The Ray node this shard runs on (to check that it sits beside its trainer rank)."""
        return ray.get_runtime_context().get_node_id()

    # --- internals -------------------------------------------------------------------------------------------
    def _used(self) -> int:
        return self._stored + self._reserved

    def _evict_stale(self) -> bool:
        if self.max_staleness is None:
            return False
        oldest_allowed = self._policy_version - self.max_staleness
        kept = deque(chunk for chunk in self._chunks if chunk.policy_version >= oldest_allowed)
        dropped = self._stored - sum(chunk.num_samples for chunk in kept)
        if not dropped:
            return False
        self._chunks = kept
        self._stored -= dropped
        self._counters["evicted_stale"] += dropped
        return True

    def _evict_oldest_until_room(self, num_samples: int) -> None:
        while self._chunks and self._used() + num_samples > self.capacity:
            chunk = self._chunks.popleft()
            self._stored -= chunk.num_samples
            self._counters["evicted_full"] += chunk.num_samples

    async def _notify_space(self) -> None:
        async with self._space_freed:
            self._space_freed.notify_all()


# num_cpus=0: a shard only holds refs and must not take a CPU slot from the rank it sits beside.
ReplayShardActor = ray.remote(num_cpus=0, max_concurrency=1000)(ReplayShard)
