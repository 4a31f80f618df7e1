"""The driver side of a supervised job once its inputs are checked: groups, the step loop, eval, checkpoints.

    run = SupervisedRun(cfg, job, plan, train_rows, eval_rows, prog)
    run.run(resume_from)      # plan check -> groups -> [restore] -> steps (eval, save) -> checkpoint + HF export
                              # a rank lost: groups torn down, again from the newest checkpoint (--max_restarts)

One optimizer step, as the driver sees it:

    1. data       rows of this global batch (epoch order, batch index) -> one shard per dp rank, ray.put once
    2. reference  (reference group only) each reference dp rank scores its shard; the object ref goes straight to
                  the policy ranks of that dp group, the driver never holds the log-probs
    3. train      policy.train_step on every rank -> per-rank metric sums -> merge_step_results (exact means)
    4. eval       every eval_interval steps (or at each epoch's end): the same on the held-back rows, no update
    5. save       every save_interval steps: engine state + trainer_state.json (step, epoch, batch position)

Each phase runs under a named timer (`timing/data`, `timing/train_step`, `timing/eval`, `timing/save`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import ray

from rlhf_ray.config.base import ConfigError
from rlhf_ray.checkpoint.atomic import rotate_checkpoints
from rlhf_ray.checkpoint.hf_export import CheckpointWriteError
from rlhf_ray.checkpoint.layout import CONFIG_BESIDE_CHECKPOINT, checkpoint_dir
from rlhf_ray.pipelines.restart import lost_ranks_raised, rank_lost, run_with_restarts, train_then_export
from rlhf_ray.pipelines.supervised import CHECKPOINT_STATE_FILE, StepPlan, SupervisedJob, epoch_order
from rlhf_ray.placement import ClusterCapacity, ResourcePlan, connect_ray, disconnect_ray, spec_from_parallel
from rlhf_ray.placement.groups import PlacementTimeoutError
from rlhf_ray.telemetry.progress import progress
from rlhf_ray.telemetry.timers import Timers
from rlhf_ray.telemetry.tracker import build_tracker
from rlhf_ray.utils import split_evenly
from rlhf_ray.workers.group import WorkerGroup, get_failing_fast
from rlhf_ray.workers.trainer import TrainerWorker, merge_step_results


def trainer_kwargs(cfg, job: SupervisedJob, *, frozen: bool = False) -> dict[str, Any]:
    """What one TrainerWorker is handed: only its sections (model, train, parallel) and its objective spec."""
    return {"model": cfg.model.model_dump(), "train": cfg.train.model_dump(), "parallel": cfg.parallel.model_dump(),
            "objective": job.objective, "model_kind": job.model_kind, "frozen": frozen,
            "colocated_reference": job.reference == "colocate" and not frozen}


def resume_position(state: dict[str, Any], plan: StepPlan, seed: int, path: str) -> tuple[int, int, int]:
    """(step, epoch, batch index within the epoch) to continue from; refuses a changed batch layout or seed."""
    for key, now in (("global_batch", plan.global_batch), ("seed", seed)):
        if key in state and state[key] != now:
            raise ConfigError(f"--checkpoint_path {path}: it was written with {key}={state[key]} but this run has "
                              f"{key}={now}; the data position would not mean the same rows. Resume with the same "
                              f"batch_size × dp × accumulation_steps and seed, or start without --checkpoint_path")
    step, epoch, batch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
    if batch >= plan.steps_per_epoch:
        epoch, batch = epoch + 1, 0
    return step, epoch, batch


def train_metrics(merged: dict[str, float], wall_s: float) -> dict[str, float]:
    """Merged step results -> logged metrics (loss/train, objective metrics, lr, grad_norm, perf/...)."""
    metrics = {"loss/train": merged["loss"]}
    metrics.update({key: value for key, value in merged.items() if "/" in key})
    metrics.update({key: merged[key] for key in ("lr", "grad_norm", "loss_scale") if key in merged})
    if merged.get("skipped"):
        metrics["train/skipped_step"] = merged["skipped"]   # non-finite grad norm: the optimizer step was skipped
    if merged.get("skipped_steps"):
        metrics["train/skipped_steps"] = merged["skipped_steps"]    # how many so far in this run
    metrics["perf/tokens_per_s"] = merged["tokens"] / max(wall_s, 1e-9)
    metrics["perf/worker_tokens_per_s"] = merged["tokens"] / max(merged["time_s"], 1e-9)
    metrics["perf/tokens"] = merged["tokens"]
    return metrics


class SupervisedRun:
    """One supervised job on the driver: its groups, tracker, timers and position in the data."""

    def __init__(self, cfg, job: SupervisedJob, plan: StepPlan, train_rows: list[dict], eval_rows: list[dict],
                 prog: str) -> None:
        self.cfg, self.job, self.plan, self.prog = cfg, job, plan, prog
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.timers = Timers()
        self.policy: WorkerGroup | None = None
        self.reference: WorkerGroup | None = None
        self.tracker = None

    def _say(self, message: str) -> None:
        print(f"[{self.job.name}] {message}", flush=True)

    # ------------------------------------------------------------ lifetime
    def run(self, resume_from: Path | None) -> int:
        started_ray = connect_ray()
        try:
            resources = self._resource_plan()
            if resources is None:
                return 2
            save_dir = checkpoint_dir(self.cfg.checkpoint.save_path, self.cfg.checkpoint.save_dir)
            return run_with_restarts(lambda path: self._attempt(resources, path), resume_from=resume_from,
                                     save_dir=save_dir, max_restarts=self.cfg.checkpoint.max_restarts, prog=self.prog)
        finally:
            disconnect_ray(started_ray)

    def _attempt(self, resources: ResourcePlan, resume_from: Path | None) -> int:
        """Start the groups, [restore], train and export; the groups are torn down however it ends. A lost rank
        is raised as RankLostError for the restart loop."""
        try:
            with lost_ranks_raised(lambda: (self.policy, self.reference)):
                try:
                    self._start_groups(resources)
                except PlacementTimeoutError as exc:      # a busy pool: what holds it, no traceback
                    print(f"{self.prog}: {exc}", file=sys.stderr)
                    return 2
                step, epoch, batch = 0, 0, 0
                if resume_from is not None:
                    try:
                        step, epoch, batch = self._restore(resume_from)
                    except ConfigError as exc:
                        print(f"{self.prog}: {exc}", file=sys.stderr)
                        return 2
                self.tracker = build_tracker(self.cfg.logging, run_name=self.job.name, config=self.cfg.to_dict())
                self.tracker.log(self.timers.metrics(), step=step)
                return train_then_export(lambda: self._train(step, epoch, batch, resumed=resume_from is not None),
                                         self._export, self.prog)
        finally:
            if self.tracker is not None:
                self.tracker.close()
            for group in (self.reference, self.policy):
                if group is not None:
                    group.shutdown()
            self.tracker = self.policy = self.reference = None

    def _resource_plan(self) -> ResourcePlan | None:
        """Role -> GroupSpec, printed with the cluster's numbers and checked before any actor starts."""
        resources = ResourcePlan()
        resources.add(self.job.name, spec_from_parallel(self.cfg.parallel))
        if self.job.reference == "group":
            resources.add("reference", spec_from_parallel(self.cfg.parallel))
        cluster = ClusterCapacity.from_ray()
        print(resources.describe(cluster), flush=True)
        try:
            resources.check(cluster)
        except ValueError as exc:
            print(f"{self.prog}: {exc}", file=sys.stderr)
            return None
        return resources

    def _start_groups(self, resources: ResourcePlan) -> None:
        with self.timers("startup"):
            timeout_s = self.cfg.train.placement_timeout_s
            self.policy = WorkerGroup(TrainerWorker, resources.roles[self.job.name], name=self.job.name,
                                      worker_kwargs=trainer_kwargs(self.cfg, self.job), placement_timeout_s=timeout_s)
            if self.job.reference == "group":
                self.reference = WorkerGroup(TrainerWorker, resources.roles["reference"], name="reference",
                                             worker_kwargs=trainer_kwargs(self.cfg, self.job, frozen=True),
                                             placement_timeout_s=timeout_s)
            groups = [g for g in (self.policy, self.reference) if g is not None]
            builds = [g.call_all_async("build", self.plan.total_steps) for g in groups]   # groups load in parallel
            info = get_failing_fast(builds[0])
            for pending in builds[1:]:
                get_failing_fast(pending)
        self._say(f"model: {info[0]['parameters']:,} parameters, {info[0]['trainable_parameters']:,} trainable; "
                  f"{self.policy.world_size} rank(s)")

    def _restore(self, path: Path) -> tuple[int, int, int]:
        with self.timers("resume"):
            state = self.policy.call_all("load_checkpoint", str(path))[0]
        step, epoch, batch = resume_position(state, self.plan, self.cfg.train.seed, str(path))
        self._say(f"resumed from {path}: step {step}, epoch {epoch}, batch {batch}")
        return step, epoch, batch

    def _export(self, step: int) -> str:
        with self.timers("export"):
            self.policy.call_all("save_hf", self.cfg.checkpoint.save_path)
        self.cfg.save(Path(self.cfg.checkpoint.save_path) / CONFIG_BESIDE_CHECKPOINT)
        self.tracker.log(self.timers.metrics(), step=step)
        self._say(f"HF model -> {self.cfg.checkpoint.save_path}")
        return self.cfg.checkpoint.save_path

    # ------------------------------------------------------------ the loop
    def _train(self, step: int, start_epoch: int, start_batch: int, resumed: bool) -> int:
        cfg, plan = self.cfg, self.plan
        bar = progress(total=plan.total_steps, desc=self.job.name, enabled=cfg.logging.progress, unit="step")
        bar.update(step)
        if self.eval_rows and cfg.data.eval_at_start:
            with self.timers("eval"):
                self.tracker.log(self.evaluate(), step=step)
        state: dict[str, Any] = {}
        last_saved = step if resumed else -1
        for epoch in range(start_epoch, cfg.data.max_epochs):
            order = epoch_order(plan.rows, cfg.train.seed, epoch, cfg.data.shuffle)
            for batch_index in range(start_batch if epoch == start_epoch else 0, plan.steps_per_epoch):
                if step >= plan.total_steps:
                    break
                metrics = self.train_step(order, batch_index)
                step += 1
                state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_index + 1,
                         "global_batch": plan.global_batch, "seed": cfg.train.seed}
                end_of_epoch = batch_index + 1 == plan.steps_per_epoch or step == plan.total_steps
                interval = cfg.data.eval_interval
                if self.eval_rows and ((interval and step % interval == 0) or (not interval and end_of_epoch)):
                    with self.timers("eval"):
                        metrics.update(self.evaluate())
                if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                    self.save(state)
                    last_saved = step
                metrics.update(self.timers.metrics())
                if step % cfg.logging.log_interval == 0 or "loss/eval" in metrics:
                    self.tracker.log(metrics, step=step)
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4g}" for k in self.job.headline if k in metrics})
        bar.close()
        if state and last_saved != step:
            self.save(state)        # the end of training is always resumable (and extendable with more epochs)
        return step

    def train_step(self, order: list[int], batch_index: int) -> dict[str, float]:
        """Stages 1-3 of one optimizer step; returns its metrics."""
        start = time.perf_counter()
        with self.timers("data"):
            picked = order[batch_index * self.plan.global_batch:(batch_index + 1) * self.plan.global_batch]
            shard_refs = [ray.put(s) for s in split_evenly([self.train_rows[i] for i in picked], self.plan.dp)]
        with self.timers("train_step"):
            if self.reference is None:
                results = self.policy.call_split("train_step", shard_refs)
            else:
                results = get_failing_fast(self._train_with_reference_group(shard_refs))
        merged = merge_step_results(results, self.policy.tp_size)
        return train_metrics(merged, time.perf_counter() - start)

    def _train_with_reference_group(self, shard_refs: list) -> list:
        # The reference group has the policy's layout: its dp rank i scores shard i, and that result (an object ref,
        # resolved by Ray in the policy worker) goes straight to the policy ranks of dp group i.
        ref_by_dp = self.reference.call_split_async("score_preference", shard_refs)[::self.reference.tp_size]
        return self.policy.call_split_async("train_step", shard_refs, ref_by_dp)

    def evaluate(self) -> dict[str, float]:
        """Held-back metrics: `loss/eval` and `eval/<name>` for each objective metric (e.g. eval/acc)."""
        dp, rows = self.plan.dp, self.eval_rows
        shards = split_evenly(rows, dp)
        if self.reference is not None:
            scores = get_failing_fast(self.reference.call_split_async("score_preference",
                                                             [ray.put(s) for s in shards])[::self.reference.tp_size])
            shards = [[{**row, "ref_chosen_logps": c, "ref_rejected_logps": r} for row, (c, r) in zip(shard, score)]
                      for shard, score in zip(shards, scores)]
        # Every rank makes the same number of forward passes (collective under fsdp/tp), however uneven the split.
        num_chunks = math.ceil(math.ceil(len(rows) / dp) / self.cfg.train.batch_size)
        results = self.policy.call_split("eval_step", [ray.put(s) for s in shards], num_chunks=num_chunks)
        merged = merge_step_results(results, self.policy.tp_size)
        metrics = {"loss/eval": merged.pop("loss")}
        merged.pop("units", None)
        metrics.update({"eval/" + key.split("/", 1)[-1]: value for key, value in merged.items()})
        return metrics

    def save(self, state: dict[str, Any]) -> Path:
        """A resumable checkpoint step_N (engine state on every rank) plus readable copies of config and position."""
        save_dir = checkpoint_dir(self.cfg.checkpoint.save_path, self.cfg.checkpoint.save_dir)
        directory = save_dir / f"step_{state['step']}"
        with self.timers("save"):
            try:
                self.policy.call_all("save_checkpoint", str(directory), state)
                self.cfg.save(directory / CONFIG_BESIDE_CHECKPOINT)
                (directory / CHECKPOINT_STATE_FILE).write_text(json.dumps(state, indent=2))
                rotated = rotate_checkpoints(save_dir, self.cfg.checkpoint.save_total_limit)
            except Exception as exc:
                if rank_lost(exc, (self.policy, self.reference)) is not None:
                    raise                   # a rank died: the restart loop's business, not a failed write
                raise CheckpointWriteError(directory, state["step"], exc) from exc
        self._say(f"checkpoint -> {directory}" + (f" (removed {', '.join(p.name for p in rotated)})" if rotated else ""))
        return directory
