"""ReplayBuffer: the driver-side store of an RL job's experience, one list of object refs per trainer data-parallel
rank, and `fetch_experience`, which a rank runs to turn its refs back into one Experience.

    buffer = ReplayBuffer(num_ranks=dp, samples_per_rank=256, max_staleness=1)
    buffer.put(experience)                         # collector (any thread): split per rank, each chunk ray.put once
    chunks = buffer.take(policy_version=v)         # controller: per rank, the refs of exactly one episode
    policy.call_split_async("ppo_update", chunks)  # rank i receives chunks[i] and, inside its actor,
    experience = fetch_experience(chunk_refs, pad_token_id)     # ray.get: object store -> rank, then concat
    tracker.log(buffer.metrics())

Data path: the driver already holds the batch it just scored; it splits it per rank and puts each chunk into the
object store exactly once. The buffer keeps (ref, samples, policy version) per chunk, never tensors. A rank's refs
travel inside a list, and Ray resolves only top-level ObjectRef arguments, so they reach the rank unresolved (not
through the driver) and the rank pulls the tensors itself.

Capacity is max_staleness + 1 episodes per rank (one in sync mode). The async collector (pipelines/rl/async_mode.py)
starts episode e only once the policy is at version e - max_staleness, so the buffer never needs more; a put that
would overflow means that gate is broken, and it raises at once, storing nothing, rather than waiting. `take`
checks the staleness of what it hands out against max_staleness and reports it in `metrics()`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import ray

from rlhf_ray.buffer.experience import Experience
from rlhf_ray.utils import split_evenly


@dataclass
class StoredChunk:
    ref: ray.ObjectRef           # an Experience in the object store
    num_samples: int
    policy_version: int          # the oldest policy version among its samples


class ReplayBuffer:
    """Thread-safe: the async collector thread puts while the main thread takes."""

    def __init__(self, num_ranks: int, samples_per_rank: int, max_staleness: int = 0, name: str = "replay"):
        """
        Args:
            num_ranks: trainer data-parallel ranks (one list of chunks each).
            samples_per_rank: what one rank trains on per episode; `take` hands out exactly this much.
            max_staleness: policy versions a sample may lag behind the policy that trains on it (0 in sync mode);
                the buffer holds max_staleness + 1 episodes.
        """
        if num_ranks < 1 or samples_per_rank < 1 or max_staleness < 0:
            raise ValueError(f"replay buffer {name!r} needs num_ranks >= 1, samples_per_rank >= 1 and "
                             f"max_staleness >= 0 (got {num_ranks}, {samples_per_rank}, {max_staleness})")
        self.name = name
        self.num_ranks = num_ranks
        self.samples_per_rank = samples_per_rank
        self.max_staleness = max_staleness
        self.capacity_per_rank = samples_per_rank * (max_staleness + 1)
        self._chunks: list[list[StoredChunk]] = [[] for _ in range(num_ranks)]
        self._assigned = [0] * num_ranks      # samples ever sent to each rank, for placing remainders
        self._lock = threading.Lock()
        self._last_take: dict[str, float] = {}

    # --- producer side -------------------------------------------------------------------------------------
    def put(self, experience: Experience) -> list[int]:
        """Split `experience` into contiguous per-rank chunks (sizes differ by at most one; the extra samples go to
        the ranks fed least so far), put each into the object store once, and store its ref. All or nothing: a put
        that would take a rank past capacity raises RuntimeError. Returns the samples each rank received."""
        version = experience.oldest_version()
        if version is None:
            raise ValueError(f"replay buffer {self.name!r}: experience without policy_version; every sample must "
                             f"record the policy version that generated it")
        with self._lock:
            sizes = self._chunk_sizes(experience.batch_size)
            held = self._held()
            over = [rank for rank in range(self.num_ranks) if held[rank] + sizes[rank] > self.capacity_per_rank]
            if over:
                raise RuntimeError(f"replay buffer {self.name!r}: putting {sizes} samples would take ranks {over} "
                                   f"past their capacity of {self.capacity_per_rank} (= samples_per_rank "
                                   f"{self.samples_per_rank} × (max_staleness {self.max_staleness} + 1)); they hold "
                                   f"{held}. The collector ran ahead of the staleness gate: this is a bug")
            for rank, chunk in enumerate(experience.split_sizes(sizes)):
                if len(chunk):
                    stored = StoredChunk(ray.put(chunk), len(chunk), chunk.oldest_version())
                    self._chunks[rank].append(stored)
                    self._assigned[rank] += len(chunk)
            return sizes

    def _chunk_sizes(self, total: int) -> list[int]:
        sizes = [len(part) for part in split_evenly(range(total), self.num_ranks)]     # larger first
        least_fed_first = sorted(range(self.num_ranks), key=lambda rank: (self._assigned[rank], rank))
        out = [0] * self.num_ranks
        for rank, size in zip(least_fed_first, sizes):
            out[rank] = size
        return out

    # --- consumer side -------------------------------------------------------------------------------------
    def take(self, policy_version: int) -> list[list[ray.ObjectRef]]:
        """Remove and return, per rank, the refs of exactly one episode (samples_per_rank samples, oldest chunks
        first) for the policy at `policy_version` to train on. Raises RuntimeError, removing nothing, when a rank
        holds too little, when its chunks do not end on the episode boundary, or when a chunk is more than
        max_staleness versions old."""
        with self._lock:
            counts = [self._episode_length(chunks) for chunks in self._chunks]
            if any(count is None for count in counts):
                raise RuntimeError(f"replay buffer {self.name!r}: ranks hold {self._held()} samples in chunks of "
                                   f"{[[c.num_samples for c in chunks] for chunks in self._chunks]}; each rank needs "
                                   f"exactly {self.samples_per_rank} for one episode")
            taken = [chunks[:count] for chunks, count in zip(self._chunks, counts)]
            ages = [(policy_version - c.policy_version, c.num_samples) for chunks in taken for c in chunks]
            oldest = max(age for age, _ in ages)
            if oldest > self.max_staleness:
                raise RuntimeError(f"replay buffer {self.name!r}: experience for policy version {policy_version} was "
                                   f"generated {oldest} versions earlier, more than max_staleness "
                                   f"{self.max_staleness}")
            held = sum(self._held())
            self._chunks = [chunks[count:] for chunks, count in zip(self._chunks, counts)]
            self._last_take = {
                "buffer/size": float(held),
                "buffer/fill": held / (self.capacity_per_rank * self.num_ranks),
                "rollout/staleness_mean": sum(age * n for age, n in ages) / sum(n for _, n in ages),
                "rollout/staleness_max": float(oldest),
            }
            return [[c.ref for c in chunks] for chunks in taken]

    def _episode_length(self, chunks: list[StoredChunk]) -> int | None:
        """How many of the oldest chunks make exactly one episode; None when no prefix does."""
        count = 0
        for index, chunk in enumerate(chunks):
            count += chunk.num_samples
            if count >= self.samples_per_rank:
                return index + 1 if count == self.samples_per_rank else None
        return None

    def _held(self) -> list[int]:
        return [sum(c.num_samples for c in chunks) for chunks in self._chunks]

    def sizes(self) -> list[int]:
        """Samples held per rank now."""
        with self._lock:
            return self._held()

    def metrics(self) -> dict[str, float]:
        """Measured at the last `take`, just before it removed the episode: `buffer/size` (samples held, that
        episode included: more than one episode means the collector ran ahead), `buffer/fill` (size / capacity),
        and the sample-weighted `rollout/staleness_mean` / `rollout/staleness_max` of the episode taken (policy
        versions between generation and training). Empty before the first take."""
        with self._lock:
            return dict(self._last_take)


def fetch_experience(chunk_refs: Sequence[ray.ObjectRef], pad_token_id: int = 0) -> Experience:
    """Run inside a trainer rank: get this rank's chunks from the object store and join them in order."""
    if not chunk_refs:
        raise RuntimeError("no experience to train on: the replay buffer handed this rank no chunks")
    chunks = ray.get(list(chunk_refs))
    return chunks[0] if len(chunks) == 1 else Experience.concat(chunks, pad_token_id)
