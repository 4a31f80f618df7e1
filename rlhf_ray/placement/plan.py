"""The resource plan: which role gets how many ranks, what each rank reserves, and on which node pool.

    plan = ResourcePlan()
    plan.add("policy", spec_from_parallel(cfg.parallel))
    plan.add("reference", GroupSpec(num_workers=2, cpus_per_worker=1))
    print(plan.describe(ClusterCapacity.from_ray()))      # the numbers, before any actor starts
    plan.check(ClusterCapacity.from_ray())                # ValueError naming the role, pool and numbers

A role's GroupSpec (workers/group.py) becomes one placement group of `num_workers` bundles. The check is done
before anything starts, so a plan that cannot fit fails in a second with the whole sum, instead of hanging on a
placement group that never becomes ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.placement.pools import (ACCELERATOR_LABEL, POOL_LABEL, RESOURCE_KEYS, accelerator_of, fmt_resources,
                                      node_accelerator, node_pools)


def spec_from_parallel(parallel, env_vars: dict[str, str] | None = None) -> GroupSpec:
    """GroupSpec of a trainer group from a ParallelSection (num_workers, tp, cpus/gpus per worker, pool)."""
    return GroupSpec(num_workers=parallel.num_workers, cpus_per_worker=parallel.cpus_per_worker,
                     gpus_per_worker=parallel.gpus_per_worker, pool=parallel.pool, tp_size=parallel.tp,
                     env_vars=dict(env_vars or {}))


@dataclass
class NodeCapacity:
    """One alive node: its total resources, its `pool` label and Ray's accelerator type (None when absent)."""

    node_id: str
    resources: dict[str, float]
    pool: str | None = None
    accelerator: str | None = None

    def pools(self) -> set[str]:
        return node_pools(self.pool, self.accelerator)


@dataclass
class ClusterCapacity:
    """What the cluster holds, node by node (totals, not what is free right now)."""

    nodes: list[NodeCapacity] = field(default_factory=list)

    @classmethod
    def from_ray(cls) -> "ClusterCapacity":
        import ray

        nodes = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            labels, resources = node.get("Labels") or {}, dict(node.get("Resources") or {})
            nodes.append(NodeCapacity(node_id=node["NodeID"], resources=resources, pool=labels.get(POOL_LABEL),
                                      accelerator=node_accelerator(labels, resources)))
        return cls(nodes)

    def pools(self) -> list[str]:
        """Every pool name some node answers to (see placement/pools.py)."""
        return sorted(set().union(*(n.pools() for n in self.nodes)))

    def nodes_in(self, pool: str | None) -> list[NodeCapacity]:
        return [n for n in self.nodes if pool is None or pool in n.pools()]

    def total(self, pool: str | None = None) -> dict[str, float]:
        totals = {key: 0.0 for key in RESOURCE_KEYS}
        for node in self.nodes_in(pool):
            for key in RESOURCE_KEYS:
                totals[key] += node.resources.get(key, 0.0)
        return totals


def _how_to_add(pool: str) -> str:
    if accelerator_of(pool):
        return f"add nodes whose GPUs Ray detects as {accelerator_of(pool)} (the `{ACCELERATOR_LABEL}` node label)"
    return f"label the nodes `{POOL_LABEL}={pool}`"


@dataclass
class ResourcePlan:
    """Roles in start order, each with its GroupSpec."""

    roles: dict[str, GroupSpec] = field(default_factory=dict)

    def add(self, role: str, spec: GroupSpec) -> GroupSpec:
        if role in self.roles:
            raise ValueError(f"role {role!r} is already in the plan ({', '.join(self.roles)})")
        self.roles[role] = spec
        return spec

    def demand(self, pool: str | None) -> dict[str, float]:
        """Resources the roles pinned to `pool` reserve (pool None: the roles with no pool)."""
        wanted = {key: 0.0 for key in RESOURCE_KEYS}
        for spec in self.roles.values():
            if spec.pool == pool:
                for key, value in spec.bundle().items():
                    wanted[key] += value * spec.num_workers
        return wanted

    def total_demand(self) -> dict[str, float]:
        wanted = {key: 0.0 for key in RESOURCE_KEYS}
        for spec in self.roles.values():
            for key, value in spec.bundle().items():
                wanted[key] += value * spec.num_workers
        return wanted

    def describe(self, cluster: ClusterCapacity | None = None) -> str:
        """A small table: one line per role, the sums, and what the cluster has."""
        lines = ["resource plan:"]
        width = max((len(r) for r in self.roles), default=4)
        for role, spec in self.roles.items():
            per = fmt_resources(spec.bundle())
            pool = f"pool={spec.pool}" if spec.pool else "any node"
            layout = f"dp {spec.num_workers // spec.tp_size} × tp {spec.tp_size}" if spec.tp_size > 1 else ""
            lines.append(f"  {role.ljust(width)}  {spec.num_workers} × {{{per}}}  {pool}  {layout}".rstrip())
        lines.append(f"  {'total'.ljust(width)}  {fmt_resources(self.total_demand())}")
        if cluster is not None:
            lines.append(f"  {'cluster'.ljust(width)}  {fmt_resources(cluster.total())} on {len(cluster.nodes)} node(s)")
            for pool in cluster.pools():
                lines.append(f"  {('  pool ' + pool).ljust(width)}  {fmt_resources(cluster.total(pool))}")
        return "\n".join(lines)

    def _colocation_hint(self, cluster: ClusterCapacity) -> str | None:
        """When the roles (none pinned to a pool) would fit sharing bundles, as colocated roles do (max num_workers
        bundles of the largest per-rank request), the flags that ask for it; else None."""
        if len(self.roles) < 2 or any(spec.pool for spec in self.roles.values()):
            return None
        workers = max(spec.num_workers for spec in self.roles.values())
        bundle = {key: max(spec.bundle().get(key, 0.0) for spec in self.roles.values()) for key in RESOURCE_KEYS}
        shared = {key: workers * value for key, value in bundle.items()}
        have = cluster.total()
        if any(shared[key] > have[key] + 1e-9 for key in RESOURCE_KEYS) or not any(
                all(node.resources.get(k, 0) >= v for k, v in bundle.items() if v) for node in cluster.nodes):
            return None
        return (f"colocated, the roles would fit: {workers} × {{{fmt_resources(bundle)}}} shared by {', '.join(self.roles)}; "
                f"add --colocate_all (rlhf-ray ppo / grpo) or --reference_placement colocate (rlhf-ray dpo)")

    def check(self, cluster: ClusterCapacity) -> None:
        """Raise ValueError when the plan cannot fit: per pool, in total, or one bundle on any single node."""
        problems = []
        known_pools = cluster.pools()
        for role, spec in self.roles.items():
            if spec.pool and spec.pool not in known_pools:
                problems.append(f"role {role!r} wants pool {spec.pool!r}, but the cluster has "
                                f"{'pools ' + ', '.join(known_pools) if known_pools else 'no pool labels'}; "
                                f"set --pool to one of them or {_how_to_add(spec.pool)}")
                continue
            bundle = spec.bundle()
            if not any(all(node.resources.get(k, 0) >= v for k, v in bundle.items())
                       for node in cluster.nodes_in(spec.pool)):
                problems.append(f"role {role!r}: no single node{' in pool ' + repr(spec.pool) if spec.pool else ''}"
                                f" can hold one rank's {{{fmt_resources(bundle)}}}; lower cpus_per_worker / gpus_per_worker")
        for pool in [None, *known_pools]:
            have = cluster.total(pool)
            # Unpinned roles may land anywhere, so they are checked against the whole cluster together with
            # everything else; pinned roles are checked against their pool.
            wanted = self.total_demand() if pool is None else self.demand(pool)
            for key in RESOURCE_KEYS:
                if wanted[key] > have[key] + 1e-9:
                    where = "the cluster" if pool is None else f"pool {pool!r}"
                    roles = [r for r, s in self.roles.items() if pool is None or s.pool == pool]
                    parts = " + ".join(f"{r} {self.roles[r].num_workers}×{self.roles[r].bundle().get(key, 0):g}"
                                       for r in roles)
                    problems.append(f"{where} has {key}={have[key]:g} but the plan needs {key}={wanted[key]:g} "
                                    f"({parts}); lower num_workers / cpus_per_worker / gpus_per_worker or add nodes")
        if problems and (hint := self._colocation_hint(cluster)):
            problems.append(hint)
        if problems:
            raise ValueError("the resource plan does not fit the cluster:\n  " + "\n  ".join(problems)
                             + "\n" + self.describe(cluster))
