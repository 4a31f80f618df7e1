"""WorkerGroup on the real local Ray cluster: ranks, gloo rendezvous, and per-rank data dispatch."""

import pytest

from rlhf_ray.workers.base import RankedWorker
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.utils import split_evenly
from rlhf_ray.workers.group import WorkerGroup


class SumWorker(RankedWorker):
    def all_reduce_rank(self) -> float:
        import torch
        import torch.distributed as dist

        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return value.item()

    def echo(self, shard):
        return self.rank, list(shard)


@pytest.fixture(scope="module")
def tp_group(ray_cluster):
    group = WorkerGroup(SumWorker, GroupSpec(num_workers=4, cpus_per_worker=0.25, tp_size=2), name="sum")
    yield group
    group.shutdown()


def test_ranks_join_one_gloo_group(tp_group):
    assert tp_group.call_all("ping") == [0, 1, 2, 3]
    assert tp_group.call_all("all_reduce_rank") == [10.0] * 4


def test_split_goes_to_data_parallel_ranks(tp_group):
    shards = split_evenly(list(range(7)), tp_group.dp_size)
    results = tp_group.call_split("echo", shards)
    # ranks 0,1 form dp group 0 (tp=2); ranks 2,3 dp group 1
    assert results == [(0, [0, 1, 2, 3]), (1, [0, 1, 2, 3]), (2, [4, 5, 6]), (3, [4, 5, 6])]
    with pytest.raises(ValueError, match="dp=2"):
        tp_group.call_split("echo", [[1]])


def test_split_evenly_loses_nothing():
    for n in range(10):
        for parts in range(1, 5):
            chunks = split_evenly(list(range(n)), parts)
            assert sum(chunks, []) == list(range(n))
            assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_bad_layout_prints_the_equation():
    with pytest.raises(ValueError, match=r"dp \(1\) × tp \(2\)"):
        GroupSpec(num_workers=3, tp_size=2)


def test_unsatisfiable_group_names_the_numbers(ray_cluster):
    with pytest.raises(RuntimeError, match="could not reserve"):
        WorkerGroup(SumWorker, GroupSpec(num_workers=1, cpus_per_worker=1000), name="huge")
