"""WorkerGroup: the driver-side handle of N rank-aware Ray actors of one class.

    group = WorkerGroup(TrainerWorker, GroupSpec(num_workers=2, cpus_per_worker=1), name="policy",
                        worker_kwargs={"config": cfg.model_dump()})
    group.call_all("train_mode")                       # same call on every rank, results in rank order
    group.call_split("train_step", shards)             # shard i goes to data-parallel rank i, put once
    group.call_rank(0, "save", path)

What it does for you:
  1. reserves one placement-group bundle per rank (or uses bundles you pass, for colocation with another group);
  2. starts the actors with RANK/WORLD_SIZE set and asks rank 0 for a rendezvous address;
  3. has every rank join a torch process group (gloo on CPU, nccl on GPU) — no torchrun;
  4. dispatches calls: broadcast, per-rank split (each shard is put into the object store once and only the ranks
     of that data-parallel group receive it), or one rank.

Rank layout with tensor parallelism: rank = dp_rank * tp + tp_rank, so the ranks of one TP group are adjacent and
all get the same data shard.
"""

from __future__ import annotations

from typing import Any, Sequence

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.placement.groups import GroupSpec, build_placement_group


class WorkerGroup:
    """N actors of `worker_cls` (a RankedWorker subclass) with rank-aware dispatch."""

    def __init__(self, worker_cls: type, spec: GroupSpec, *, name: str, worker_kwargs: dict | None = None,
                 placement: PlacementGroup | None = None, bundle_indices: Sequence[int] | None = None,
                 setup_distributed: bool = True, backend: str | None = None, max_restarts: int = 0) -> None:
        self.name = name
        self.spec = spec
        self._owns_pg = placement is None
        self.placement = placement or build_placement_group(spec, name=f"{name}-pg")
        indices = list(bundle_indices) if bundle_indices is not None else list(range(spec.num_workers))
        if len(indices) != spec.num_workers:
            raise ValueError(f"group {name!r}: {len(indices)} bundle indices for {spec.num_workers} workers")
        remote_cls = ray.remote(worker_cls)
        env = {"RLHF_RAY_GROUP": name, **spec.env_vars}
        self.workers = [
            remote_cls.options(
                name=None,
                num_cpus=spec.cpus_per_worker,
                num_gpus=spec.gpus_per_worker,
                max_restarts=max_restarts,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement, placement_group_bundle_index=index),
                runtime_env={"env_vars": env},
            ).remote(rank=rank, world_size=spec.num_workers, **(worker_kwargs or {}))
            for rank, index in enumerate(indices)
        ]
        if setup_distributed and spec.num_workers > 1:
            addr, port = ray.get(self.workers[0].rendezvous_address.remote())
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

    # ------------------------------------------------------------ dispatch
    def call_all_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Same call on every rank; large arguments should be ray.put once by the caller."""
        return [getattr(worker, method).remote(*args, **kwargs) for worker in self.workers]

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return ray.get(self.call_all_async(method, *args, **kwargs))

    def call_rank_async(self, rank: int, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return getattr(self.workers[rank], method).remote(*args, **kwargs)

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self.call_rank_async(rank, method, *args, **kwargs))

    def call_split_async(self, method: str, shards: Sequence[Any], **kwargs: Any) -> list[ray.ObjectRef]:
        """shards[i] goes to every rank of data-parallel group i; each shard is put into the object store once."""
        if len(shards) != self.dp_size:
            raise ValueError(f"group {self.name!r}: got {len(shards)} shards for dp={self.dp_size} "
                             f"(world {self.world_size} / tp {self.tp_size})")
        refs = [shard if isinstance(shard, ray.ObjectRef) else ray.put(shard) for shard in shards]
        return [getattr(worker, method).remote(refs[self.dp_rank(rank)], **kwargs)
                for rank, worker in enumerate(self.workers)]

    def call_split(self, method: str, shards: Sequence[Any], **kwargs: Any) -> list[Any]:
        return ray.get(self.call_split_async(method, shards, **kwargs))

    # ------------------------------------------------------------ lifetime
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
