"""Why a placement group is not ready: what a pool has free right now and which placement groups hold the rest.

    print(pool_report("train-h100"))
    # pool 'train-h100' (2 node(s)) has CPU=4, GPU=0 free of CPU=128, GPU=16; held by placement groups
    #   'rl-policy+reference' (job 02000000) CPU=32, GPU=8 ...

Read from the GCS (per-node free resources, the placement-group table), so it works without the dashboard.
"""

from __future__ import annotations

from rlhf_ray.placement.pools import RESOURCE_KEYS, fmt_resources


def _add(into: dict[str, float], resources: dict[str, float]) -> None:
    for key in RESOURCE_KEYS:
        into[key] = into.get(key, 0.0) + resources.get(key, 0.0)


def _holders(node_ids: set[str]) -> list[str]:
    """One line per created placement group with bundles on `node_ids`: its name, job and what it holds there."""
    import ray
    from ray.util.placement_group import placement_group_table

    job_hex = 2 * ray.JobID.size()      # a placement group's id ends with the id of the job that created it
    lines = []
    for pg_id, pg in placement_group_table().items():
        if pg.get("state") != "CREATED":
            continue
        held: dict[str, float] = {}
        for index, node_id in (pg.get("bundles_to_node_id") or {}).items():
            if node_id in node_ids:
                _add(held, pg["bundles"][index])
        if any(held.values()):
            lines.append(f"{pg.get('name') or pg_id!r} (job {pg_id[-job_hex:]}) {fmt_resources(held)}")
    return lines


def pool_report(pool: str | None) -> str:
    """What `pool` (None: the whole cluster) has free and in total, and the placement groups holding it."""
    from ray._private.state import available_resources_per_node   # the only per-node view without the dashboard

    from rlhf_ray.placement.plan import ClusterCapacity            # plan -> groups -> this module: import here

    nodes = ClusterCapacity.from_ray().nodes_in(pool)
    free_by_node = available_resources_per_node()
    free: dict[str, float] = {}
    total: dict[str, float] = {}
    for node in nodes:
        _add(free, free_by_node.get(node.node_id, {}))
        _add(total, node.resources)
    where = f"pool {pool!r}" if pool else "the cluster"
    text = f"{where} ({len(nodes)} node(s)) has {fmt_resources(free)} free of {fmt_resources(total)}"
    try:
        holders = _holders({node.node_id for node in nodes})
    except Exception as exc:  # noqa: BLE001 - the report must not hide the error it explains
        return f"{text}; its holders are unknown ({type(exc).__name__}: {exc})"
    return f"{text}; held by placement groups " + "; ".join(holders) if holders else text
