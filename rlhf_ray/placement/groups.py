"""A role's resources and its placement group: GroupSpec (ranks, CPUs/GPUs per rank, node pool, tp) and the
placement group of one bundle per rank that a WorkerGroup starts its actors in."""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from rlhf_ray.placement.busy import pool_report
from rlhf_ray.placement.pools import fmt_resources, label_selector


@dataclass
class GroupSpec:
    """Resources of one group: how many ranks, what each reserves, and which node pool they must run on."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    pool: str | None = None          # `pool=<name>` node label or `accelerator_type:<T>` (placement/pools.py)
    tp_size: int = 1
    strategy: str = "PACK"           # placement-group strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    env_vars: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (got {self.num_workers})")
        if self.num_workers % self.tp_size:
            raise ValueError(f"num_workers ({self.num_workers}) must be a multiple of tp ({self.tp_size}): "
                             f"dp ({self.num_workers // self.tp_size or 1}) × tp ({self.tp_size}) = num_workers")

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        return bundle


DEFAULT_PLACEMENT_TIMEOUT_S = 120.0


class PlacementTimeoutError(RuntimeError):
    """A placement group that fits the cluster but was not free in time; the message names the pool's free
    resources and the placement groups holding them."""


def build_placement_group(spec: GroupSpec, name: str = "",
                          timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S) -> PlacementGroup:
    """Reserve one bundle per rank on spec.pool; fail with the numbers when the cluster cannot hold it, or with
    PlacementTimeoutError when it is not free within timeout_s."""
    bundles = [spec.bundle() for _ in range(spec.num_workers)]
    total = ray.cluster_resources()
    for key in ("CPU", "GPU"):
        wanted = sum(b.get(key, 0) for b in bundles)
        if wanted > total.get(key, 0):
            raise RuntimeError(_capacity_message(name, spec, f"needs {key}={wanted:g}",
                                                 f"cluster has {fmt_resources(total)}"))
    selector = [label_selector(spec.pool) for _ in bundles] if spec.pool else None
    pg = placement_group(bundles, strategy=spec.strategy, name=name, bundle_label_selector=selector)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementTimeoutError(_capacity_message(name, spec, f"not free within {timeout_s:g}s",
                                                      pool_report(spec.pool), busy=True))
    return pg


def _capacity_message(name: str, spec: GroupSpec, why: str, have: str, busy: bool = False) -> str:
    pool = f" on pool {spec.pool!r}" if spec.pool else ""
    fix = ("wait for those jobs to finish (or stop them), raise --placement_timeout_s, or lower num_workers / "
           "cpus_per_worker / gpus_per_worker" if busy else
           "lower num_workers / cpus_per_worker / gpus_per_worker, or add nodes")
    return f"group {name!r}: could not reserve {spec.num_workers} × {spec.bundle()}{pool} ({why}); {have}; {fix}."
