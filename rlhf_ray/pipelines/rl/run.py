"""`run_rl(cfg, job)`: what `rlhf-ray ppo` and `rlhf-ray grpo` do, start to finish.

    check the config (every section, then across sections: buffer arithmetic, roles, reward source)
    -> load prompts (and ptx rows) -> connect to Ray -> plan roles and bundles, check them against the cluster
    -> start the groups (policy, critic, reference, reward model, generators) -> [resume] -> episodes -> HF export
    a trainer rank lost on the way: everything torn down, again from the newest checkpoint (--max_restarts times)

Everything a user can get wrong is refused before the first actor starts, with one message and exit status 2.
"""

from __future__ import annotations

import sys
import time

from rlhf_ray.config.base import ConfigError
from rlhf_ray.pipelines.rl.config import BufferPlan, check_rl_config


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


def build_reward_source_for(cfg, groups, tokenizer):
    from rlhf_ray.rewards import build_reward_source

    source = cfg.reward.resolved_source()
    if source == "model":
        from rlhf_ray.rewards.model import register_model_source

        register_model_source()
        return build_reward_source("model", group=groups.reward, pad_token_id=tokenizer.pad_token_id,
                                   tokenizer_dir=cfg.reward.rm_path)
    if source == "rule":
        return build_reward_source("rule", spec=cfg.reward.reward_fn)
    if source == "remote":
        return build_reward_source("remote", url=cfg.reward.reward_url, timeout_s=cfg.reward.reward_timeout_s,
                                   retries=cfg.reward.reward_retries)
    return build_reward_source(source)


def _load_tokenizer(cfg):
    from rlhf_ray.data.tokenizer_loader import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.resolved_tokenizer_dir())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_engines(cfg) -> None:
    """--plugin against each trainable role's resources, before Ray starts (frozen roles build no engine)."""
    from rlhf_ray.engines.registry import validate_engine_config
    from rlhf_ray.pipelines.rl.groups import trainable_roles
    from rlhf_ray.pipelines.rl.roles import role_layouts

    layouts = role_layouts(cfg, trainable_roles(cfg))
    validate_engine_config(layouts["policy"], cfg.train)
    if "critic" in layouts:
        try:
            validate_engine_config(layouts["critic"], cfg.train)
        except ConfigError as exc:
            raise ConfigError(f"the critic: {exc}".replace("--gpus_per_worker", "--critic_gpus_per_worker")) from None


def run_rl(cfg, job: str) -> int:
    from rlhf_ray.pipelines.model_checks import check_rl_models
    from rlhf_ray.pipelines.rl.data import load_rl_data, template_ids
    from rlhf_ray.pipelines.rl.groups import active_roles
    from rlhf_ray.pipelines.rl.roles import plan_roles
    from rlhf_ray.checkpoint.layout import resolve_checkpoint_path

    prog, job_start = f"rlhf-ray {job}", time.perf_counter()
    try:
        _check_engines(cfg)
        notes = check_rl_config(cfg, job)
        plan_roles(cfg, active_roles(cfg))         # colocation conflicts fail here; planned again once Ray is up
        if cfg.reward.resolved_source() == "rule":
            from rlhf_ray.rewards import load_rule_function

            try:
                load_rule_function(cfg.reward.reward_fn)      # a bad spec fails here, before any actor starts
            except (ValueError, TypeError, ImportError, FileNotFoundError) as exc:
                raise ConfigError(f"--reward_fn: {exc}") from None
        data = load_rl_data(cfg)
        tokenizer = _load_tokenizer(cfg)
        check_rl_models(cfg, tokenizer)                   # an architecture vLLM cannot serve, a missing chat template
        ids = template_ids(cfg.data.conversation_template_config, tokenizer)
        resume_from = resolve_checkpoint_path(cfg.checkpoint.checkpoint_path) if cfg.checkpoint.checkpoint_path \
            else None
    except ConfigError as exc:
        return _fail(prog, str(exc))
    plan = BufferPlan.from_config(cfg)
    print(f"[{job}] {plan.equation()}", flush=True)
    print(f"[{job}] {len(data.prompts)} prompts; per episode {cfg.rl.num_collect_steps} collect step(s) × "
          f"{plan.prompts_per_collect} prompts × {cfg.generator.n_samples_per_prompt} samples, then "
          f"{cfg.rl.num_update_steps} optimizer step(s); estimator {cfg.algorithm.advantage_estimator}, KL "
          f"{cfg.algorithm.resolved_kl_estimator} in the {cfg.algorithm.kl_mode} (coef {cfg.algorithm.kl_coef}), "
          f"reward source {cfg.reward.resolved_source()}, {'async' if cfg.rl.async_mode else 'sync'} mode", flush=True)
    for note in notes:
        print(f"[{job}] note: {note}", flush=True)
    if cfg.checkpoint.config_file:
        print(f"[{job}] resolved config -> {cfg.save(cfg.checkpoint.config_file)}", flush=True)
    return _run(cfg, job, data, tokenizer, ids, resume_from, prog, job_start)


def _run(cfg, job, data, tokenizer, ids, resume_from, prog, job_start) -> int:
    from rlhf_ray.checkpoint.layout import checkpoint_dir
    from rlhf_ray.pipelines.restart import run_with_restarts
    from rlhf_ray.placement import connect_ray, disconnect_ray

    started = time.perf_counter()
    started_ray = connect_ray()
    startup = {"job_start": job_start, "startup/ray_connect_s": time.perf_counter() - started}
    closing: list = []                  # the attempts' trackers, still drawing their plots while Ray shuts down
    try:
        return run_with_restarts(lambda path: _attempt(cfg, job, data, tokenizer, ids, path, prog, startup, closing),
                                 resume_from=resume_from, max_restarts=cfg.checkpoint.max_restarts, prog=prog,
                                 save_dir=checkpoint_dir(cfg.checkpoint.save_path, cfg.checkpoint.save_dir))
    finally:
        disconnect_ray(started_ray)
        for tracker in closing:
            tracker.wait()


def _attempt(cfg, job, data, tokenizer, ids, resume_from, prog, startup, closing: list) -> int:
    """Plan, start every role, [resume], run the episodes, export; everything started is torn down however it ends.
    `startup`: the job's start (perf_counter) and the seconds of its start-up parts so far. The tracker is closed
    without waiting for its plots and appended to `closing`, for the caller to wait on.
    A lost trainer rank is raised as RankLostError for the restart loop (a generator engine's loss is the generator
    group's own business: it re-queues that engine's prompts)."""
    from rlhf_ray.pipelines.restart import lost_ranks_raised, train_then_export
    from rlhf_ray.pipelines.rl.controller import RLController
    from rlhf_ray.pipelines.rl.groups import active_roles, start_roles
    from rlhf_ray.pipelines.rl.roles import check_plan, plan_roles, release_bundles, reserve_bundles
    from rlhf_ray.telemetry.tracker import build_tracker

    start = time.perf_counter()
    groups = controller = tracker = None
    bundles: dict = {}
    try:
        with lost_ranks_raised(lambda: [] if groups is None else [groups.policy, groups.critic, groups.reference,
                                                                  groups.reward]):
            try:
                plan = plan_roles(cfg, active_roles(cfg))
                print(check_plan(plan), flush=True)
                bundles = reserve_bundles(plan, cfg.train.placement_timeout_s)
            except ConfigError as exc:
                return _fail(prog, str(exc))
            # the template's end-of-turn ids stop a response, unless --ignore_eos asks for fixed lengths
            implicit_stops = set() if cfg.generator.ignore_eos else set(ids.stop_ids)
            generator_section = cfg.generator.model_copy(
                update={"stop_token_ids": sorted(set(cfg.generator.stop_token_ids) | implicit_stops)})
            started = time.perf_counter()
            groups = start_roles(cfg, plan, bundles, generator_section)
            startup = {**startup, "startup/groups_s": time.perf_counter() - started, **groups.startup_s}
            bundles = {}                                            # owned by `groups` from here on
            tracker = build_tracker(cfg.logging, run_name=job, config=cfg.to_dict())
            controller = RLController(cfg, job, groups, data, tokenizer,
                                      build_reward_source_for(cfg, groups, tokenizer), tracker, ids)
            controller.startup_metrics["timing/startup"] = time.perf_counter() - start
            controller.startup = startup
            if resume_from is not None:
                try:
                    controller.resume(resume_from)
                except ConfigError as exc:
                    return _fail(prog, str(exc))
                print(f"[{job}] resumed from {resume_from}: episode {controller.start_episode}, policy version "
                      f"{controller.version}", flush=True)

            def export(_result):
                if controller.simulated:                # a stand-in policy: nothing trained, nothing to export
                    return None
                where = controller.export()
                print(f"[{job}] HF policy -> {where}", flush=True)
                return where

            return train_then_export(controller.run, export, prog)
    finally:
        if tracker is not None:
            tracker.close(wait=False)
            closing.append(tracker)
        if controller is not None:
            controller.shutdown()
        if groups is not None:
            groups.shutdown()
        release_bundles(bundles)
