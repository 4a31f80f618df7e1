"""WorkerGroup: the driver-side handle of N rank-aware Ray actors of one class, and the only way the driver
talks to them.

    group = WorkerGroup(TrainerWorker, GroupSpec(num_workers=2, cpus_per_worker=1), name="policy",
                        worker_kwargs={"config": cfg.model_dump()})
    group.call_all("train_mode")                            # same call on every rank, results in rank order
    group.call_split("train_step", shards)                  # shards[i] goes to data-parallel group i, put once
    group.call_split_async("update", chunks, ptx, seed=3)   # several per-dp arguments; keywords go to every rank
    group.call_rows_async("score", {"sequences": x, ...})   # rows split over the dp groups; one ref per dp group
    group.call_rank(0, "save", path)

What it does for you:
  1. reserves one placement-group bundle per rank (or uses bundles you pass, for colocation with another group);
  2. starts the actors with RANK/WORLD_SIZE set and asks rank 0 for a rendezvous address;
  3. has every rank join a torch process group (gloo on CPU; cpu:gloo,cuda:nccl on GPU) — no torchrun;
  4. dispatches calls: broadcast, per-dp-group arguments (each is put into the object store once and only the
     ranks of that data-parallel group receive it), rows of a batch split over the dp groups, or one rank.

Rank layout with tensor parallelism: rank = dp_rank * tp + tp_rank, so the ranks of one TP group are adjacent and
all get the same data shard.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import ray
import torch
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.placement.groups import DEFAULT_PLACEMENT_TIMEOUT_S, GroupSpec, build_placement_group
from rlhf_ray.utils import split_evenly


class WorkerGroup:
    """N actors of `worker_cls` (a RankedWorker subclass) with rank-aware dispatch."""

    def __init__(self, worker_cls: type, spec: GroupSpec, *, name: str, worker_kwargs: dict | None = None,
                 placement: PlacementGroup | None = None, bundle_indices: Sequence[int] | None = None,
                 setup_distributed: bool = True, backend: str | None = None, max_restarts: int = 0,
                 placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S) -> None:
        self.name = name
        self.spec = spec
        self._owns_pg = placement is None
        self.placement = placement or build_placement_group(spec, name=f"{name}-pg",
                                                                 timeout_s=placement_timeout_s)
        indices = list(bundle_indices) if bundle_indices is not None else list(range(spec.num_workers))
        if len(indices) != spec.num_workers:
            raise ValueError(f"group {name!r}: {len(indices)} bundle indices for {spec.num_workers} workers")
        remote_cls = ray.remote(worker_cls)
        # a runtime_env only where a group needs its own variables: Ray starts such workers through a setup
        # script that imports Ray once more (see placement.cluster.start_local_ray)
        options = {"runtime_env": {"env_vars": dict(spec.env_vars)}} if spec.env_vars else {}
        self.workers = [
            remote_cls.options(
                name=None,
                num_cpus=spec.cpus_per_worker,
                num_gpus=spec.gpus_per_worker,
                max_restarts=max_restarts,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement, placement_group_bundle_index=index),
                **options,
            ).remote(rank=rank, world_size=spec.num_workers, **(worker_kwargs or {}))
            for rank, index in enumerate(indices)
        ]
        if setup_distributed:
            self.join_process_group(backend)

    def join_process_group(self, backend: str | None = None) -> None:
        """Rank 0 publishes a rendezvous address and every rank joins one torch process group (skipped for one
        rank). Done at construction unless setup_distributed=False, e.g. to start several groups' actors first."""
        if self.world_size > 1:
            addr, port = self.call_rank(0, "rendezvous_address")
            self.call_all("setup_distributed", addr, port, backend)

    # ------------------------------------------------------------ layout
    @property
    def world_size(self) -> int:
        return len(self.workers)

    @property
    def tp_size(self) -> int:
        return self.spec.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp_size

    def actor(self, rank: int):
        """The actor handle of `rank`, for what a call cannot express: handing the actor to another actor (weight
        sync), per-call Ray options, ray.kill in a fault drill."""
        return self.workers[rank]

    # ------------------------------------------------------------ dispatch
    def call_all_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Same call on every rank; large arguments should be ray.put once by the caller."""
        return [getattr(worker, method).remote(*args, **kwargs) for worker in self.workers]

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return get_failing_fast(self.call_all_async(method, *args, **kwargs))

    def call_rank_async(self, rank: int, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return getattr(self.workers[rank], method).remote(*args, **kwargs)

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self.call_rank_async(rank, method, *args, **kwargs))

    def call_split_async(self, method: str, *per_dp: Sequence[Any], **kwargs: Any) -> list[ray.ObjectRef]:
        """Each positional argument is a list with one entry per data-parallel group: every rank of dp group i gets
        entry i (with TP, put into the object store once, so the ranks of one TP group share one copy; an ObjectRef
        is passed as it is, and Ray resolves it in the rank). Keyword arguments go to every rank unchanged.
        Returns one ref per rank, in rank order."""
        for values in per_dp:
            if len(values) != self.dp_size:
                raise ValueError(f"group {self.name!r}: got {len(values)} shards for dp={self.dp_size} "
                                 f"(world {self.world_size} / tp {self.tp_size})")
        refs = [[self._shared(value) for value in values] for values in per_dp]
        return [self.call_rank_async(rank, method, *(shards[self.dp_rank(rank)] for shards in refs), **kwargs)
                for rank in range(self.world_size)]

    def call_split(self, method: str, *per_dp: Sequence[Any], **kwargs: Any) -> list[Any]:
        return get_failing_fast(self.call_split_async(method, *per_dp, **kwargs))

    def _shared(self, value: Any) -> Any:
        """What to pass for a value that every rank of one TP group receives: one object-store copy for several
        ranks; the value itself for one rank, which Ray then sends inline when it is small (a put costs an extra
        round trip to the object store, ~1.3 ms per call here, several times per RL step)."""
        if self.tp_size == 1 or isinstance(value, ray.ObjectRef):
            return value
        return ray.put(value)

    def call_rows_async(self, method: str, batch: dict[str, Any], **kwargs: Any) -> list[ray.ObjectRef]:
        """Split the rows of `batch` evenly over the dp groups (`split_rows`) and call `method(shard, **kwargs)` on
        every rank of each dp group that got rows; a group with no rows (fewer rows than dp groups) is not called.
        Returns one ref per called dp group (its first TP rank's; the others computed the same), in row order, so
        `torch.cat(ray.get(refs))` lines up with the batch's rows."""
        refs = []
        for dp_rank, shard in enumerate(split_rows(batch, self.dp_size)):
            if shard is None:
                continue
            ref = self._shared(shard)
            ranks = range(dp_rank * self.tp_size, (dp_rank + 1) * self.tp_size)
            calls = [self.call_rank_async(rank, method, ref, **kwargs) for rank in ranks]
            refs.append(calls[0])
        return refs

    # ------------------------------------------------------------ lifetime
    def lost_ranks(self, timeout_s: float = 30.0, grace_s: float = 2.0) -> list[int]:
        """Ranks whose actor is dead: its ping fails. Waits up to timeout_s for the first answer or failure (a lost
        node takes Ray's health checks to declare), then only grace_s more once one rank is found dead: a rank that
        does not answer is busy (e.g. blocked in a collective with the dead peer), not lost."""
        pings = {worker.ping.remote(): rank for rank, worker in enumerate(self.workers)}
        pending, lost = list(pings), []
        deadline = time.monotonic() + timeout_s
        while pending:
            wait_s = grace_s if lost else deadline - time.monotonic()
            done, pending = ray.wait(pending, num_returns=1, timeout=max(wait_s, 0.0))
            if not done:
                break
            try:
                ray.get(done)
            except ray.exceptions.RayActorError:
                lost.append(pings[done[0]])
        return sorted(lost)

    def shutdown(self) -> None:
        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine at shutdown
                pass
        self.workers = []
        if self._owns_pg:
            try:
                remove_placement_group(self.placement)
            except Exception:  # noqa: BLE001
                pass


def get_failing_fast(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    """ray.get(refs), but the first failure is raised as soon as it exists: a dead rank's error surfaces at once
    instead of after the surviving ranks' collectives time out waiting for it."""
    if len(refs) == 1:
        return [ray.get(refs[0])]         # one result: ray.get raises its failure as soon as it exists
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(list(refs))


def split_rows(batch: dict[str, Any], parts: int) -> list[dict[str, Any] | None]:
    """`parts` row shards of `batch`: every tensor with a batch dimension is cut along dim 0 into contiguous slices
    whose sizes differ by at most one (`split_evenly`); other values (e.g. `response_len`) are copied into every
    shard. A shard that would hold no rows is None."""
    rows = {tensor.shape[0] for tensor in batch.values() if isinstance(tensor, torch.Tensor) and tensor.dim()}
    assert len(rows) == 1, f"split_rows needs tensors with one batch size, got sizes {sorted(rows)}"
    # Index with the row list (a copy): a sliced view would pickle its whole parent storage into every shard.
    return [{key: value[index] if isinstance(value, torch.Tensor) and value.dim() else value
             for key, value in batch.items()} if index else None
            for index in split_evenly(range(rows.pop()), parts)]
