"""ReplayBuffer: the driver-side handle of N replay shards, one per trainer data-parallel rank.

    buffer = ReplayBuffer(num_shards=dp_size, capacity_per_shard=256, max_staleness=1,
                          placement_hints=[node_id_of_rank_0, node_id_of_rank_1])
    buffer.put(experience)                 # split into balanced chunks, each ray.put once, refs to the shards
    policy_group.call_all("train_on_shard", ...)  # each rank: take_experience(buffer.shard(rank)) and train
    buffer.set_policy_version(step)        # after weight sync: drops chunks older than max_staleness versions
    tracker.log(buffer.metrics())

Data path: the driver (which already holds the batch it just scored) splits it per shard and puts each chunk into
the object store exactly once; shards only keep refs; the rank that owns a shard pulls its chunks with `ray.get`
directly from the object store (`take_experience` / `sample_experience` run inside the trainer actor).

Puts are all-or-nothing: room is reserved on every shard first (waiting while full = backpressure), and only
then are the chunks stored; when a reservation times out the others are released and `TimeoutError` is raised.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlhf_ray.buffer.experience import Experience, balanced_sizes
from rlhf_ray.buffer.shard import ReplayShardActor


class ReplayBuffer:
    """Driver-side handle: put, take/sample per rank, clear, versioning and metrics over the shards."""

    def __init__(self, num_shards: int, capacity_per_shard: int, *, max_staleness: int | None = None,
                 when_full: str = "block", placement_hints: Sequence[Any] | None = None, pad_token_id: int = 0,
                 name: str = "replay"):
        """
        Args:
            num_shards: one per trainer data-parallel rank.
            capacity_per_shard: samples a shard holds before puts wait ("block") or evict ("evict_oldest").
            max_staleness: drop chunks made more than this many policy versions ago; None keeps them.
            when_full: "block" (backpressure) or "evict_oldest" (replay-style retention).
            placement_hints: one per shard: a node id (soft node affinity: beside its rank, elsewhere if that node
                is gone), a Ray scheduling strategy (e.g. the rank's placement-group bundle), or None.
            pad_token_id: pads `sequences` when chunks of different widths are concatenated.
        """
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1 (got {num_shards}); use one shard per data-parallel rank")
        if placement_hints is not None and len(placement_hints) != num_shards:
            raise ValueError(f"placement_hints has {len(placement_hints)} entries for {num_shards} shards; give "
                             f"one per shard (None where any node will do)")
        self.num_shards = num_shards
        self.capacity_per_shard = capacity_per_shard
        self.pad_token_id = pad_token_id
        self.name = name
        self._policy_version = 0
        self._assigned = [0] * num_shards  # samples ever sent to each shard, for balancing remainders
        self.shards = []
        for rank in range(num_shards):
            hint = placement_hints[rank] if placement_hints is not None else None
            options: dict[str, Any] = {}
            if isinstance(hint, str):
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=hint, soft=True)
            elif hint is not None:
                options["scheduling_strategy"] = hint
            self.shards.append(ReplayShardActor.options(**options).remote(
                rank, capacity_per_shard, max_staleness=max_staleness, when_full=when_full))

    # --- producer side ---------------------------------------------------------------------------------------
    def put(self, experience: Experience, policy_version: int | None = None,
            timeout_s: float | None = None) -> list[int]:
        """Split `experience` over the shards (sizes differ by at most one; the extra samples go to the shards
        that have received the fewest so far) and store it. Blocks while shards are full. Returns the chunk
        size each shard received.

        `policy_version` defaults to the experience's oldest `policy_version`, else the buffer's current version.
        """
        sizes = self._balanced_sizes(experience.batch_size)
        chunks = experience.split_sizes(sizes)
        return self._store(list(enumerate(chunks)), policy_version, timeout_s)

    def put_per_rank(self, chunks: Sequence[Experience], policy_version: int | None = None,
                     timeout_s: float | None = None) -> list[int]:
        """Store chunk i in shard i, when the caller has already arranged the data per rank."""
        if len(chunks) != self.num_shards:
            raise ValueError(f"put_per_rank got {len(chunks)} chunks for {self.num_shards} shards")
        return self._store(list(enumerate(chunks)), policy_version, timeout_s)

    def _balanced_sizes(self, total: int) -> list[int]:
        sizes = balanced_sizes(total, self.num_shards)
        # balanced_sizes puts the extra samples first; hand them instead to the least-fed shards.
        order = sorted(range(self.num_shards), key=lambda rank: (self._assigned[rank], rank))
        ranked = sorted(sizes, reverse=True)
        out = [0] * self.num_shards
        for rank, size in zip(order, ranked):
            out[rank] = size
        return out

    def _store(self, targets: list[tuple[int, Experience]], policy_version: int | None,
               timeout_s: float | None) -> list[int]:
        targets = [(rank, chunk) for rank, chunk in targets if chunk.batch_size > 0]
        too_big = [chunk.batch_size for _, chunk in targets if chunk.batch_size > self.capacity_per_shard]
        if too_big:
            raise ValueError(f"replay buffer {self.name!r}: a chunk of {max(too_big)} samples can never fit in a "
                             f"shard of capacity_per_shard={self.capacity_per_shard}; raise the capacity or put "
                             f"smaller batches")
        reservations = [self.shards[rank].reserve.remote(chunk.batch_size, timeout_s) for rank, chunk in targets]
        granted = ray.get(reservations)
        if not all(granted):
            ray.get([self.shards[rank].release.remote(chunk.batch_size)
                     for (rank, chunk), ok in zip(targets, granted) if ok])
            full = [rank for (rank, _), ok in zip(targets, granted) if not ok]
            raise TimeoutError(
                f"replay buffer {self.name!r}: shards {full} stayed full for {timeout_s}s (capacity "
                f"{self.capacity_per_shard} samples each, sizes {self.sizes()}); nothing was stored. The trainers "
                f"are not taking experience fast enough: raise capacity_per_shard or the timeout, or check them")
        commits = []
        for rank, chunk in targets:
            version = policy_version
            if version is None:
                version = chunk.oldest_version()
            if version is None:
                version = self._policy_version
            ref = ray.put(chunk)  # the one copy into the object store; shards and ranks only pass the ref
            commits.append(self.shards[rank].commit.remote([ref], chunk.batch_size, int(version)))
            self._assigned[rank] += chunk.batch_size
        ray.get(commits)
        sizes = [0] * self.num_shards
        for rank, chunk in targets:
            sizes[rank] += chunk.batch_size
        return sizes

    # --- consumer side (driver convenience; trainer ranks call the module functions with `shard(rank)`) ------
    def shard(self, rank: int):
        """The actor handle of shard `rank`, to hand to that trainer rank."""
        return self.shards[rank]

    def take(self, rank: int, max_samples: int | None = None) -> Experience | None:
        return take_experience(self.shards[rank], max_samples, self.pad_token_id)

    def sample(self, rank: int, num_samples: int, seed: int | None = None) -> Experience:
        return sample_experience(self.shards[rank], num_samples, seed, self.pad_token_id)

    # --- maintenance -----------------------------------------------------------------------------------------
    def set_policy_version(self, version: int) -> int:
        """Record the policy version now being trained/generated; returns samples evicted as too stale."""
        self._policy_version = version
        return sum(ray.get([shard.set_policy_version.remote(version) for shard in self.shards]))

    @property
    def policy_version(self) -> int:
        return self._policy_version

    def clear(self) -> int:
        """Drop everything; returns how many samples were dropped."""
        return sum(ray.get([shard.clear.remote() for shard in self.shards]))

    def sizes(self) -> list[int]:
        return [stats["size"] for stats in self.shard_stats()]

    def shard_stats(self) -> list[dict[str, Any]]:
        return ray.get([shard.stats.remote() for shard in self.shards])

    def metrics(self) -> dict[str, float]:
        """`buffer/...` metrics: sizes, waiting producers, staleness (in policy versions, sample-weighted, against
        the current version), age of the oldest chunk, and cumulative eviction/wait counters."""
        stats = self.shard_stats()
        sizes = [s["size"] for s in stats]
        staleness = [(count, self._policy_version - version) for s in stats for count, version in s["chunk_versions"]]
        held = sum(count for count, _ in staleness)
        oldest = [s["oldest_put_time"] for s in stats if s["oldest_put_time"] is not None]
        return {
            "buffer/size": float(sum(sizes)),
            "buffer/size_min": float(min(sizes)),
            "buffer/size_max": float(max(sizes)),
            "buffer/fill": sum(sizes) / (self.capacity_per_shard * self.num_shards),
            "buffer/waiting_puts": float(sum(s["waiting_puts"] for s in stats)),
            "buffer/staleness_mean": sum(c * age for c, age in staleness) / held if held else 0.0,
            "buffer/staleness_max": float(max((age for _, age in staleness), default=0)),
            "buffer/age_s_max": time.time() - min(oldest) if oldest else 0.0,
            "buffer/evicted_stale": float(sum(s["evicted_stale"] for s in stats)),
            "buffer/evicted_full": float(sum(s["evicted_full"] for s in stats)),
            "buffer/put_wait_s": float(sum(s["put_wait_s"] for s in stats)),
            "buffer/put_timeouts": float(sum(s["put_timeouts"] for s in stats)),
        }

    def shutdown(self) -> None:
        for shard in self.shards:
            ray.kill(shard)
        self.shards = []


def take_experience(shard, max_samples: int | None = None, pad_token_id: int = 0) -> Experience | None:
    """Take chunks from `shard` (oldest first, up to `max_samples`) and fetch them here. None when empty.

    Run it inside the trainer rank that owns the shard, so the tensors travel object store -> rank directly.
    """
    entries = ray.get(shard.take.remote(max_samples))
    if not entries:
        return None
    chunks = ray.get([wrapped[0] for wrapped, _, _ in entries])
    return chunks[0] if len(chunks) == 1 else Experience.concat(chunks, pad_token_id)


def sample_experience(shard, num_samples: int, seed: int | None = None, pad_token_id: int = 0) -> Experience:
    """Draw `num_samples` samples from `shard` uniformly without replacement, leaving them stored."""
    picks = ray.get(shard.sample.remote(num_samples, seed))
    chunks = ray.get([wrapped[0] for wrapped, _ in picks])
    selected = [chunk.select(rows) for chunk, (_, rows) in zip(chunks, picks)]
    return selected[0] if len(selected) == 1 else Experience.concat(selected, pad_token_id)
