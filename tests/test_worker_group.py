"""WorkerGroup on the real local Ray cluster: ranks, gloo rendezvous, and per-rank data dispatch."""

import pytest
import ray
import torch

from rlhf_ray.workers.base import RankedWorker
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.utils import split_evenly
from rlhf_ray.workers.group import WorkerGroup, split_rows


class SumWorker(RankedWorker):
    def all_reduce_rank(self) -> float:
        import torch
        import torch.distributed as dist

        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return value.item()

    def echo(self, shard):
        return self.rank, list(shard)

    def echo_update(self, chunk, ptx, *, steps):
        return self.rank, chunk, ptx, steps

    def scale_rows(self, batch):
        self.last_rows = batch["x"].tolist()
        return batch["x"] * batch["factor"]

    def rows_seen(self):
        return getattr(self, "last_rows", None)

    def environ(self, key):
        import os

        return os.environ.get(key)

    def runtime_env(self):
        return ray.get_runtime_context().runtime_env


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


def test_per_dp_arguments_reach_every_rank_of_their_tp_group(tp_group):
    # Two per-dp-group arguments (the buffer's refs and the ptx rows, say) and a keyword for every rank.
    chunks = [[ray.put("a0"), ray.put("a1")], [ray.put("b0")]]
    results = tp_group.call_split("echo_update", chunks, ["ptx-0", None], steps=3)
    assert [(rank, ptx, steps) for rank, _, ptx, steps in results] == [(0, "ptx-0", 3), (1, "ptx-0", 3),
                                                                       (2, None, 3), (3, None, 3)]
    # Refs inside a list are not resolved on the way: the ranks of dp group 0 hold the same refs, to fetch.
    assert [ray.get(chunk) for _, chunk, _, _ in results] == [["a0", "a1"], ["a0", "a1"], ["b0"], ["b0"]]
    with pytest.raises(ValueError, match=r"got 1 shards for dp=2 \(world 4 / tp 2\)"):
        tp_group.call_split("echo_update", chunks, ["ptx-0"], steps=3)


def test_rows_split_over_dp_groups_one_result_per_group_in_row_order(tp_group):
    batch = {"x": torch.arange(5), "factor": 10}
    refs = tp_group.call_rows_async("scale_rows", batch)
    assert torch.cat(ray.get(refs)).tolist() == [0, 10, 20, 30, 40]          # one result per dp group, in order
    assert tp_group.call_all("rows_seen") == [[0, 1, 2], [0, 1, 2], [3, 4], [3, 4]]   # TP ranks got the same rows
    # Fewer rows than dp groups: the group without rows is not called.
    refs = tp_group.call_rows_async("scale_rows", {"x": torch.tensor([7]), "factor": 2})
    assert [r.tolist() for r in ray.get(refs)] == [[14]]
    assert tp_group.call_all("rows_seen") == [[7], [7], [3, 4], [3, 4]]


def test_split_rows_copies_shared_values_and_marks_empty_shards():
    shards = split_rows({"x": torch.arange(6).view(3, 2), "response_len": 2}, 4)
    assert [s and s["x"].tolist() for s in shards] == [[[0, 1]], [[2, 3]], [[4, 5]], None]
    assert shards[0]["response_len"] == 2
    assert shards[0]["x"].untyped_storage().nbytes() == 2 * 8         # a copy, not a view of the whole batch


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


def test_workers_inherit_the_clusters_environment_and_a_group_adds_its_own(tp_group):
    """conftest starts the cluster with start_local_ray: every worker gets its variables from the raylet (no
    runtime_env), while the test process's own environment is left as it was; a group's env_vars reach only it."""
    import os
    from pathlib import Path

    tests_dir = str(Path(__file__).resolve().parent)
    assert tests_dir in tp_group.call_rank(0, "environ", "PYTHONPATH").split(os.pathsep)
    assert tests_dir not in (os.environ.get("PYTHONPATH") or "").split(os.pathsep)
    assert tp_group.call_rank(0, "environ", "RLHF_RAY_PROBE") is None
    assert not tp_group.call_rank(0, "runtime_env"), "no runtime_env: a worker starts without Ray's setup script"
    probe = WorkerGroup(SumWorker, GroupSpec(num_workers=1, cpus_per_worker=0.25, env_vars={"RLHF_RAY_PROBE": "1"}),
                        name="probe")
    try:
        assert probe.call_rank(0, "environ", "RLHF_RAY_PROBE") == "1"
    finally:
        probe.shutdown()
