"""Full weights out of (possibly sharded) modules, one tensor at a time, and the global gradient norm.

Both are collective under FSDP2/TP: DTensors are gathered with `full_tensor()`, so every rank must walk the same
modules in the same order (named_modules order is deterministic, so it does).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from rlhf_ray.models.lora import ADAPTER, hf_name, is_lora_layer, lora_delta


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered when it is a DTensor shard, as-is otherwise (detached)."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def _persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield name, buffer


def iter_full_weights(module: nn.Module, merge_lora: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) for every parameter and persistent buffer of `module`, once each.

    With merge_lora, LoRA layers yield their base weight plus B @ A * scaling under the plain HF name (and no
    lora_A/lora_B entries); without it, the raw names (`...base_layer.weight`, `...lora_A.default.weight`).
    Tied parameters (shared embeddings) are yielded once, under their first name. Names and layouts are those of
    the HF checkpoint (what save_pretrained writes and vLLM loads): transformers 5 packs MoE experts into one 3-D
    tensor in memory (`experts.gate_up_proj`), yielded here as per-expert `experts.<i>.gate_proj.weight` etc.
    At most one gathered layer is alive at a time on top of the caller's own use.
    """
    to_checkpoint = _checkpoint_layout(module)
    for name, tensor in _iter_module_weights(module, merge_lora):
        if to_checkpoint is None:
            yield name, tensor
        else:
            yield from to_checkpoint(name, tensor)


def _checkpoint_layout(module: nn.Module):
    """A (name, tensor) -> [(checkpoint name, tensor), ...] function when transformers converts this model's
    weights on load (MoE expert packing), else None."""
    from transformers import PreTrainedModel
    from transformers.core_model_loading import WeightConverter, revert_weight_conversion

    if not isinstance(module, PreTrainedModel):
        return None
    conversions = getattr(module, "_weight_conversions", None)
    if conversions is None:                  # built from a config, not from_pretrained: the class's default mapping
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(module, add_legacy=False)
    if not any(isinstance(c, WeightConverter) for c in conversions):
        return None                          # nothing packed: module names are the checkpoint names
    return lambda name, tensor: revert_weight_conversion(module, {name: tensor}).items()


def _iter_module_weights(module: nn.Module, merge_lora: bool) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    lora_prefixes: list[str] = []
    for module_name, child in module.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if merge_lora and any(prefix.startswith(p) for p in lora_prefixes):
            continue                                     # inside a LoRA layer already merged
        if merge_lora and is_lora_layer(child):
            lora_prefixes.append(prefix)
            yield from _merged_lora_layer(module_name, child, seen)
            continue
        for name, param in list(child._parameters.items()) + list(_persistent_buffers(child)):
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            yield prefix + name, full_tensor(param)


def _merged_lora_layer(module_name: str, layer: nn.Module, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    base = layer.base_layer
    seen.update(id(p) for p in layer.parameters())
    weight = full_tensor(base.weight)
    if ADAPTER in layer.lora_A:
        delta = lora_delta(layer, full_tensor(layer.lora_A[ADAPTER].weight), full_tensor(layer.lora_B[ADAPTER].weight))
        weight = (weight.float() + delta).to(weight.dtype)
    yield hf_name(f"{module_name}.weight"), weight
    if getattr(base, "bias", None) is not None:
        yield hf_name(f"{module_name}.bias"), full_tensor(base.bias)


def iter_lora_weights(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Only the LoRA adapter tensors, full, with their raw names (for peft-format adapter export)."""
    for name, param in module.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            yield name, full_tensor(param)


def global_grad_norm(parameters: list[nn.Parameter]) -> float:
    """L2 norm of all gradients as if the model were unsharded; identical on every rank.

    Plain-tensor gradients are complete on each rank (DDP has averaged them; parameters replicated across a TP
    group receive identical gradients). DTensor gradients are reduced over their own mesh: grouped by mesh so that
    FSDP+TP models, whose parameters live on the 2-D mesh or on its dp sub-mesh, each add their part once.
    """
    plain: list[torch.Tensor] = []
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            by_mesh.setdefault(grad.device_mesh, []).append(grad)
        else:
            plain.append(grad)
    total_sq = 0.0
    if plain:
        total_sq += float(torch.nn.utils.get_total_norm(plain, 2.0, foreach=True)) ** 2
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += float(norm) ** 2
    return math.sqrt(total_sq)


def scale_grads_(parameters: list[nn.Parameter], factor: float) -> None:
    """Multiply every gradient in place (clipping, fp16 unscaling); DTensor and plain grads alike."""
    plain = [p.grad for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    sharded = [p.grad for p in parameters if isinstance(p.grad, DTensor)]
    for grads in (plain, sharded):
        if grads:
            torch._foreach_mul_(grads, factor)
