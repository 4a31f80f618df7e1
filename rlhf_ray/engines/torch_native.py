"""The torch-native engine: DDP, FSDP2, FSDP2 with CPU offload, DTensor TP, and FSDP2 + TP on a 2-D mesh.

One class; the registered names choose a layout:

    ddp        DistributedDataParallel (replicated weights and optimizer), or TP + data parallelism with --tp N
    fsdp       FSDP2 fully_shard over dp (weights, grads, optimizer state sharded: ZeRO-3); with --tp N, a 2-D
               (dp, tp) mesh: TP inside each group, FSDP2 across groups
    fsdp_cpu   fsdp with CPUOffloadPolicy (sharded state kept in host memory)
    tp         DTensor tensor parallelism (needs --tp > 1); dp groups, if any, average gradients like DDP
    3d         ColossalAI's HybridParallelPlugin name; served here by fsdp + tp (see docs/engines.md)

A single process (no torch.distributed group, num_workers 1) trains the unwrapped model: nothing to shard.
Sharded layouts (fsdp, fsdp_cpu, tp, 3d) build the model with its checkpoint weights on the meta device, shard the
skeleton, then read only this rank's shards from the safetensors files (models/meta_loading.py,
parallelize.materialize_from_checkpoint): a rank's start-up memory is its shard plus one tensor, not the full
model. --meta_init false (or a checkpoint transformers must convert on load) builds the full model first; ddp
replicates the weights, so it always does.
Inside a WorkerGroup the default process group already exists (gloo on CPU; on GPU the device map cpu:gloo,cuda:nccl,
so CPU metric tensors and CUDA tensors each find a backend); the engine builds its device mesh on top of it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from rlhf_ray.checkpoint.hf_export import write_hf_directory, write_peft_adapter
from rlhf_ray.engines.base import LossFn, TrainEngine
from rlhf_ray.engines.optim import WarmupCosineSchedule, build_optimizer
from rlhf_ray.engines.parallelize import (all_reduce_mean_grads, apply_ddp, apply_fsdp, apply_tp, build_mesh,
                                          materialize_from_checkpoint)
from rlhf_ray.engines.precision import AUTOCAST_DTYPES, DynamicLossScaler, autocast_context
from rlhf_ray.engines.plugins import TORCH_NATIVE, VALIDATORS
from rlhf_ray.engines.registry import register_engine
from rlhf_ray.engines.weights import global_grad_norm, iter_full_weights, iter_lora_weights, scale_grads_
from rlhf_ray.models.lora import build_lora_config, has_lora
from rlhf_ray.models.meta_loading import CheckpointReader, defer_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """How the ranks share the model: data parallelism kind, TP size, offload."""

    data_parallel: str          # "ddp" (replicate) or "fsdp" (shard)
    tp: int = 1
    cpu_offload: bool = False

    @property
    def shards_weights(self) -> bool:
        """Each rank holds only part of the weights (FSDP2 or TP), so it can load only that part."""
        return self.data_parallel == "fsdp" or self.tp > 1


def training_device(parallel) -> torch.device:
    """cuda:<current> when this rank reserved GPUs and CUDA is visible, else cpu."""
    if parallel.gpus_per_worker > 0 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class TorchNativeEngine(TrainEngine):
    """DDP / FSDP2 / TP engine on one rank. See the module docstring for the layouts."""

    def __init__(self, name: str, layout: Layout, parallel, train, model_factory: Callable[[], nn.Module],
                 num_training_steps: int, model_cfg=None) -> None:
        self.name = name
        self.layout = layout
        self.train_cfg = train
        self.model_cfg = model_cfg
        self.accumulation_steps = train.accumulation_steps
        self.mixed_precision = train.mixed_precision
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if distributed else 1
        self.rank = dist.get_rank() if distributed else 0
        if self.world_size != parallel.num_workers:
            raise ValueError(f"--plugin {name}: --num_workers {parallel.num_workers} but the process group has "
                             f"{self.world_size} rank(s); start the engine inside a WorkerGroup of "
                             f"{parallel.num_workers} workers (or set --num_workers {self.world_size})")
        self.tp = layout.tp
        self.dp = self.world_size // self.tp
        self.device = training_device(parallel)

        # Same seed on every rank: identical initial weights for anything the factory initialises randomly.
        torch.manual_seed(train.seed)
        with defer_weights(layout.shards_weights and parallel.meta_init) as deferred:
            module = model_factory()
        self._hf_module = module                 # the module before any wrapper (FSDP2/TP modify it in place)
        if deferred is not None and deferred.checkpoint_dir:
            self.model = self._parallelize_and_load(module, deferred.checkpoint_dir)
        else:
            self.model = self._parallelize(module.to(self.device))
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, train.lr, train.weight_decay)
        self.scheduler = WarmupCosineSchedule(self.optimizer, num_training_steps, train.warmup_steps)
        self.scaler = DynamicLossScaler() if self.mixed_precision == "fp16" else None
        self.micro_step = 0
        self.global_step = 0
        log.info("engine %s: world %d = dp %d × tp %d, device %s, precision %s, %d optimizer steps (warmup %d)",
                 name, self.world_size, self.dp, self.tp, self.device, self.mixed_precision, num_training_steps,
                 self.scheduler.warmup_steps)

    # ------------------------------------------------------------ setup
    def _parallelize(self, module: nn.Module) -> nn.Module:
        layout = self.layout
        self._dp_group = None
        if self.world_size == 1:
            if layout.tp > 1:
                raise ValueError(f"--tp {layout.tp} needs {layout.tp} ranks; got a single process")
            return module
        if layout.tp > 1 and has_lora(module):
            raise ValueError("--tp > 1 with --lora_rank > 0 is not supported (the TP plan shards the Linear layers "
                             "that LoRA wraps); use --plugin fsdp with --tp 1 for LoRA")
        mesh = build_mesh(self.device.type, self.dp, layout.tp)
        self.mesh = mesh
        if layout.tp > 1:
            apply_tp(module, mesh["tp"])
        if layout.data_parallel == "fsdp":
            # bf16/fp16: FSDP2 all-gathers and computes in that dtype and reduces gradients in fp32, keeping
            # fp32 master shards for the optimizer (autocast still chooses per-op precision).
            apply_fsdp(module, mesh["dp"], cpu_offload=layout.cpu_offload,
                       param_dtype=AUTOCAST_DTYPES.get(self.mixed_precision))
            return module
        if layout.tp == 1:
            return apply_ddp(module, self.device)
        if self.dp > 1:
            self._dp_group = mesh["dp"].get_group()      # TP + replicated data parallelism: average at the step
        return module

    def _parallelize_and_load(self, module: nn.Module, checkpoint_dir: str) -> nn.Module:
        """Shard a model whose checkpoint weights are on the meta device, then read this rank's shards only: peak
        host memory is about the shard plus one tensor, not the full model per rank."""
        fresh = {name: p.detach() for name, p in module.named_parameters() if not p.is_meta}   # LoRA, a new head
        buffers = dict(module.named_buffers())
        model = self._parallelize(module.to("meta"))
        device = torch.device("cpu") if self.layout.cpu_offload else self.device    # offloaded shards live on CPU
        materialize_from_checkpoint(module, CheckpointReader.open(checkpoint_dir), device, fresh, buffers)
        return model

    # ------------------------------------------------------------ training
    def _sync_context(self, boundary: bool):
        """Defer gradient communication on micro-batches that do not end an accumulation."""
        if boundary:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):                       # DDP
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):    # FSDP2: accumulate unsharded, reduce once
            return _fsdp_no_sync(self.model)
        return contextlib.nullcontext()

    def forward_backward(self, batch: dict[str, Any], loss_fn: LossFn) -> dict[str, float]:
        boundary = (self.micro_step + 1) % self.accumulation_steps == 0
        batch = _to_device(batch, self.device)
        with self._sync_context(boundary):
            with autocast_context(self.mixed_precision, self.device):
                loss, metrics = loss_fn(self.model, batch)
            scaled = loss.float() / self.accumulation_steps
            if self.scaler is not None:
                scaled = self.scaler.scale_loss(scaled)
            scaled.backward()
        self.micro_step += 1
        return {**{k: float(v) for k, v in metrics.items()}, "loss": float(loss.detach())}

    def optimizer_step(self) -> dict[str, float]:
        self._require_accumulation_boundary()
        params = self.trainable_parameters
        if self._dp_group is not None:
            all_reduce_mean_grads(params, self._dp_group)
        if self.scaler is not None:
            scale_grads_(params, 1.0 / self.scaler.scale)
        grad_norm = global_grad_norm(params)
        step_ok = self.scaler.update(grad_norm) if self.scaler is not None else math.isfinite(grad_norm)
        clip = self.train_cfg.grad_clip
        if step_ok:
            if clip > 0 and grad_norm > clip:
                scale_grads_(params, clip / (grad_norm + 1e-6))
            self.optimizer.step()
        else:
            log.warning("step %d: grad norm %s is not finite; optimizer step skipped", self.global_step, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.global_step += 1
        metrics = {"grad_norm": grad_norm, "lr": lr, "skipped": 0.0 if step_ok else 1.0}
        if self.scaler is not None:
            metrics["loss_scale"] = self.scaler.scale
        return metrics

    @torch.no_grad()
    def forward(self, batch: dict[str, Any], fn: Callable[[nn.Module, dict[str, Any]], Any]) -> Any:
        batch = _to_device(batch, self.device)
        with autocast_context(self.mixed_precision, self.device):
            return fn(self.model, batch)

    # ------------------------------------------------------------ weights
    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors, LoRA merged; collective under FSDP/TP (every rank must iterate)."""
        yield from iter_full_weights(self._hf_module, merge_lora=True)

    def save_hf(self, directory: str | Path, tokenizer: Any = None, dtype: torch.dtype | None = None) -> None:
        module = self._hf_module
        merge = self.model_cfg is None or self.model_cfg.merge_lora_weights
        is_writer = self.rank == 0
        if has_lora(module) and not merge:
            lora_config = build_lora_config(self.model_cfg, self.model_cfg.pretrain if self.model_cfg else None)
            write_peft_adapter(directory, iter_lora_weights(module), lora_config=lora_config, tokenizer=tokenizer,
                               is_writer=is_writer, agree=self.agree)
            return
        write_hf_directory(directory, self.iter_weights(), config=module.config,
                           generation_config=getattr(module, "generation_config", None), tokenizer=tokenizer,
                           dtype=dtype, is_writer=is_writer, agree=self.agree)

    # ------------------------------------------------------------ checkpoints
    # checkpoint.sharded imports torch.distributed.checkpoint (~0.7 s): only a rank that saves or loads pays it, not
    # the driver, which imports this module to validate --plugin.
    def _save_model_and_optimizer(self, directory: Path) -> None:
        from rlhf_ray.checkpoint.sharded import save_model_state, save_optimizer_state

        save_model_state(directory / "model", self.model)
        save_optimizer_state(directory / "optimizer", self.model, self.optimizer, is_writer=self.rank == 0)

    def _load_model_and_optimizer(self, directory: Path) -> None:
        from rlhf_ray.checkpoint.sharded import load_model_state, load_optimizer_state

        load_model_state(directory / "model", self.model)
        load_optimizer_state(directory / "optimizer", self.model, self.optimizer)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------- registered names

def _factory(layout_fn: Callable[[Any], Layout], validate: Callable | None = None):
    def build(name, parallel, train, model_factory, num_training_steps, model_cfg=None) -> TorchNativeEngine:
        if validate is not None:
            validate(name, parallel, train)
        return TorchNativeEngine(name, layout_fn(parallel), parallel, train, model_factory, num_training_steps,
                                 model_cfg)
    return build


_LAYOUTS: dict[str, Callable[[Any], Layout]] = {
    "ddp": lambda p: Layout("ddp", tp=p.tp),
    "fsdp": lambda p: Layout("fsdp", tp=p.tp),
    "fsdp_cpu": lambda p: Layout("fsdp", tp=p.tp, cpu_offload=True),
    "tp": lambda p: Layout("ddp", tp=p.tp),
    "3d": lambda p: Layout("fsdp", tp=p.tp),
}
for _name, _layout in _LAYOUTS.items():
    _validate = VALIDATORS.get(_name)
    register_engine(_name, doc=TORCH_NATIVE[_name], validate=_validate)(_factory(_layout, _validate))
