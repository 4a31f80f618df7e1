"""What `rlhf-ray sft`, `rlhf-ray rm` and `rlhf-ray dpo` share: the data section, the batch arithmetic, checkpoint
paths, and `run_supervised`, which checks the inputs before Ray starts and hands over to supervised_loop.py.

    prepared arrow rows --(epoch order, seed)--> global batch of batch_size × dp × accumulation_steps rows
        --split per dp rank, ray.put once--> [reference group: score_preference] --> policy group: train_step
        --> merged metrics (exact means) --> tracker (console/JSONL/TensorBoard/wandb), progress bar
        every eval_interval steps: eval_step on the held-back set;  every save_interval steps: resumable checkpoint
    end: checkpoint + HF export to --save_path (transformers/vLLM load it)

Data order is a pure function of (seed, epoch), so a checkpoint only records how many batches of the epoch were
consumed; resuming restores model, optimizer, scheduler and RNG (the engine) and that position (here), and the next
step is the one an uninterrupted run would have taken.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from rlhf_ray.checkpoint.layout import resolve_checkpoint_path
from rlhf_ray.config.base import ConfigError, JobConfig, Section
from rlhf_ray.config.sections import CheckpointSection, LoggingSection, ModelSection, ParallelSection, TrainSection

CHECKPOINT_STATE_FILE = "trainer_state.json"


class SupervisedDataSection(Section):
    """Prepared training data (the output of `rlhf-ray prepare`) and how it is consumed: epochs, order, evaluation."""

    dataset: list[str] = Field(description="prepared data directories (`rlhf-ray prepare --output`); rows are "
                                           "concatenated in the order given")
    eval_dataset: list[str] | None = Field(None, description="prepared held-back data for loss/eval (and accuracy)")
    max_len: int = Field(512, ge=8, description="cut every sequence to this many tokens when batching")
    max_epochs: int = Field(1, ge=1, description="passes over the training data")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (default: all epochs)")
    eval_interval: int = Field(0, ge=0, description="evaluate every N optimizer steps; 0 = at the end of each epoch")
    eval_at_start: bool = Field(False, description="also evaluate before the first step (the baseline of loss/eval)")
    shuffle: bool = Field(True, description="shuffle rows each epoch (order depends only on seed and epoch)")


class SupervisedConfig(JobConfig):
    """The sections of every supervised job; a job adds its own section and its --save_path default."""

    model: ModelSection = ModelSection()
    data: SupervisedDataSection
    train: TrainSection = TrainSection()
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()


@dataclass
class SupervisedJob:
    """What differs between the supervised jobs."""

    name: str                                   # sft | rm | dpo (run name, metric prefix)
    data_kind: str                              # the load_prepared kind: sft | preference
    model_kind: str                             # causal_lm | value
    objective: dict[str, Any]                   # build_objective spec handed to each worker
    reference: str | None = None                # None | "colocate" | "group" (DPO's frozen reference model)
    headline: tuple[str, ...] = ("loss/train",)  # metrics shown on the progress bar
    derived: dict[str, Any] = field(default_factory=dict)  # job-specific derived values to print first


@dataclass
class StepPlan:
    """Derived batch arithmetic, printed before anything starts."""

    rows: int
    dp: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    dropped_per_epoch: int

    @classmethod
    def build(cls, rows: int, data, train, parallel) -> "StepPlan":
        global_batch = train.batch_size * parallel.dp * train.accumulation_steps
        steps_per_epoch = rows // global_batch
        if steps_per_epoch == 0:
            raise ConfigError(f"--dataset has {rows} rows, fewer than one global batch: batch_size "
                              f"({train.batch_size}) × dp ({parallel.dp}) × accumulation_steps "
                              f"({train.accumulation_steps}) = {global_batch}; lower them or add data")
        total = steps_per_epoch * data.max_epochs
        if data.max_steps is not None:
            total = min(total, data.max_steps)
        return cls(rows, parallel.dp, global_batch, steps_per_epoch, total, rows - steps_per_epoch * global_batch)

    def describe(self, data, train, parallel) -> str:
        return (f"data: {self.rows} rows; global batch = batch_size {train.batch_size} × dp {parallel.dp} × "
                f"accumulation_steps {train.accumulation_steps} = {self.global_batch} rows; "
                f"{self.steps_per_epoch} steps/epoch × {data.max_epochs} epoch(s) -> {self.total_steps} optimizer "
                f"steps" + (f" (max_steps {data.max_steps})" if data.max_steps else "")
                + (f"; the last {self.dropped_per_epoch} rows of each epoch's order are left out "
                   f"(not a full global batch)" if self.dropped_per_epoch else ""))


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Row indices of one epoch: a permutation seeded by (seed, epoch), or 0..n-1 unshuffled."""
    import torch

    if not shuffle:
        return list(range(num_rows))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


def _load_rows(paths: list[str], kind: str, what: str) -> list[dict]:
    from rlhf_ray.data.loading import load_prepared

    try:
        dataset = load_prepared(paths, kind)
    except ValueError as exc:
        raise ConfigError(f"--{what}: {exc}") from None
    columns = [c for c in dataset.column_names]
    return dataset.select_columns(columns).to_list()


def _check_model(cfg) -> None:
    pretrain = cfg.model.pretrain
    if not pretrain:
        raise ConfigError("--pretrain is required: an HF model directory (config.json + safetensors)")
    if not (Path(pretrain) / "config.json").is_file():
        raise ConfigError(f"--pretrain {pretrain}: no config.json there; give an HF model directory")


def run_supervised(cfg, job: SupervisedJob) -> int:
    """Run one supervised job end to end; returns the exit status."""
    from rlhf_ray.engines.registry import validate_engine_config

    prog = f"rlhf-ray {job.name}"
    try:
        validate_engine_config(cfg.parallel, cfg.train)       # a wrong --plugin fails here, not on the ranks
        _check_model(cfg)
        train_rows = _load_rows(cfg.data.dataset, job.data_kind, "dataset")
        eval_rows = _load_rows(cfg.data.eval_dataset, job.data_kind, "eval_dataset") if cfg.data.eval_dataset else []
        if eval_rows and len(eval_rows) < cfg.parallel.dp:
            raise ConfigError(f"--eval_dataset has {len(eval_rows)} rows, fewer than the {cfg.parallel.dp} "
                              f"data-parallel ranks; give at least one row per rank")
        plan = StepPlan.build(len(train_rows), cfg.data, cfg.train, cfg.parallel)
        resume_from = resolve_checkpoint_path(cfg.checkpoint.checkpoint_path) if cfg.checkpoint.checkpoint_path \
            else None
    except ConfigError as exc:
        return _fail(prog, str(exc))
    print(f"[{job.name}] {plan.describe(cfg.data, cfg.train, cfg.parallel)}", flush=True)
    for key, value in job.derived.items():
        print(f"[{job.name}] {key}: {value}", flush=True)
    if cfg.checkpoint.config_file:
        print(f"[{job.name}] resolved config -> {cfg.save(cfg.checkpoint.config_file)}", flush=True)
    from rlhf_ray.pipelines.supervised_loop import SupervisedRun

    return SupervisedRun(cfg, job, plan, train_rows, eval_rows, prog).run(resume_from)
