"""What a transformers causal LM's forward is handed, the same way wherever it runs: training, scoring, the
shared-prompt forward and the transformers backend's decode loop."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding does not shift them), as the generator saw them."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def forward_accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether the model's forward takes `argument` (logits_to_keep, past_key_values: not every family's does)."""
    return argument in inspect.signature(model.forward).parameters


def on_model_device(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its tensors moved to the device of the model's weights (the rest as it is)."""
    device = next(model.parameters()).device
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
