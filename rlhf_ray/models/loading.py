"""Loading HF models for training and inference: dtype, attention implementation, gradient checkpointing, LoRA.

    policy = load_causal_lm(model_cfg, "fp32")                 # AutoModelForCausalLM (+ LoRA, + checkpointing)
    critic = load_value_model(model_cfg, "fp32")               # ValueHeadModel: backbone + scalar head per token
    reference = load_causal_lm(model_cfg, "bf16", for_training=False)

Training engines keep fp32 master weights and run bf16/fp16 through autocast, so trainers load in fp32; frozen
models (reference, reward at PPO time) can load directly in bf16. This module never imports torch.distributed:
parallelism is applied from outside by the engines. Inside meta_loading.defer_weights() (the sharded engines) both
loaders leave the checkpoint weights on the meta device; LoRA adapters are drawn from the RNG state at entry either
way, so both builds give the same adapters.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from torch import nn

from rlhf_ray.models.lora import apply_lora, redraw_lora_adapters
from rlhf_ray.models.meta_loading import from_pretrained_or_meta
from rlhf_ray.models.value_head import ValueHeadModel, init_value_head

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def flash_attn_available() -> bool:
    """flash-attn is importable and a CUDA device is present (it has no CPU kernels)."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(use_flash_attn: bool, compute_dtype: torch.dtype | None = None) -> str:
    """'flash_attention_2' when asked for and usable; otherwise 'sdpa' (with a logged note when it was asked for).
    flash-attn has fp16/bf16 kernels only, so an fp32 forward (compute_dtype float32) gets SDPA."""
    if use_flash_attn and compute_dtype == torch.float32:
        log.warning("--use_flash_attn with --mixed_precision fp32: flash-attention runs in fp16/bf16 only; using "
                    "PyTorch SDPA attention instead (pass --mixed_precision bf16 to use flash-attention)")
        return "sdpa"
    if use_flash_attn:
        if flash_attn_available():
            return "flash_attention_2"
        why = "flash_attn is not installed" if importlib.util.find_spec("flash_attn") is None else "no CUDA device"
        log.warning("--use_flash_attn: %s; using PyTorch SDPA attention instead", why)
    return "sdpa"


def _attention(model_cfg, compute_dtype: str | torch.dtype) -> str:
    return resolve_attn_implementation(model_cfg.use_flash_attn, resolve_dtype(compute_dtype))


def _check_pretrain(model_cfg) -> str:
    if not model_cfg.pretrain:
        raise ValueError("--pretrain is required: an HF model directory (config.json + safetensors)")
    path = Path(model_cfg.pretrain)
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"--pretrain {model_cfg.pretrain}: no config.json there; give an HF model directory "
                         f"(as written by save_pretrained)")
    return str(model_cfg.pretrain)


def _apply_training_options(model: nn.Module, model_cfg, rng_state: torch.Tensor,
                            trainable_modules: tuple[str, ...] = ()) -> nn.Module:
    if model_cfg.grad_checkpoint:
        # use_reentrant=False: works with frozen embeddings (LoRA) and with FSDP2/DTensor parameters.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.lora_rank > 0:
        apply_lora(model, model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_dropout,
                   model_cfg.lora_target_modules, trainable_modules=trainable_modules)
        redraw_lora_adapters(model, rng_state)
    return model


def load_causal_lm(model_cfg, dtype: str | torch.dtype = torch.float32, *, for_training: bool = True,
                   compute_dtype: str | torch.dtype | None = None) -> nn.Module:
    """AutoModelForCausalLM from --pretrain in `dtype`; with gradient checkpointing and LoRA when training.
    compute_dtype: what the forward runs in (--mixed_precision under autocast; default `dtype`), for the attention.

    for_training=False (reference / frozen models) skips checkpointing and LoRA and returns the model in eval mode
    with requires_grad off.
    """
    from transformers import AutoModelForCausalLM

    path = _check_pretrain(model_cfg)
    rng_state = torch.random.get_rng_state()      # LoRA adapters are drawn from it, whatever loading draws
    model = from_pretrained_or_meta(AutoModelForCausalLM, path, None, dtype=resolve_dtype(dtype),
                                    attn_implementation=_attention(model_cfg, compute_dtype or dtype))
    model.config.use_cache = False
    if not for_training:
        return _freeze(model)
    return _apply_training_options(model, model_cfg, rng_state)


def _is_sequence_classifier(path: str) -> bool:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_value_model(model_cfg, dtype: str | torch.dtype = torch.float32, *, for_training: bool = True,
                     seed: int | None = None, compute_dtype: str | torch.dtype | None = None) -> ValueHeadModel:
    """A ValueHeadModel from --pretrain.

    From a sequence-classification checkpoint (a trained reward model) the head is loaded; from a causal-LM
    checkpoint the LM head is dropped and a fresh `score` head is initialised N(0, 1/(hidden+1)) (seeded by
    `seed` when given, so every rank starts from the same head). LoRA, when configured, adapts the backbone and
    trains the head in full.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = _check_pretrain(model_cfg)
    from_reward_model = _is_sequence_classifier(path)
    config = AutoConfig.from_pretrained(path, num_labels=1)
    if config.pad_token_id is None:
        # HF's sequence classifier needs pad_token_id to find the last real token of right-padded rows.
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    rng_state = torch.random.get_rng_state()
    hf = from_pretrained_or_meta(AutoModelForSequenceClassification, path, config,
                                 new_modules=() if from_reward_model else ("score",), dtype=resolve_dtype(dtype),
                                 attn_implementation=_attention(model_cfg, compute_dtype or dtype))
    score = getattr(hf, "score", None)
    if not isinstance(score, nn.Linear):
        raise ValueError(f"--pretrain {path}: {type(hf).__name__} has no linear `score` head; value models support "
                         f"decoder LMs whose sequence-classification class has one (Llama, Qwen, Mistral, ...)")
    if not from_reward_model:
        score.to_empty(device="cpu")     # a fresh head, drawn here (also when the checkpoint weights wait on meta)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        init_value_head(score, hf.config.hidden_size, generator=generator)
    backbone = getattr(hf, hf.base_model_prefix)
    hf.config.architectures = [type(hf).__name__]     # saved config names the class that loads the head
    model = ValueHeadModel(backbone, score, hf.config)
    model.config.use_cache = False
    if not for_training:
        return _freeze(model)
    return _apply_training_options(model, model_cfg, rng_state, trainable_modules=("score",))


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
