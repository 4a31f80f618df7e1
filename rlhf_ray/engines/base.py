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

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

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
    #: optimizer steps taken (restored by load_checkpoint)
    global_step: int

    @abstractmethod
    def forward_backward(self, batch: dict[str, Any], loss_fn: LossFn) -> dict[str, float]:
        """Run loss_fn under the engine's autocast, backward the loss / accumulation_steps; return loss_fn's metrics
        plus `loss` (unscaled). Gradient sync is deferred until the accumulation boundary where the backend allows."""

    @abstractmethod
    def optimizer_step(self) -> dict[str, float]:
        """Unscale (fp16), clip to grad_clip, step optimizer and scheduler, zero grads.
        Returns {'grad_norm': ..., 'lr': ...}; a non-finite grad norm skips the step and says so."""

    @abstractmethod
    def is_accumulation_boundary(self) -> bool:
        """True when the micro-batch just run completes an optimizer step's accumulation."""

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

    @abstractmethod
    def save_checkpoint(self, directory: str | Path, client_state: dict[str, Any] | None = None) -> None:
        """Resumable state: model, optimizer, scheduler, grad scaler, RNG, client_state (step, data position)."""

    @abstractmethod
    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore what save_checkpoint wrote; return client_state."""

    @abstractmethod
    def save_hf(self, directory: str | Path, tokenizer: Any = None, dtype: torch.dtype | None = None) -> None:
        """Write a plain HF directory (config + safetensors [+ tokenizer]) on rank 0, atomically; LoRA merged when
        configured (merge_lora_weights), else the adapter in peft's layout. dtype casts floating weights on export
        (default: as trained, fp32 master weights)."""

    @abstractmethod
    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over all ranks (every rank passes the same keys); identity in a single process."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""

    def unwrap(self) -> torch.nn.Module:
        """The underlying module (no parallel wrapper): backends keep it in `_hf_module` before wrapping."""
        return self._hf_module
