"""AdamW with decay only where it belongs, and the seed's learning-rate schedule (linear warmup, then cosine).

Pure torch: engines call these after the model is parallelised, so the parameters seen here are the ones the
optimizer will step (plain tensors, DTensor shards under FSDP2/TP).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: the cosine decays to this fraction of the peak LR (ColossalChat: CosineAnnealingWarmupLR(eta_min=0.1 * lr))
MIN_LR_RATIO = 0.1
#: warmup steps when --warmup_steps is not given: 2.5% of the optimizer steps, as the seed computes it
DEFAULT_WARMUP_FRACTION = 0.025


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and other 1-D parameters get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: decayed matrices, and undecayed norms/biases.

    Each is split again into DTensor and plain-tensor parameters: under TP only the sharded Linear weights are
    DTensors, and AdamW's foreach kernels refuse a list that mixes the two.
    """
    from torch.distributed.tensor import DTensor

    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (not no_decay(name, param), isinstance(param, DTensor))
        buckets.setdefault(key, []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0}
            for (decay, _), params in sorted(buckets.items(), key=lambda item: (not item[0][0], item[0][1]))]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (ColossalChat's HybridAdam defaults: betas (0.9, 0.95))."""
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (all requires_grad=False); check lora settings")
    # foreach works on DTensor shards too. fused (CPU and CUDA in torch 2.13) is faster but untested here on DTensor
    # shards, and a checkpoint's param_groups carry the flag back on resume.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def default_warmup_steps(num_training_steps: int) -> int:
    return int(num_training_steps * DEFAULT_WARMUP_FRACTION)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = MIN_LR_RATIO) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear from 1/warmup to 1 over `warmup_steps`, then a cosine
    from 1 down to `min_ratio` at `total_steps` (held there afterwards)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """LR schedule object with a JSON-able state (`step`), so checkpoints need no pickle."""

    def __init__(self, optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_steps: int | None = None,
                 min_ratio: float = MIN_LR_RATIO) -> None:
        if num_training_steps < 1:
            raise ValueError(f"num_training_steps must be >= 1 (got {num_training_steps})")
        self.optimizer = optimizer
        self.total_steps = num_training_steps
        self.warmup_steps = default_warmup_steps(num_training_steps) if warmup_steps is None else warmup_steps
        self.min_ratio = min_ratio
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        factor = warmup_cosine_factor(self.step_count, self.warmup_steps, self.total_steps, self.min_ratio)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_ratio": self.min_ratio, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.warmup_steps = int(state["warmup_steps"])
        self.total_steps = int(state["total_steps"])
        self.min_ratio = float(state["min_ratio"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()
