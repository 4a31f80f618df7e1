"""ColossalAI Booster plugins under the seed's names: colossal_ddp, zero2, zero2_cpu, gemini, gemini_auto.

colossalai is an optional extra (`pip install -e '.[colossalai]' && pip install --no-deps colossalai==0.5.0`)
and is imported only when one of these backends is built. Measured with torch 2.13 / transformers 5.19 /
colossalai 0.5.0: TorchDDPPlugin trains and saves on CPU; LowLevelZeroPlugin ("device is required") and
GeminiPlugin ("not supported for cpu accelerator") refuse a CPU accelerator; HybridParallelPlugin's Llama policy
fails to import against transformers 5, so `--plugin 3d` and `--tp N` are served by the torch-native FSDP2 + TP
backend (torch_native.py) instead.

    name          ColossalAI plugin                          CPU alternative
    colossal_ddp  TorchDDPPlugin                             ddp
    zero2         LowLevelZeroPlugin(stage=2)                fsdp
    zero2_cpu     LowLevelZeroPlugin(stage=2, cpu_offload)   fsdp_cpu
    gemini        GeminiPlugin(placement_policy="static")    fsdp
    gemini_auto   GeminiPlugin(placement_policy="auto")      fsdp_cpu

Checkpoints: colossal_ddp writes the torch-native format (safetensors through DCP); zero2/gemini use the
booster's sharded checkpoint IO (model as safetensors; optimizer shards as torch.save files, which ColossalAI
reads back with torch.load, weights_only by default since torch 2.6) plus our JSON engine state and RNG files.
The zero2/gemini code paths need CUDA and are not exercised on the CPU-only CI.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from rlhf_ray.checkpoint.hf_export import write_hf_directory
from rlhf_ray.checkpoint.sharded import (load_model_state, load_optimizer_state, save_model_state,
                                         save_optimizer_state)
from rlhf_ray.engines.base import LossFn, TrainEngine
from rlhf_ray.engines.optim import WarmupCosineSchedule, build_optimizer, parameter_groups
from rlhf_ray.engines.precision import DynamicLossScaler, autocast_context
from rlhf_ray.engines.plugins import PLUGINS, check_plugin_usable, colossal_description
from rlhf_ray.engines.registry import register_engine
from rlhf_ray.engines.weights import iter_full_weights, scale_grads_

log = logging.getLogger(__name__)

def _ensure_process_group(device: torch.device) -> None:
    """ColossalAI's coordinator needs torch.distributed; a single process gets a 1-rank group."""
    if dist.is_initialized():
        return
    from rlhf_ray.engines.collectives import process_group_backend
    from rlhf_ray.utils import free_port

    backend = process_group_backend(device.type == "cuda")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    log.info("colossalai backend: started a single-rank %s process group", backend)


class ColossalEngine(TrainEngine):
    """A model boosted by a ColossalAI plugin; same interface as the torch-native engine."""

    def __init__(self, name: str, parallel, train, model_factory: Callable[[], nn.Module], num_training_steps: int,
                 model_cfg=None) -> None:
        check_plugin_usable(name, parallel, train, cuda_visible=torch.cuda.is_available())
        from colossalai.booster import Booster

        self.name = name
        self.train_cfg = train
        self.model_cfg = model_cfg
        self.accumulation_steps = train.accumulation_steps
        self.mixed_precision = train.mixed_precision
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if parallel.gpus_per_worker > 0 and torch.cuda.is_available() else torch.device("cpu"))
        _ensure_process_group(self.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.torch_ddp = name == "colossal_ddp"

        torch.manual_seed(train.seed)
        module = model_factory()
        self._hf_module = module
        plugin, optimizer = self._plugin_and_optimizer(name, module, train)
        self.booster = booster = Booster(plugin=plugin)
        self.model, self.optimizer, *_ = booster.boost(module.to(self.device), optimizer)
        self.scheduler = WarmupCosineSchedule(self.optimizer, num_training_steps, train.warmup_steps)
        # colossal_ddp runs our autocast + loss scaler; zero2/gemini run the plugin's own precision and scaler.
        self.scaler = DynamicLossScaler() if self.torch_ddp and self.mixed_precision == "fp16" else None
        self.micro_step = 0
        self.global_step = 0

    def _plugin_and_optimizer(self, name: str, module: nn.Module, train):
        from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin

        if self.torch_ddp:
            return TorchDDPPlugin(), build_optimizer(module, train.lr, train.weight_decay)
        from colossalai.nn.optimizer import HybridAdam

        precision = "fp32" if self.mixed_precision == "fp32" else self.mixed_precision
        optimizer = HybridAdam(parameter_groups(module, train.weight_decay), lr=train.lr, betas=(0.9, 0.95))
        if name.startswith("zero2"):
            plugin = LowLevelZeroPlugin(stage=2, precision=precision, initial_scale=2 ** 16, max_norm=train.grad_clip,
                                        cpu_offload=name == "zero2_cpu")
        else:
            plugin = GeminiPlugin(placement_policy="auto" if name == "gemini_auto" else "static", precision=precision,
                                  initial_scale=2 ** 16, max_norm=train.grad_clip)
        return plugin, optimizer

    # ------------------------------------------------------------ training
    def forward_backward(self, batch: dict[str, Any], loss_fn: LossFn) -> dict[str, float]:
        boundary = (self.micro_step + 1) % self.accumulation_steps == 0
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        sync = contextlib.nullcontext() if boundary or not self.torch_ddp else self.booster.no_sync(self.model)
        with sync:
            with autocast_context(self.mixed_precision if self.torch_ddp else "fp32", self.device):
                loss, metrics = loss_fn(self.model, batch)
            scaled = loss.float() / self.accumulation_steps
            if self.scaler is not None:
                scaled = self.scaler.scale_loss(scaled)
            self.booster.backward(scaled, self.optimizer)
        self.micro_step += 1
        return {**{k: float(v) for k, v in metrics.items()}, "loss": float(loss.detach())}

    def optimizer_step(self) -> dict[str, float]:
        self._require_accumulation_boundary()
        step_ok = True
        if self.torch_ddp:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.scaler is not None:
                scale_grads_(params, 1.0 / self.scaler.scale)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.train_cfg.grad_clip or float("inf")))
            step_ok = self.scaler.update(grad_norm) if self.scaler is not None else math.isfinite(grad_norm)
            if step_ok:
                self.optimizer.step()
        else:
            self.optimizer.step()                      # the plugin clips (max_norm) and skips on overflow itself
            grad_norm = self.optimizer.get_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        self.optimizer.zero_grad()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.global_step += 1
        return {"grad_norm": grad_norm, "lr": lr, "skipped": 0.0 if step_ok else 1.0}

    @torch.no_grad()
    def forward(self, batch: dict[str, Any], fn: Callable[[nn.Module, dict[str, Any]], Any]) -> Any:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast_context(self.mixed_precision if self.torch_ddp else "fp32", self.device):
            return fn(self.model, batch)

    # ------------------------------------------------------------ weights and checkpoints
    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.name.startswith("gemini"):
            # Gemini keeps parameters in chunks; its sharder gathers them (every rank gets the tensors).
            for shard, _ in self.model.state_dict_shard(max_shard_size=256, only_rank_0=False):
                yield from shard.items()
            return
        yield from iter_full_weights(self._hf_module, merge_lora=True)

    def save_hf(self, directory: str | Path, tokenizer: Any = None, dtype: torch.dtype | None = None) -> None:
        module = self._hf_module
        write_hf_directory(directory, self.iter_weights(), config=module.config,
                           generation_config=getattr(module, "generation_config", None), tokenizer=tokenizer,
                           dtype=dtype, is_writer=self.rank == 0, agree=self.agree)

    def _save_model_and_optimizer(self, directory: Path) -> None:
        if self.torch_ddp:
            save_model_state(directory / "model", self._hf_module)
            save_optimizer_state(directory / "optimizer", self._hf_module, self.optimizer.optim, self.rank == 0)
        else:
            self.booster.save_model(self.model, str(directory / "model"), shard=True, use_safetensors=True)
            self.booster.save_optimizer(self.optimizer, str(directory / "optimizer"), shard=True)

    def _load_model_and_optimizer(self, directory: Path) -> None:
        if self.torch_ddp:
            load_model_state(directory / "model", self._hf_module)
            load_optimizer_state(directory / "optimizer", self._hf_module, self.optimizer.optim)
        else:
            self.booster.load_model(self.model, str(directory / "model"))
            self.booster.load_optimizer(self.optimizer, str(directory / "optimizer"))


def _build(name, parallel, train, model_factory, num_training_steps, model_cfg=None) -> ColossalEngine:
    return ColossalEngine(name, parallel, train, model_factory, num_training_steps, model_cfg)


for _name in PLUGINS:
    register_engine(_name, doc=colossal_description(_name), validate=check_plugin_usable)(_build)
