"""Roles -> resources -> Ray actor groups, with colocation.

    policy      RLWorker group (trainable causal LM), the parallel section's layout; SimulatedTrainerWorker under
                --simulated_trainer_step_s (a stand-in that syncs the initial weights and sleeps through updates)
    critic      RLWorker group (trainable value model), the policy's ranks, its own resources       PPO with GAE
    reference   RLWorker group (frozen causal LM = the initial policy)          kl_coef > 0, trainer not simulated
    reward      RLWorker group (frozen value model = the reward model)                             reward_source model
    generator   GeneratorGroup (vLLM engines)

`role_layouts` is the one place where a role's config sections become the ParallelSection its workers are handed,
and `spec_from_parallel` (placement/plan.py) the one place where that becomes its GroupSpec.

Colocation puts roles on the same placement-group bundles. A colocated set gets max(num_workers) bundles, each
as large as the largest per-worker request of its members, and every member's actors ask for 1/k of a bundle
(k = members in the set): the roles time-share the same CPUs/GPUs, as OpenRLHF's colocated actors do.
    --colocate_policy_reference   {policy, reference}
    --colocate_critic_reward      {critic, reward}
    --colocate_all                every role above, generators included
The whole plan is printed and checked against the cluster before any actor starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf_ray.config.base import ConfigError
from rlhf_ray.config.sections import ParallelSection, ResourcesSection, WorkerResources
from rlhf_ray.placement import spec_from_parallel
from rlhf_ray.placement.groups import GroupSpec

ROLE_ORDER = ("policy", "critic", "reference", "reward", "generator")


@dataclass
class RolePlan:
    """Per role its layout (role_layouts) and GroupSpec (actor request, after colocation), and the placement sets:
    name -> (bundle spec, member roles)."""

    layouts: dict[str, ParallelSection] = field(default_factory=dict)
    specs: dict[str, GroupSpec] = field(default_factory=dict)
    sets: dict[str, tuple[GroupSpec, list[str]]] = field(default_factory=dict)

    def set_of(self, role: str) -> str:
        return next(name for name, (_, members) in self.sets.items() if role in members)

    def describe(self) -> str:
        lines = ["role plan (actor requests; colocated roles share bundles):"]
        for name, (bundle, members) in self.sets.items():
            lines.append(f"  {name}: {bundle.num_workers} bundle(s) × {bundle.bundle()}"
                         + (f" pool={bundle.pool}" if bundle.pool else ""))
            for role in members:
                spec = self.specs[role]
                tp = f", tp {spec.tp_size}" if spec.tp_size > 1 else ""
                lines.append(f"    {role}: {spec.num_workers} × {spec.bundle()}{tp}")
        return "\n".join(lines)


def role_layouts(cfg, roles: list[str]) -> dict[str, ParallelSection]:
    """Each active worker role's layout and resources, as the ParallelSection its workers are handed: the policy's
    own; the critic's ranks are the policy's, on its own per-worker resources; the reference and reward-model groups
    are their ResourcesSection (no tensor parallelism)."""
    layouts = {"policy": cfg.parallel}
    if "critic" in roles:
        per_worker = cfg.critic.model_dump(include=set(WorkerResources.model_fields))
        layouts["critic"] = cfg.parallel.model_copy(update=per_worker)
    for role in ("reference", "reward"):
        if role in roles:
            layouts[role] = ParallelSection(**getattr(cfg, role).model_dump(include=set(ResourcesSection.model_fields)))
    return layouts


def generator_spec(cfg) -> GroupSpec:
    """The generator engines' request: one worker per engine, tensor_parallel_size GPUs each on a GPU cluster."""
    gen = cfg.generator
    return GroupSpec(num_workers=gen.num_engines, cpus_per_worker=gen.cpus_per_engine,
                     gpus_per_worker=float(gen.tensor_parallel_size) if _cluster_has_gpus() else 0.0,
                     pool=cfg.placement.generator_pool)


def _cluster_has_gpus() -> bool:
    import ray

    return bool(ray.is_initialized() and ray.cluster_resources().get("GPU"))


def colocation_sets(placement, roles: list[str]) -> list[list[str]]:
    """Which active roles share bundles, in ROLE_ORDER; every role appears in exactly one set."""
    if placement.colocate_all:
        return [[r for r in ROLE_ORDER if r in roles]]
    wanted = []
    if placement.colocate_policy_reference and "reference" in roles:
        wanted.append(["policy", "reference"])
    if placement.colocate_critic_reward and "critic" in roles and "reward" in roles:
        wanted.append(["critic", "reward"])
    grouped = {r for s in wanted for r in s}
    return wanted + [[r] for r in ROLE_ORDER if r in roles and r not in grouped]


def plan_roles(cfg, roles: list[str]) -> RolePlan:
    """Actor requests and bundles for the active `roles`; refuses members of one set pinned to different pools."""
    plan = RolePlan(layouts=role_layouts(cfg, roles))
    own = {role: spec_from_parallel(layout) for role, layout in plan.layouts.items()}
    own["generator"] = generator_spec(cfg)
    for members in colocation_sets(cfg.placement, roles):
        pools = {own[r].pool for r in members if own[r].pool}
        if len(pools) > 1:
            raise ConfigError(f"colocated roles {members} are pinned to different pools {sorted(pools)}; give them "
                              f"one pool or do not colocate them")
        bundle = GroupSpec(num_workers=max(own[r].num_workers for r in members),
                           cpus_per_worker=max(own[r].cpus_per_worker for r in members),
                           gpus_per_worker=max(own[r].gpus_per_worker for r in members),
                           pool=next(iter(pools), None))
        share = 1.0 / len(members)
        for role in members:
            spec = own[role]
            plan.specs[role] = GroupSpec(num_workers=spec.num_workers, cpus_per_worker=bundle.cpus_per_worker * share,
                                         gpus_per_worker=bundle.gpus_per_worker * share, pool=bundle.pool,
                                         tp_size=spec.tp_size, env_vars=dict(spec.env_vars))
        plan.sets["+".join(members)] = (bundle, members)
    return plan


def check_plan(plan: RolePlan) -> str:
    """Check the bundles against the cluster (ResourcePlan, placement/plan.py); return the printed table."""
    from rlhf_ray.placement import ClusterCapacity, ResourcePlan

    resources = ResourcePlan()
    for name, (bundle, _) in plan.sets.items():
        resources.add(name, bundle)
    cluster = ClusterCapacity.from_ray()
    try:
        resources.check(cluster)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return plan.describe() + "\n" + resources.describe(cluster)


def reserve_bundles(plan: RolePlan, timeout_s: float) -> dict[str, Any]:
    """One placement group per set (the set's name -> PlacementGroup); a set not free within timeout_s releases
    the sets reserved before it and raises ConfigError naming its pool's free resources and their holders."""
    from rlhf_ray.placement.groups import PlacementTimeoutError, build_placement_group

    groups: dict[str, Any] = {}
    try:
        for name, (bundle, _) in plan.sets.items():
            groups[name] = build_placement_group(bundle, name=f"rl-{name}", timeout_s=timeout_s)
    except PlacementTimeoutError as exc:
        release_bundles(groups)
        raise ConfigError(str(exc)) from None
    return groups


def release_bundles(groups: dict[str, Any]) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in groups.values():
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - already gone at shutdown is fine
            pass
