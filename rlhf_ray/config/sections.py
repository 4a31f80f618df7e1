"""Sections shared by several jobs. Job-specific sections live beside the job that owns them.

Field names follow the seed (ColossalChat) where it has one, so `--pretrain`, `--batch_size`, `--lr`, ... work as
written in its README.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_ray.config.base import Section

MixedPrecision = Literal["fp32", "bf16", "fp16"]


class ModelSection(Section):
    """The model to train or serve."""

    pretrain: str | None = Field(None, description="HF model directory (or hub id when online) to start from")
    tokenizer_dir: str | None = Field(None, description="tokenizer directory; defaults to --pretrain")
    use_flash_attn: bool = Field(False, description="use flash-attention 2 when installed, else SDPA")
    grad_checkpoint: bool = Field(False, description="recompute activations in backward to save memory")
    lora_rank: int = Field(0, ge=0, description="LoRA rank; 0 trains all weights")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names that get LoRA adapters",
    )
    merge_lora_weights: bool = Field(True, description="merge LoRA adapters into the base weights when saving")

    def resolved_tokenizer_dir(self) -> str | None:
        return self.tokenizer_dir or self.pretrain


class TrainSection(Section):
    """Optimizer and batch settings of a trainer group.

    The same section in every training job (sft, rm, dpo, ppo, grpo); the RL jobs only change its defaults."""

    batch_size: int = Field(4, ge=1, description="samples per micro-batch on each data-parallel rank")
    accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-6, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps before cosine decay; "
                                                             "default 2.5%% of the optimizer steps")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 disables")
    mixed_precision: MixedPrecision = Field("fp32", description="compute dtype: fp32, bf16, or fp16 with loss scaling")
    seed: int = Field(42, description="random seed for data order, init and sampling")
    max_consecutive_bad_steps: int = Field(3, ge=0, description="stop the run after this many optimizer steps in a "
                                                                "row skipped for a non-finite loss or gradient; "
                                                                "0 never stops")
    collective_timeout_s: float = Field(1800.0, gt=0, description="seconds a rank waits in a collective "
                                                                   "(all-reduce, barrier) before failing: the bound on "
                                                                   "a hang when a peer is gone")
    placement_timeout_s: float = Field(120.0, gt=0, description="seconds to wait for a pool's resources to be free "
                                                                "before failing with what holds them")


class WorkerResources(Section):
    """What each worker of a role reserves, and the node pool it runs on."""

    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker reserves")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker reserves (0 on CPU clusters)")
    pool: str | None = Field(None, description="node pool the workers must run on: nodes labelled pool=<name>, or "
                                               "accelerator_type:<T> for the nodes whose GPUs Ray detects as T "
                                               "(e.g. H100)")


class ResourcesSection(WorkerResources):
    """A role's group of workers: how many, what each reserves, and on which node pool.

    Every role's resources section; ParallelSection adds a trainer's layout; the critic (the policy's ranks) has
    only WorkerResources."""

    num_workers: int = Field(1, ge=1, description="workers (Ray actors, one rank each) in the group")


class ParallelSection(ResourcesSection):
    """How a trainer group is laid out over ranks, and what each rank reserves."""

    plugin: str = Field("ddp", description="training backend: ddp, fsdp, fsdp_cpu, tp, colossal_ddp, zero2, "
                                           "zero2_cpu, gemini, gemini_auto, 3d")
    tp: int = Field(1, ge=1, description="tensor-parallel size; num_workers must be a multiple of it")
    meta_init: bool = Field(True, description="sharded backends (fsdp, fsdp_cpu, tp, 3d) build the model on the "
                                              "meta device and each rank reads only its shard of the checkpoint; "
                                              "false builds the full model on every rank first")

    @model_validator(mode="after")
    def _tp_divides(self):
        if self.num_workers % self.tp:
            raise ValueError(f"num_workers ({self.num_workers}) must be a multiple of tp ({self.tp}): "
                             f"dp × tp = num_workers; set --num_workers {self.tp * max(1, self.num_workers // self.tp)}")
        return self

    @property
    def dp(self) -> int:
        return self.num_workers // self.tp


class CheckpointSection(Section):
    """Where and when to save, and what to resume from."""

    save_path: str = Field("output/model", description="directory for the final HF-format model")
    save_interval: int = Field(0, ge=0, description="save a resumable checkpoint every N optimizer steps; 0 = only at the end")
    save_total_limit: int | None = Field(None, ge=0, description="keep only the newest N complete step_N "
                                                                 "checkpoints; 0 or unset keeps all")
    save_dir: str | None = Field(None, description="directory for resumable checkpoints (step_N/); default <save_path>-checkpoints, "
                                                     "beside --save_path, which the final export replaces whole")
    checkpoint_path: str | None = Field(None, description="resume from this checkpoint directory (a step_N/ "
                                                              "directory, or a save_dir to take its latest)")
    config_file: str | None = Field(None, description="write the resolved config here (JSON, or YAML by suffix)")
    max_restarts: int = Field(1, ge=0, description="when a trainer rank dies (actor killed, node lost), tear down "
                                                   "and resume from the newest checkpoint of this run on its own, "
                                                   "at most this many times; 0 stops with a message instead")


class LoggingSection(Section):
    """Where metrics go."""

    log_dir: str | None = Field(None, description="directory for metrics.jsonl and TensorBoard events")
    use_wandb: bool = Field(False, description="also log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = Field("rlhf-ray", description="wandb project name")
    tensorboard: bool = Field(True, description="write TensorBoard events under log_dir")
    log_interval: int = Field(1, ge=1, description="log every N optimizer steps")
    progress: bool = Field(True, description="show progress bars")
    verbose: bool = Field(False, description="print every metric on the console (default: the headline numbers; "
                                             "all of them always go to metrics.jsonl, TensorBoard and wandb)")
