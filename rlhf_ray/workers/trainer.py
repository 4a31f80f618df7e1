"""TrainerWorker: one rank of a trainer group, owning one engine (or, frozen, one inference-only model).

    group = WorkerGroup(TrainerWorker, spec, name="policy", worker_kwargs=trainer_kwargs(cfg, objective))
    group.call_all("build", num_training_steps)
    results = group.call_split("train_step", shards)          # shard = this dp rank's rows of one optimizer step
    merged = merge_step_results(results, group.tp_size)       # exact means over the whole global batch

Each worker is handed only its own sections (model, train, parallel) plus an objective spec (workers/objectives.py),
never the whole job config. A step on one rank:

    rows --split into accumulation_steps micro-batches--> collate --> forward_backward(loss_fn) x accumulation
         --> optimizer_step (clip, AdamW, scheduler) --> {metric sums, units, tokens, grad_norm, lr}

The number of loss units (tokens or pairs) of the whole global step is summed over ranks with one all-reduce, so
the loss is the exact global mean (see objectives.py); `_accumulated_step` does this for the RL roles too
(rl_actor.py). `score_preference` serves DPO's reference group; `iter_weights` streams full tensors for weight sync.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch

from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
from rlhf_ray.engines.collectives import all_reduce_sums
from rlhf_ray.models.inputs import on_model_device
from rlhf_ray.models.loading import count_parameters
from rlhf_ray.workers.base import RankedWorker
from rlhf_ray.utils import split_evenly
from rlhf_ray.workers.objectives import build_objective

MODEL_KINDS = ("causal_lm", "value")


class NonFiniteStepsError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient (TrainSection.max_consecutive_bad_steps)."""

    @staticmethod
    def message(exc: BaseException) -> str:
        """The rank's own message: Ray re-raises it on the driver as a RayTaskError that is also an instance of
        this class, whose str() carries the remote traceback; `cause` is the original."""
        return str(getattr(exc, "cause", None) or exc)


class TrainerWorker(RankedWorker):
    """A Ray actor (through WorkerGroup) holding one trainable engine, or a frozen model when `frozen=True`."""

    def __init__(self, rank: int, world_size: int, *, model: dict, train: dict, parallel: dict,
                 objective: dict | None = None, model_kind: str = "causal_lm", frozen: bool = False,
                 colocated_reference: bool = False) -> None:
        super().__init__(rank, world_size)
        if model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind={model_kind!r}; expected one of {MODEL_KINDS}")
        self.model_cfg = ModelSection(**model)
        self.train_cfg = TrainSection(**train)
        self.parallel_cfg = ParallelSection(**parallel)
        self.model_kind = model_kind
        self.frozen = frozen
        self.colocated_reference = colocated_reference
        self.objective_spec = dict(objective or {})
        # One rank per reserved CPU: torch would otherwise start a thread per core of the host and oversubscribe.
        torch.set_num_threads(max(1, int(self.parallel_cfg.cpus_per_worker)))
        self.engine = None
        self.model: torch.nn.Module | None = None   # frozen mode only
        self.objective = None
        self.tokenizer = None
        self.skipped_steps = 0                      # optimizer steps skipped for a non-finite gradient (checkpointed)
        self.bad_steps_in_a_row = 0

    # ------------------------------------------------------------ construction
    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        tokenizer_dir = self.model_cfg.resolved_tokenizer_dir()
        if not tokenizer_dir:
            raise ValueError("--tokenizer_dir (or --pretrain) is required")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load_model(self, for_training: bool, dtype) -> torch.nn.Module:
        from rlhf_ray.models.loading import load_causal_lm, load_value_model

        compute = self._frozen_dtype()          # --mixed_precision: what the forward runs in (autocast when training)
        if self.model_kind == "value":
            return load_value_model(self.model_cfg, dtype, for_training=for_training, seed=self.train_cfg.seed,
                                    compute_dtype=compute)
        return load_causal_lm(self.model_cfg, dtype, for_training=for_training, compute_dtype=compute)

    def _load_frozen(self) -> torch.nn.Module:
        """An inference-only model (a frozen role's, or the reference beside the policy) on this rank's GPU when it
        has one: no engine places it."""
        return self._load_model(for_training=False, dtype=self._frozen_dtype()).to(_rank_device())

    def _frozen_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.train_cfg.mixed_precision]

    def build(self, num_training_steps: int = 1) -> dict[str, Any]:
        """Load the tokenizer and model; wrap it in the configured engine (not when frozen). Returns sizes."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()   # one "Loading weights" bar per rank is noise in job logs
        torch.manual_seed(self.train_cfg.seed)
        self.tokenizer = self._load_tokenizer()
        if self.objective_spec:
            self.objective = build_objective(self.objective_spec, self.tokenizer.pad_token_id)
        if self.frozen:
            self.model = self._load_frozen()
            module = self.model
        else:
            from rlhf_ray.engines.registry import build_engine

            self.engine = build_engine(self.parallel_cfg, self.train_cfg,
                                       lambda: self._load_model(for_training=True, dtype=torch.float32),
                                       num_training_steps, model_cfg=self.model_cfg)
            module = self.engine.unwrap()
        if self.colocated_reference:
            # The frozen reference lives beside the policy in this process (on its GPU when it has one): no extra
            # actors, no extra transfers.
            self.objective.reference_model = self._load_frozen()
        trainable, total = count_parameters(module)
        return {"rank": self.rank, "parameters": total, "trainable_parameters": trainable,
                "threads": torch.get_num_threads(), "pid": os.getpid()}

    def setup_distributed(self, master_addr: str, master_port: int, backend: str | None = None,
                          timeout_s: float | None = None) -> str:
        """RankedWorker's, its collectives bounded by --collective_timeout_s unless a timeout is given."""
        return super().setup_distributed(master_addr, master_port, backend,
                                         timeout_s or self.train_cfg.collective_timeout_s)

    # ------------------------------------------------------------ training
    def _global_sum(self, local: float) -> float:
        """Sum over the data-parallel ranks (tensor-parallel ranks share a shard, so the world sum / tp)."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return local
        return all_reduce_sums([local], self.engine.device)[0] / self.parallel_cfg.tp

    def _accumulated_step(self, micro_batches: list[dict], count_units: Callable[[dict], float],
                          loss_fn: Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict[str, float]]],
                          count_tokens: Callable[[dict], float], started: float) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches (accumulation_steps of them), the gradient being that
        of the exact mean over every loss unit of the global step (see objectives.py).

        count_units(batch): loss units of a micro-batch (tokens, pairs or sequences); their sum over the dp ranks
        (one all-reduce) gives scale = dp × accumulation_steps / global units.
        loss_fn(model, batch, scale) -> (loss summed over the batch's units × scale, metric sums over its units).
        Returns {"sums": metric sums, "units": this rank's units, "tokens": count_tokens summed, "time_s": since
        `started`, "grad_norm", "lr", "skipped"[, "loss_scale"]}; merge_step_results turns ranks' results into means.
        """
        local_units = [count_units(batch) for batch in micro_batches]
        scale = self.parallel_cfg.dp * self.train_cfg.accumulation_steps / max(self._global_sum(sum(local_units)),
                                                                               1e-12)
        sums: dict[str, float] = defaultdict(float)
        self.engine.train()
        for batch in micro_batches:
            metrics = self.engine.forward_backward(batch, lambda model, b: loss_fn(model, b, scale))
            for key, value in metrics.items():
                if key != "loss":  # the engine's unscaled `loss` is loss_sum * scale; the sums carry the truth
                    sums[key] += float(value)
        optim = self.engine.optimizer_step()
        self._count_skipped_step(optim)
        return {"sums": dict(sums), "units": float(sum(local_units)),
                "tokens": float(sum(count_tokens(batch) for batch in micro_batches)),
                "time_s": time.perf_counter() - started, "skipped_steps": float(self.skipped_steps),
                **{k: float(v) for k, v in optim.items()}}

    def _count_skipped_step(self, optim: dict[str, float]) -> None:
        """The engine skipped the step when the global grad norm was not finite (a NaN loss on any rank makes it
        so), and every rank sees that norm, so every rank counts alike and stops alike. Under fp16 an overflow skip
        is loss scaling at work: it counts toward the stop only once the scaler can back off no further."""
        skipped = bool(optim.get("skipped"))
        scaler = self.engine.scaler
        self.skipped_steps += skipped
        self.bad_steps_in_a_row = self.bad_steps_in_a_row + 1 if skipped and (
            scaler is None or scaler.scale <= scaler.min_scale) else 0
        limit = self.train_cfg.max_consecutive_bad_steps
        if limit and self.bad_steps_in_a_row >= limit:
            raise NonFiniteStepsError(
                f"optimizer step {self.engine.global_step}: {self.bad_steps_in_a_row} steps in a row were skipped "
                f"because the loss or gradient norm was not finite (grad_norm {optim.get('grad_norm')}); stopping "
                f"rather than training on broken numbers. The last checkpoint is untouched: lower --lr, check the "
                f"data of these steps, or use --mixed_precision bf16 instead of fp16; --max_consecutive_bad_steps "
                f"sets this limit (0 never stops)")

    @staticmethod
    def _attach_reference_logps(rows: list[dict], ref_logps: list[tuple[float, float]] | None) -> list[dict]:
        if ref_logps is None:
            return rows
        if len(ref_logps) != len(rows):
            raise ValueError(f"got {len(ref_logps)} reference log-prob pairs for {len(rows)} rows")
        return [{**row, "ref_chosen_logps": c, "ref_rejected_logps": r} for row, (c, r) in zip(rows, ref_logps)]

    def train_step(self, rows: list[dict], ref_logps: list[tuple[float, float]] | None = None) -> dict[str, Any]:
        """One optimizer step on this rank's rows (accumulation_steps micro-batches of batch_size rows); returns
        what _accumulated_step returns. `tokens` counts every real input token (all attention masks)."""
        start = time.perf_counter()
        rows = self._attach_reference_logps(list(rows), ref_logps)
        chunks = [c for c in split_evenly(rows, self.train_cfg.accumulation_steps) if c]
        batches = [self.objective.collate(chunk) for chunk in chunks]
        if self.colocated_reference:
            batches = [self.objective.attach_reference(batch) for batch in batches]
        return self._accumulated_step(batches, self.objective.count_units, self.objective.loss, _input_tokens, start)

    @torch.no_grad()
    def eval_step(self, rows: list[dict], num_chunks: int | None = None) -> dict[str, Any]:
        """Metric sums over this rank's eval rows; no parameter change.

        num_chunks: forward passes to make (the driver gives every rank the same number, since a sharded model's
        forward is collective); default ceil(rows / batch_size). A chunk left empty by an uneven split runs the
        first row again and discards the result.
        """
        rows = list(rows)
        num_chunks = num_chunks or max(1, -(-len(rows) // self.train_cfg.batch_size))
        sums: dict[str, float] = defaultdict(float)
        units = 0.0
        for chunk in split_evenly(rows, num_chunks):
            batch = self.objective.collate(chunk or rows[:1])
            if self.colocated_reference:
                batch = self.objective.attach_reference(batch)
            _, metrics = self._forward(batch, lambda model, b: self.objective.loss(model, b, 1.0))
            if not chunk:
                continue
            for key, value in metrics.items():
                sums[key] += float(value)
            units += self.objective.count_units(batch)
        return {"sums": dict(sums), "units": units}

    # ------------------------------------------------------------ inference (eval, scoring)
    def _forward(self, batch: dict[str, Any], fn):
        """Inference under the engine's precision, no grad. Under DDP the replica is called directly: DDP's own
        forward broadcasts buffers (a collective), which would hang when one rank scores alone. Sharded models
        (fsdp, tp) are collective by nature: call their scoring methods on every rank."""
        if self.engine is not None:
            self.engine.eval()
            return self.engine.forward(batch, lambda model, b: fn(_without_ddp(model), b))
        return frozen_forward(self.model, batch, fn)

    def score_preference(self, rows: list[dict]) -> list[tuple[float, float]]:
        """Sequence log-probs (chosen, rejected) of each preference row: what a reference group sends to DPO."""
        out: list[tuple[float, float]] = []
        for chunk in _chunks(list(rows), self.train_cfg.batch_size):
            batch = self.objective.collate(chunk)
            chosen, rejected = self._forward(batch, self.objective.sequence_logps)
            out.extend(zip(chosen.float().tolist(), rejected.float().tolist()))
        return out

    # ------------------------------------------------------------ state
    def save_checkpoint(self, directory: str, client_state: dict[str, Any] | None = None) -> str:
        """Resumable state (model, optimizer, scheduler, RNG, client_state and the skip counters); every rank
        calls it."""
        self.engine.save_checkpoint(directory, {**(client_state or {}), "skipped_steps": self.skipped_steps,
                                                "bad_steps_in_a_row": self.bad_steps_in_a_row})
        return directory

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Restore the engine and the skip counters; returns the client_state saved with it."""
        state = self.engine.load_checkpoint(directory)
        self.skipped_steps = int(state.pop("skipped_steps", 0))
        self.bad_steps_in_a_row = int(state.pop("bad_steps_in_a_row", 0))
        return state

    def save_hf(self, directory: str) -> str:
        """Plain HF directory (config, safetensors, tokenizer) that transformers and vLLM load; every rank calls it."""
        if self.engine is not None:
            self.engine.save_hf(directory, self.tokenizer)
        elif self.rank == 0:
            self.model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        return directory

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (hf_name, full CPU tensor) one at a time (a Ray streaming generator when called remotely);
        every rank of a sharded group must be iterated together, since gathering is collective."""
        source = self.engine.iter_weights() if self.engine is not None else self.model.state_dict().items()
        for name, tensor in source:
            yield name, tensor.detach().cpu().clone()

    def weight_checksum(self) -> float:
        """Sum of all weights (a cheap equality probe for tests and sync checks)."""
        source = self.engine.iter_weights() if self.engine is not None else self.model.state_dict().items()
        return float(sum(t.detach().double().sum() for _, t in source))


def _rank_device() -> torch.device:
    # Ray hides the GPUs an actor did not reserve, so a visible one is this rank's.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def frozen_forward(model: torch.nn.Module, batch: dict[str, Any], fn):
    """fn(model, batch) without grad, the batch's tensors moved to the model's device first."""
    return fn(model, on_model_device(model, batch))


def _without_ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _input_tokens(batch: dict[str, Any]) -> float:
    return float(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))


def _chunks(rows: list, size: int) -> Iterator[list]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def merge_step_results(results: list[dict[str, Any]], tp_size: int = 1) -> dict[str, float]:
    """Per-rank train/eval results -> exact means over every unit of the step.

    Ranks of one tensor-parallel group saw the same rows, so only tp rank 0 of each group is counted. `loss_sum`
    becomes `loss`; every other sum is divided by the units. grad_norm/lr are taken from rank 0 (identical on all
    ranks after the all-reduce); tokens are summed; time_s is the slowest rank's.
    """
    counted = results[::tp_size]
    units = sum(r["units"] for r in counted)
    totals: dict[str, float] = defaultdict(float)
    for result in counted:
        for key, value in result["sums"].items():
            totals[key] += value
    merged = {("loss" if key == "loss_sum" else key): value / max(units, 1e-12) for key, value in totals.items()}
    merged["units"] = units
    if "tokens" in results[0]:
        merged["tokens"] = float(sum(r["tokens"] for r in counted))
    if "time_s" in results[0]:
        merged["time_s"] = max(r["time_s"] for r in results)
    for key in ("grad_norm", "lr", "skipped", "skipped_steps", "loss_scale"):
        if key in results[0]:
            merged[key] = results[0][key]
    return merged
