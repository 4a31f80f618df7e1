"""Starting the RL roles' actor groups on their planned bundles, and stopping them.

Each worker is handed only its own sections (model, train, and its role's layout from RolePlan.layouts) and, for
the trainable roles, the loss settings. Frozen roles (reference, reward) join no process group: their ranks score
independent slices.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rlhf_ray.config.base import settings_from
from rlhf_ray.config.sections import ModelSection
from rlhf_ray.pipelines.rl.config import (generator_in_policy, old_logprobs_from_update, reference_in_policy,
                                          rollout_correction_settings)
from rlhf_ray.pipelines.rl.roles import RolePlan
from rlhf_ray.workers.rl_objectives import RLLossSettings


@dataclass
class RoleGroups:
    policy: Any                      # WorkerGroup of RLWorker (SimulatedTrainerWorker: --simulated_trainer_step_s)
    generators: Any                  # GeneratorGroup
    critic: Any | None = None
    reference: Any | None = None
    reward: Any | None = None
    placement_groups: dict[str, Any] = field(default_factory=dict)
    startup_s: dict[str, float] = field(default_factory=dict)   # startup/<part>_s: how long start_roles took
    reference_in_policy: bool = False                           # the policy's ranks score the reference log-probs
    generator_in_policy: bool = False                           # ... and generate (the engines are the policy's)
    engines_built_beside_trainers: bool = True                  # False: the engines first, then the trainers

    def trainers(self) -> list[Any]:
        return [g for g in (self.policy, self.critic) if g is not None]

    def peak_rss_mib(self) -> dict[str, float]:
        """Per role the largest resident-memory high-water mark (MiB) of its processes, and the driver's."""
        import ray

        from rlhf_ray.utils import peak_rss_mib

        roles = {"policy": self.policy, "critic": self.critic, "reference": self.reference, "reward": self.reward,
                 "generator": None if self.generators is None or self.generator_in_policy else self.generators.workers}
        pending = {role: group.call_all_async("peak_rss_mib") for role, group in roles.items() if group is not None}

        def answers(refs: list) -> list[float]:     # from the live processes: an engine lost with its host is gone
            return [ray.get(ref) for ref in refs if not _failed(ref)]

        return {"driver": peak_rss_mib(), **{role: max(answers(refs), default=0.0) for role, refs in pending.items()}}

    def shutdown(self) -> None:
        from rlhf_ray.pipelines.rl.roles import release_bundles

        for group in (self.generators, self.policy, self.critic, self.reference, self.reward):
            if group is not None:
                group.shutdown()
        release_bundles(self.placement_groups)


def trainable_roles(cfg) -> list[str]:
    """The roles that train and so build an engine: the policy, and the critic when the estimator needs one."""
    return ["policy"] + (["critic"] if hasattr(cfg, "critic") and cfg.algorithm.needs_critic else [])


def active_roles(cfg) -> list[str]:
    roles = trainable_roles(cfg)
    if cfg.algorithm.kl_coef > 0 and cfg.rl.simulated_trainer_step_s is None and not reference_in_policy(cfg):
        roles.append("reference")           # simulated: the sampler's log-probs stand in
    if cfg.reward.resolved_source() == "model":
        roles.append("reward")
    return roles + ([] if generator_in_policy(cfg) else ["generator"])


def loss_settings(cfg) -> RLLossSettings:
    """The algorithm section's loss fields; the KL term's weight and estimator resolved from kl_mode, the
    sampling temperature the log-probs are recomputed at, and where the old log-probs come from."""
    algo = cfg.algorithm
    return settings_from(RLLossSettings, algo, kl_loss_coef=algo.kl_coef if algo.kl_mode == "loss" else 0.0,
                         kl_estimator=algo.resolved_kl_estimator, temperature=cfg.generator.temperature,
                         max_response_len=cfg.generator.max_new_tokens,
                         old_logprobs_from_update=old_logprobs_from_update(cfg)[0], **rollout_correction_settings(cfg))


def critic_model_path(cfg) -> str:
    return cfg.critic.pretrain or cfg.reward.rm_path or cfg.model.pretrain


def _failed(ref) -> bool:
    import ray

    try:
        ray.get(ref)
    except ray.exceptions.RayActorError:
        return True
    return False


def _group(worker_cls, spec, placement, name: str, kwargs: dict):
    """Create the actors (without waiting for them); trainer groups join a process group later. Each rank sets
    its torch (and so OpenMP) threads to its reserved CPUs itself, so the group needs no environment of its own."""
    from rlhf_ray.workers.group import WorkerGroup

    return WorkerGroup(worker_cls, spec, name=name, worker_kwargs=kwargs, placement=placement,
                       bundle_indices=list(range(spec.num_workers)), setup_distributed=False)


def start_roles(cfg, plan: RolePlan, placement_groups: dict[str, Any], generator_section) -> RoleGroups:
    """Start every active role; returns once all models are loaded and the engines are ready.

    Every trainer actor is created before anything waits on one (actor start-up, mostly imports, overlaps across
    roles); the generator engines build in a thread meanwhile, while the trainers join their process groups and
    load their models, except under --colocate_all on GPUs, where a model loading beside a vLLM engine would skew
    the engine's GPU memory profiling (on CPU its KV cache has a fixed size). `groups.startup_s` gets the seconds
    of each part.
    """

    from rlhf_ray.workers.generator_group import GeneratorGroup
    from rlhf_ray.workers.group import get_failing_fast
    from rlhf_ray.workers.rl_actor import RLWorker

    pg = {role: placement_groups[plan.set_of(role)] for role in plan.specs}
    steps = cfg.rl.num_episodes * cfg.rl.num_update_steps
    common = {"forward_batch_size": cfg.rl.forward_batch_size}
    train = cfg.train.model_dump()
    losses = loss_settings(cfg).to_dict()
    parallel = {role: layout.model_dump() for role, layout in plan.layouts.items()}
    groups = RoleGroups(policy=None, generators=None, placement_groups=placement_groups,
                        reference_in_policy=reference_in_policy(cfg), generator_in_policy=generator_in_policy(cfg))
    pool, pending_generators = ThreadPoolExecutor(max_workers=1, thread_name_prefix="start-generators"), None
    try:
        engine_role = "policy" if groups.generator_in_policy else "generator"
        spec = plan.specs[engine_role]
        section = generator_section.model_copy(update={"cpus_per_engine": spec.cpus_per_worker})
        if cfg.rl.simulated_trainer_step_s is None:
            policy = {"model": cfg.model.model_dump(), "train": train, "parallel": parallel["policy"],
                      "loss": losses, "reference_in_process": groups.reference_in_policy, **common}
            if groups.generator_in_policy:
                from rlhf_ray.workers.policy_generator import PolicyGeneratorWorker

                groups.policy = _group(PolicyGeneratorWorker, plan.specs["policy"], pg["policy"], "policy",
                                       {**policy, "generator": section.model_dump()})
            else:
                groups.policy = _group(RLWorker, plan.specs["policy"], pg["policy"], "policy", policy)
        else:
            from rlhf_ray.workers.simulated_trainer import SimulatedTrainerWorker

            groups.policy = _group(SimulatedTrainerWorker, plan.specs["policy"], pg["policy"], "policy",
                                   {"model": cfg.model.model_dump(), "step_s": cfg.rl.simulated_trainer_step_s})
        if "critic" in plan.specs:
            critic_model = cfg.model.model_copy(update={"pretrain": critic_model_path(cfg),
                                                        "tokenizer_dir": cfg.model.resolved_tokenizer_dir()})
            groups.critic = _group(RLWorker, plan.specs["critic"], pg["critic"], "critic",
                                   {"model": critic_model.model_dump(), "train": {**train, "lr": cfg.critic.lr},
                                    "parallel": parallel["critic"], "loss": losses, "model_kind": "value", **common})
        if "reference" in plan.specs:
            groups.reference = _group(RLWorker, plan.specs["reference"], pg["reference"], "reference",
                                      {"model": cfg.model.model_dump(), "train": train, "loss": losses,
                                       "parallel": parallel["reference"], "frozen": True, **common})
        if "reward" in plan.specs:
            rm_model = ModelSection(pretrain=cfg.reward.rm_path, use_flash_attn=cfg.model.use_flash_attn)
            groups.reward = _group(RLWorker, plan.specs["reward"], pg["reward"], "reward",
                                   {"model": rm_model.model_dump(), "train": train, "parallel": parallel["reward"],
                                    "model_kind": "value", "frozen": True, **common})

        def start_generators() -> Any:
            started = time.perf_counter()
            generators = GeneratorGroup(section, cfg.model.pretrain, tokenizer_dir=cfg.model.resolved_tokenizer_dir(),
                                        placement=pg[engine_role], bundle_indices=list(range(spec.num_workers)),
                                        gpus_per_engine=spec.gpus_per_worker,
                                        workers=groups.policy if groups.generator_in_policy else None)
            groups.startup_s["startup/generators_s"] = time.perf_counter() - started
            return generators

        if cfg.placement.colocate_all and spec.gpus_per_worker > 0:     # GPU memory profiling: engines first
            groups.generators, groups.engines_built_beside_trainers = start_generators(), False
        elif not groups.generator_in_policy:                            # else: once the policy is built
            pending_generators = pool.submit(start_generators)
        started = time.perf_counter()
        for group in groups.trainers():
            group.join_process_group()
        builds = [groups.policy.call_all_async("build", steps)]
        builds += [groups.critic.call_all_async("build", steps)] if groups.critic is not None else []
        builds += [g.call_all_async("build", 1) for g in (groups.reference, groups.reward) if g is not None]
        for build in builds:
            get_failing_fast(build)         # a rank dead while loading fails the start at once
        groups.startup_s["startup/trainers_s"] = time.perf_counter() - started
        if pending_generators is not None:
            groups.generators = pending_generators.result()
        elif groups.generators is None:
            groups.generators = start_generators()
    except BaseException:
        if pending_generators is not None:          # shut down what the thread started, once it is done
            try:
                groups.generators = pending_generators.result()
            except BaseException:  # noqa: BLE001 - the first error is the one raised
                pass
        groups.shutdown()
        raise
    finally:
        pool.shutdown(wait=False)
    return groups

