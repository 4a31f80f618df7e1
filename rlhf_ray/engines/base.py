"""The training-engine interface: what a trainer worker may ask of a parallelism backend.

An engine wraps one model, its optimizer and its LR scheduler on one rank, applies the parallelism of its backend
(DDP, FSDP2, DTensor TP, a ColossalAI booster plugin) from the outside, and knows nothing of SFT, DPO or PPO: the
caller hands it a batch and a loss function.

    engine = build_engine(parallel, train, model_factory, total_steps)     # registry in engines/registry.py
    metrics = engine.forward_backward(micro_batch, loss_fn)                # loss scaled by 1/accumulation_steps
    if engine.is_accumulation_boundary(): metrics |= engine.optimizer_step()
    for name, tensor in engine.iter_weights(): ...                          # full HF-named tensors, one at a time
    engine.save_checkpoint(dir); engine.load_checkpoint(dir)                # resumable, sharded where the backend is
    engine.save_hf(dir, tokenizer)                                          # plain transformers-loadable output

`loss_fn(model, batch) -> (loss, metrics)` runs the forward pass itself, so that one engine serves causal-LM
losses, value heads and paired (chosen/rejected) forwards alike.

Collective calls: under sharded backends (FSDP2, TP) iter_weights, save_hf, save_checkpoint, load_checkpoint,
reduce_metrics and barrier gather or synchronise across ranks, so every rank must make the same calls in the same
order. forward_backward/optimizer_step are collective too, as in any data-parallel training.
Implementations: engines/torch_native.py (ddp, fsdp, fsdp_cpu, tp, 3d), engines/colossal.py (ColossalAI plugins).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from rlhf_ray.checkpoint.atomic import atomic_directory, require_complete
from rlhf_ray.checkpoint.rng import load_rng, save_rng
from rlhf_ray.engines.collectives import all_reduce_sums

log = logging.getLogger(__name__)

ENGINE_STATE_FILE = "engine_state.json"
CLIENT_STATE_FILE = "client_state.json"

LossFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


class TrainEngine(ABC):
    """One rank's view of a model being trained."""

    #: the wrapped module (DDP/FSDP/TP-parallelised); call it through loss_fn, not directly
    model: torch.nn.Module
    #: the same module before any wrapper (FSDP2/TP modify it in place): what unwrap() returns
    _hf_module: torch.nn.Module
    #: this rank and the number of ranks training the model (1 in a single process)
    rank: int
    world_size: int
    #: the registered name (--plugin), micro-batches and optimizer steps run (restored by load_checkpoint)
    name: str
    micro_step: int
    global_step: int
    accumulation_steps: int
    #: tensor-parallel size (1 unless the backend shards layers)
    tp: int = 1
    #: where this rank computes (cuda:<i> or cpu); collectives of this engine put their tensors here
    device: torch.device = torch.device("cpu")
    #: LR schedule and fp16 loss scaler (None unless this engine scales the loss itself)
    scheduler: Any
    scaler: Any = None

    @abstractmethod
    def forward_backward(self, batch: dict[str, Any], loss_fn: LossFn) -> dict[str, float]:
        """Run loss_fn under the engine's autocast, backward the loss / accumulation_steps; return loss_fn's metrics
        plus `loss` (unscaled). Gradient sync is deferred until the accumulation boundary where the backend allows."""

    @abstractmethod
    def optimizer_step(self) -> dict[str, float]:
        """Unscale (fp16), clip to grad_clip, step optimizer and scheduler, zero grads.
        Returns {'grad_norm': ..., 'lr': ...}; a non-finite grad norm skips the step and says so."""

    def is_accumulation_boundary(self) -> bool:
        """True when the micro-batch just run completes an optimizer step's accumulation."""
        return self.micro_step % self.accumulation_steps == 0

    def _require_accumulation_boundary(self) -> None:
        if not self.is_accumulation_boundary():
            raise RuntimeError(f"optimizer_step after {self.micro_step % self.accumulation_steps} of "
                               f"{self.accumulation_steps} micro-batches: gradients are not synchronised yet; "
                               f"call it when is_accumulation_boundary() is True")

    @torch.no_grad()
    @abstractmethod
    def forward(self, batch: dict[str, Any], fn: Callable[[torch.nn.Module, dict[str, Any]], Any]) -> Any:
        """Inference-only forward (eval, scoring, log-probs) under the engine's autocast, no grad."""

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    @abstractmethod
    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_parameter_name, full_tensor) one at a time (gathered from shards, LoRA merged), on every rank;
        tensors are CPU or device tensors the caller must not keep beyond its own use."""

    # ------------------------------------------------------------ checkpoints: the envelope, once
    def save_checkpoint(self, directory: str | Path, client_state: dict[str, Any] | None = None) -> None:
        """Resumable state, written atomically: model/ and optimizer/ (the backend's sharded format), rng/ (per
        rank), engine_state.json (scheduler, loss scaler, steps, layout) and client_state.json (step, data
        position). Collective: every rank calls it."""
        client_json = json.dumps(client_state or {})      # fail before writing anything if it is not JSON-able
        with atomic_directory(directory, is_writer=self.rank == 0, agree=self.agree) as tmp:
            self._save_model_and_optimizer(tmp)
            save_rng(tmp / "rng", self.rank)
            if self.rank == 0:
                (tmp / CLIENT_STATE_FILE).write_text(client_json)
                (tmp / ENGINE_STATE_FILE).write_text(json.dumps(self._engine_state(), indent=1))

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore what save_checkpoint wrote (re-sharding to this layout where the backend can); returns
        client_state."""
        directory = require_complete(directory)
        state = json.loads((directory / ENGINE_STATE_FILE).read_text())
        self._load_model_and_optimizer(directory)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step, self.micro_step = int(state["global_step"]), int(state["micro_step"])
        load_rng(directory / "rng", self.rank)
        if state["world_size"] != self.world_size or state.get("tp", 1) != self.tp:
            log.info("resumed a checkpoint of world %d (tp %d) on world %d (tp %d): weights and optimizer state "
                     "were re-sharded", state["world_size"], state.get("tp", 1), self.world_size, self.tp)
        return json.loads((directory / CLIENT_STATE_FILE).read_text())

    def _engine_state(self) -> dict[str, Any]:
        return {"plugin": self.name, "world_size": self.world_size, "tp": self.tp, "global_step": self.global_step,
                "micro_step": self.micro_step, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    @abstractmethod
    def _save_model_and_optimizer(self, directory: Path) -> None:
        """Write directory/model and directory/optimizer in the backend's format (collective)."""

    @abstractmethod
    def _load_model_and_optimizer(self, directory: Path) -> None:
        """Read what _save_model_and_optimizer wrote into this engine's model and optimizer (collective)."""

    @abstractmethod
    def save_hf(self, directory: str | Path, tokenizer: Any = None, dtype: torch.dtype | None = None) -> None:
        """Write a plain HF directory (config + safetensors [+ tokenizer]) on rank 0, atomically; LoRA merged when
        configured (merge_lora_weights), else the adapter in peft's layout. dtype casts floating weights on export
        (default: as trained, fp32 master weights)."""

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over all ranks (every rank passes the same keys); identity in a single process."""
        if not (dist.is_available() and dist.is_initialized()) or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        sums = all_reduce_sums([metrics[k] for k in keys], self.device)
        return {k: v / self.world_size for k, v in zip(keys, sums)}

    def agree(self, ok: bool) -> bool:
        """Whether every rank passed ok=True: one all-reduce on the engine's device (so also a barrier)."""
        return all_reduce_sums([0.0 if ok else 1.0], self.device)[0] == 0.0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def unwrap(self) -> torch.nn.Module:
        """The underlying module (no parallel wrapper): backends keep it in `_hf_module` before wrapping."""
        return self._hf_module
