"""LoRA through peft, injected in place so module names stay those of the HF model.

`peft.inject_adapter_in_model` adds `lora_A` / `lora_B` beside each target Linear (which becomes `.base_layer`)
without wrapping the model in a PeftModel, so the same code serves causal LMs and value models, and parallel
wrappers see an ordinary module tree. Names change only under the adapted layers:

    model.layers.0.self_attn.q_proj.weight  ->  model.layers.0.self_attn.q_proj.base_layer.weight
                                                model.layers.0.self_attn.q_proj.lora_A.default.weight  (r, in)
                                                model.layers.0.self_attn.q_proj.lora_B.default.weight  (out, r)

`hf_name` maps such a name back to the plain HF name; `lora_delta` gives B @ A * scaling for merging on export and
weight sync, computed per layer without touching the model (the trained adapters stay separate for resuming).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

ADAPTER = "default"


def apply_lora(model: nn.Module, rank: int, alpha: int, dropout: float, target_modules: list[str],
               trainable_modules: tuple[str, ...] = ()) -> nn.Module:
    """Inject LoRA adapters into `target_modules` and freeze every other weight except `trainable_modules`
    (top-level child names, e.g. ("score",) for a value head). Returns the same model, modified in place."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0:
        raise ValueError(f"lora_rank must be > 0 to apply LoRA (got {rank})")
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in target_modules if t not in present]
    if missing:
        raise ValueError(f"lora_target_modules {missing} match no Linear layer of this model; "
                         f"its Linear layer names are {sorted(present)}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        param.requires_grad = ".lora_" in name or top in trainable_modules
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %d of %d parameters trainable (%.2f%%)", rank, alpha, target_modules,
             trainable, total, 100.0 * trainable / max(total, 1))
    return model


def redraw_lora_adapters(model: nn.Module, rng_state: torch.Tensor) -> None:
    """Draw every adapter again from the CPU RNG state `rng_state` (peft's default init: A kaiming-uniform, B zero),
    allocating adapters left on the meta device. Their values then depend on that state alone, not on what loading
    the base weights drew, so a model whose base weights stay on the meta device gets the same adapters."""
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(rng_state)
        for module in model.modules():
            if is_lora_layer(module):
                for adapter in (module.lora_A[ADAPTER], module.lora_B[ADAPTER]):
                    if adapter.weight.is_meta:
                        adapter.to_empty(device="cpu")
                module.reset_lora_parameters(ADAPTER, True)


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer (checked by its attributes, so that models without LoRA never import peft)."""
    if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def hf_name(name: str) -> str:
    """A parameter name with peft's `.base_layer` removed (the name the plain HF model uses)."""
    return name.replace(".base_layer.", ".")


def lora_delta(module: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The merged update B @ A * scaling of one LoRA Linear, (out_features, in_features).

    lora_a: (r, in), lora_b: (out, r) — full tensors (already gathered when the adapters are sharded).
    """
    scaling = module.scaling[ADAPTER]
    return (lora_b.float() @ lora_a.float()) * scaling


def build_lora_config(model_cfg, base_model_path: str | None, task_type: str | None = "CAUSAL_LM"):
    """peft's LoraConfig for a ModelSection; `save_pretrained(dir)` on it writes adapter_config.json so that
    `PeftModel.from_pretrained(base, dir)` loads the adapter."""
    from peft import LoraConfig

    return LoraConfig(r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                      target_modules=list(model_cfg.lora_target_modules), bias="none",
                      base_model_name_or_path=base_model_path, task_type=task_type)
