"""Mixed precision for the torch-native engines: autocast contexts and a dynamic loss scaler for fp16.

Master weights and optimizer state stay fp32; the forward runs under `torch.autocast` in bf16 or fp16.
fp16 needs loss scaling so that small gradients do not underflow. `DynamicLossScaler` does what
`torch.amp.GradScaler` does (scale the loss, unscale the gradients, skip steps with inf/nan and halve the scale,
double it after `growth_interval` clean steps), with one difference that matters for sharded training: the
skip decision comes from the *global* gradient norm that the engine already all-reduces for clipping, so every
rank of an FSDP/TP group skips or steps together. GradScaler decides per rank from local shards. Its state is
three numbers, saved as JSON.

Measured here (torch 2.13 CPU): autocast(device_type="cpu", dtype=torch.float16) runs matmuls in fp16, so fp16
with loss scaling trains on CPU as well as on GPU (slowly: CPU fp16 kernels are not fast).
"""

from __future__ import annotations

import contextlib
import math

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(mixed_precision: str, device: torch.device):
    """torch.autocast for bf16/fp16, a null context for fp32."""
    if mixed_precision == "fp32":
        return contextlib.nullcontext()
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ValueError(f"mixed_precision {mixed_precision!r} is not one of fp32, bf16, fp16")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        # torch's own RuntimeError says neither the flag nor the GPU (pre-Ampere GPUs: V100, T4)
        raise ValueError(f"--mixed_precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         f"use --mixed_precision fp16 (loss-scaled) or fp32")
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[mixed_precision])


class DynamicLossScaler:
    """Loss scale for fp16: multiply the loss by `scale`; on overflow skip the step and halve it."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, min_scale: float = 1.0) -> None:
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.clean_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def update(self, grad_norm: float) -> bool:
        """Record one step's (already unscaled, global) grad norm; True when the optimizer should step."""
        if not math.isfinite(grad_norm):
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.clean_steps = 0
            return False
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= self.growth_factor
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
