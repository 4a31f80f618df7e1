"""The distributed replay buffer on the real session Ray cluster: every sample reaches exactly one rank, ranks stay
balanced, a full buffer blocks producers until a consumer frees room, and stale experience is evicted."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import ray
from ray import cloudpickle

from rlhf_ray.buffer import ReplayBuffer, take_experience
from test_buffer_experience import make_experience

pytestmark = pytest.mark.ray

# The consumer actor below lives in this test module, which Ray workers cannot import: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote(num_cpus=0)
class TrainerRankStandIn:
    """Plays a trainer rank: pulls its own shard inside its own process, as the real trainer does."""

    def __init__(self, shard):
        self.shard = shard

    def drain(self, max_samples=None):
        experience = take_experience(self.shard, max_samples)
        return [] if experience is None else experience.extras["sample_id"].tolist()


def wait_until(condition, what: str, deadline_s: float = 60.0):
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_no_sample_lost_or_duplicated_and_ranks_balanced(ray_cluster):
    node_id = ray.get_runtime_context().get_node_id()
    buffer = ReplayBuffer(num_shards=3, capacity_per_shard=100, placement_hints=[node_id, None, node_id])
    ranks = [TrainerRankStandIn.remote(buffer.shard(rank)) for rank in range(3)]
    try:
        # Batches whose sizes do not divide by 3 and differ in widths (concat pads them on the rank).
        batch_sizes, next_id, put_ids = [7, 5, 8, 1, 10], 0, []
        for step, size in enumerate(batch_sizes):
            ids = list(range(next_id, next_id + size))
            next_id += size
            put_ids += ids
            received = buffer.put(make_experience(ids, prompt_len=2 + step, response_len=3 + step % 2))
            assert sum(received) == size and max(received) - min(received) <= 1
        sizes = buffer.sizes()
        assert sum(sizes) == len(put_ids) == 31
        assert max(sizes) - min(sizes) <= 1, sizes  # remainders went to the least-fed shards
        assert buffer.metrics()["buffer/size"] == 31.0

        taken = ray.get([rank.drain.remote() for rank in ranks])
        assert [len(ids) for ids in taken] == sizes
        everything = [sample_id for ids in taken for sample_id in ids]
        assert sorted(everything) == put_ids, "a sample was lost or duplicated"
        assert buffer.sizes() == [0, 0, 0]
        assert ray.get(buffer.shard(0).node_id.remote()) == node_id
    finally:
        buffer.shutdown()


def test_full_buffer_blocks_the_producer_until_a_rank_takes(ray_cluster):
    buffer = ReplayBuffer(num_shards=2, capacity_per_shard=4)
    rank0 = TrainerRankStandIn.remote(buffer.shard(0))
    try:
        buffer.put(make_experience(range(0, 8)))
        assert buffer.sizes() == [4, 4]

        # With a timeout the put gives up, and stores nothing (all-or-nothing).
        with pytest.raises(TimeoutError, match="stayed full"):
            buffer.put(make_experience(range(100, 104)), timeout_s=0.2)
        assert buffer.sizes() == [4, 4]
        assert all(stats["reserved"] == 0 for stats in buffer.shard_stats())

        # Without one it blocks: the shards report a waiting producer and the put does not return.
        finished = threading.Event()
        errors = []

        def produce():
            try:
                buffer.put(make_experience(range(200, 204)))
            except Exception as error:  # surfaced by the assertion below
                errors.append(error)
            finished.set()

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        wait_until(lambda: buffer.metrics()["buffer/waiting_puts"] == 2.0, "the put to wait on both shards")
        assert not finished.is_set()

        # Rank 0 frees its shard: still blocked on shard 1 (the put needs room on both).
        assert sorted(ray.get(rank0.drain.remote())) == [0, 1, 2, 3]
        wait_until(lambda: buffer.metrics()["buffer/waiting_puts"] == 1.0, "shard 0 to grant its reservation")
        assert not finished.is_set()

        # Shard 1 frees room too: the put completes.
        assert sorted(buffer.take(1).extras["sample_id"].tolist()) == [4, 5, 6, 7]
        assert finished.wait(60), "the put stayed blocked after both shards had room"
        assert not errors, errors
        assert buffer.sizes() == [2, 2]
        assert buffer.metrics()["buffer/put_timeouts"] >= 1.0
    finally:
        buffer.shutdown()


def test_staleness_eviction_and_sampling(ray_cluster):
    buffer = ReplayBuffer(num_shards=1, capacity_per_shard=64, max_staleness=1)
    try:
        buffer.put(make_experience(range(0, 4), version=0))
        buffer.put(make_experience(range(10, 14), version=1))
        buffer.put(make_experience(range(20, 24)), policy_version=2)
        assert buffer.set_policy_version(2) == 4  # version 0 is 2 versions old > max_staleness 1
        metrics = buffer.metrics()
        assert metrics["buffer/size"] == 8.0 and metrics["buffer/evicted_stale"] == 4.0
        assert metrics["buffer/staleness_max"] == 1.0 and metrics["buffer/staleness_mean"] == 0.5

        # Off-policy reuse: sampling leaves the samples in place and never repeats one within a draw.
        drawn = buffer.sample(0, 6, seed=0).extras["sample_id"].tolist()
        assert len(set(drawn)) == 6 and set(drawn) <= {10, 11, 12, 13, 20, 21, 22, 23}
        assert buffer.sizes() == [8]
        with pytest.raises(ValueError, match="cannot sample 9"):
            buffer.sample(0, 9)

        assert buffer.set_policy_version(3) == 4
        assert sorted(buffer.take(0).extras["sample_id"].tolist()) == [20, 21, 22, 23]
        assert buffer.take(0) is None
    finally:
        buffer.shutdown()


def test_evict_oldest_mode_never_blocks(ray_cluster):
    buffer = ReplayBuffer(num_shards=1, capacity_per_shard=6, when_full="evict_oldest")
    try:
        for start in (0, 10, 20):
            buffer.put(make_experience(range(start, start + 3)))
        assert buffer.metrics()["buffer/evicted_full"] == 3.0
        assert sorted(buffer.take(0).extras["sample_id"].tolist()) == [10, 11, 12, 20, 21, 22]
        with pytest.raises(ValueError, match="can never fit"):
            buffer.put(make_experience(range(7)))
    finally:
        buffer.shutdown()
