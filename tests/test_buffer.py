"""The replay buffer on the real session Ray cluster: every sample reaches exactly one rank (which fetches it itself),
ranks stay balanced, `take` hands out exactly one episode and checks staleness, capacity holds, and the async
collector's thread can put while the main thread takes."""

from __future__ import annotations

import time

import pytest
import ray

from rlhf_ray.buffer.replay_buffer import ReplayBuffer, fetch_experience
from rlhf_ray.pipelines.rl.async_mode import AsyncCollector
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.workers.base import RankedWorker
from rlhf_ray.workers.group import WorkerGroup
from test_buffer_experience import make_experience

pytestmark = pytest.mark.ray


class TrainerRankStandIn(RankedWorker):
    """Plays a trainer rank: receives its refs through WorkerGroup dispatch and fetches them in its own process."""

    def drain(self, chunk_refs):
        assert all(isinstance(ref, ray.ObjectRef) for ref in chunk_refs)     # Ray did not resolve them on the way
        return fetch_experience(chunk_refs, pad_token_id=0).extras["sample_id"].tolist()


def test_no_sample_lost_or_duplicated_and_ranks_balanced(ray_cluster):
    buffer = ReplayBuffer(num_ranks=3, samples_per_rank=10)
    ranks = WorkerGroup(TrainerRankStandIn, GroupSpec(num_workers=3, cpus_per_worker=0.1), name="buffer-ranks")
    try:
        # Batches whose sizes do not divide by 3 and differ in widths (concat pads them on the rank).
        next_id, put_ids = 0, []
        for step, size in enumerate([7, 5, 8, 10]):
            ids = list(range(next_id, next_id + size))
            next_id += size
            put_ids += ids
            received = buffer.put(make_experience(ids, prompt_len=2 + step, response_len=3 + step % 2))
            assert sum(received) == size and max(received) - min(received) <= 1
            assert max(buffer.sizes()) - min(buffer.sizes()) <= 1, buffer.sizes()   # remainders: least-fed ranks
        assert buffer.sizes() == [10, 10, 10]

        taken = ranks.call_split("drain", buffer.take(policy_version=0))
        assert [len(ids) for ids in taken] == [10, 10, 10]
        assert sorted(sum(taken, [])) == put_ids, "a sample was lost or duplicated"
        assert buffer.sizes() == [0, 0, 0]
        assert buffer.metrics() == {"buffer/size": 30.0, "buffer/fill": 1.0, "rollout/staleness_mean": 0.0,
                                    "rollout/staleness_max": 0.0}
    finally:
        ranks.shutdown()


def test_take_hands_out_exactly_one_episode_and_checks_staleness(ray_cluster):
    buffer = ReplayBuffer(num_ranks=2, samples_per_rank=4, max_staleness=1)
    assert buffer.capacity_per_rank == 8
    with pytest.raises(RuntimeError, match=r"each rank needs exactly 4"):
        buffer.take(policy_version=0)
    buffer.put(make_experience(range(0, 6), version=0))                  # 3 per rank: not an episode yet
    with pytest.raises(RuntimeError, match=r"hold \[3, 3\] samples"):
        buffer.take(policy_version=0)
    buffer.put(make_experience(range(6, 8), version=0))
    buffer.put(make_experience(range(8, 16), version=1))                  # the next episode, one version newer
    assert buffer.sizes() == [8, 8]
    with pytest.raises(RuntimeError, match="2 versions earlier, more than max_staleness 1"):
        buffer.take(policy_version=2)
    assert buffer.sizes() == [8, 8]                                       # a refused take removes nothing
    first = buffer.take(policy_version=1)
    assert [len(refs) for refs in first] == [2, 2]                        # the chunks of the first two puts
    assert sorted(fetch_experience(first[0] + first[1]).extras["sample_id"].tolist()) == list(range(8))
    metrics = buffer.metrics()
    assert metrics["buffer/size"] == 16.0 and metrics["buffer/fill"] == 1.0
    assert metrics["rollout/staleness_mean"] == 1.0 and metrics["rollout/staleness_max"] == 1.0

    # A chunk that straddles the episode boundary is refused rather than split or trained twice.
    buffer.take(policy_version=1)
    buffer.put(make_experience(range(20, 26), version=2))
    buffer.put(make_experience(range(26, 32), version=2))
    with pytest.raises(RuntimeError, match=r"chunks of \[\[3, 3\], \[3, 3\]\]"):
        buffer.take(policy_version=2)
    with pytest.raises(ValueError, match="without policy_version"):
        buffer.put(make_experience(range(2), version=None))


def test_put_past_capacity_fails_loudly_and_stores_nothing(ray_cluster):
    buffer = ReplayBuffer(num_ranks=2, samples_per_rank=2, max_staleness=0)
    buffer.put(make_experience(range(3)))                                 # [2, 1]
    with pytest.raises(RuntimeError, match=r"take ranks \[0\] past their capacity of 2"):
        buffer.put(make_experience(range(10, 12)))                        # [1, 1] would make [3, 2]
    assert buffer.sizes() == [2, 1]
    buffer.put(make_experience(range(3, 4)))                              # the least-fed rank gets the extra one
    assert buffer.sizes() == [2, 2]
    # Fewer samples than ranks: the empty chunks are simply not stored.
    small = ReplayBuffer(num_ranks=3, samples_per_rank=1)
    assert small.put(make_experience([7])) == [1, 0, 0]
    assert small.put(make_experience([8])) == [0, 1, 0]


def test_collector_thread_puts_while_the_main_thread_takes(ray_cluster):
    """The async mode's shape: AsyncCollector's thread puts episode e + 1 (two puts) while the main thread takes and
    'trains' on e. The staleness gate keeps the buffer within its max_staleness + 1 episodes."""
    episodes, per_rank, max_staleness = 6, 4, 1
    buffer = ReplayBuffer(num_ranks=2, samples_per_rank=per_rank, max_staleness=max_staleness)
    version = {"now": 0}

    def collect(episode: int) -> dict:
        for half in range(2):
            start = episode * 100 + half * per_rank
            buffer.put(make_experience(range(start, start + per_rank), version=version["now"]))
            time.sleep(0.01)
        return {}

    collector = AsyncCollector(collect, 0, episodes, max_staleness, version=0).start()
    trained, metrics = [], []
    try:
        for episode in range(episodes):
            collector.next(episode, timeout_s=60)
            if episode + 1 < episodes:           # let the collector get the next episode in before this one trains
                deadline = time.monotonic() + 60
                while sum(buffer.sizes()) < 2 * 2 * per_rank and time.monotonic() < deadline:
                    time.sleep(0.005)
            chunks = buffer.take(policy_version=version["now"])
            trained.append(sorted(fetch_experience(chunks[0] + chunks[1]).extras["sample_id"].tolist()))
            metrics.append(buffer.metrics())
            version["now"] += 1
            collector.set_version(version["now"])
    finally:
        collector.stop()
    assert trained == [sorted(range(e * 100, e * 100 + 2 * per_rank)) for e in range(episodes)]
    # Episode e + 1 was generated at version e, while e waited to train: one version old when trained, and the
    # buffer held both episodes (full) when e was taken.
    assert [m["rollout/staleness_max"] for m in metrics] == [0.0] + [1.0] * (episodes - 1)
    assert [m["buffer/fill"] for m in metrics] == [1.0] * (episodes - 1) + [0.5]
    assert buffer.sizes() == [0, 0]
