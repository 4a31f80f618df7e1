"""Response logits with each distinct prompt run once: GRPO samples n responses per prompt, and the policy update,
the reference pass and the old-log-prob pass would otherwise compute every prompt n times.

    logits = shared_prompt_logits(model, sequences, attention_mask, response_len)      # (B, R, V) or None

equals `model(sequences).logits[:, P - 1 : P + R - 1]` (prompts left-padded to P columns, responses in the last R)
to float rounding. The distinct prompts (ids and mask) go through the model once and fill a KV cache; its rows are
gathered to the B samples (differentiably: a prompt's gradient is the sum over its samples), and the response
tokens run against it. It returns None, for the caller's full forward, wherever that would not be exact or safe: a
model that is not a plain transformers model (DDP, FSDP, tensor-parallel and LoRA wrappers), gradient checkpointing
(it turns the cache off), layers other than full attention (sliding windows, linear attention), or no prompt that
repeats in the micro-batch.
"""

from __future__ import annotations

import torch

from rlhf_ray.models.inputs import forward_accepts, position_ids_for


def shared_prompt_logits(model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                         response_len: int) -> torch.Tensor | None:
    rows, width = sequences.shape
    prompt_len = width - response_len
    # the model first: torch.unique waits for the device, which a model that can never share should not pay
    if response_len < 1 or prompt_len < 1 or not can_share_prompts(model):
        return None
    key = torch.cat([sequences[:, :prompt_len], attention_mask[:, :prompt_len].to(sequences.dtype)], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if distinct.shape[0] == rows:
        return None
    from transformers import DynamicCache

    prompts, prompt_mask = distinct[:, :prompt_len], distinct[:, prompt_len:].to(attention_mask.dtype)
    cache = DynamicCache(config=model.config)
    last_only = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
    first = model(input_ids=prompts, attention_mask=prompt_mask, position_ids=position_ids_for(prompt_mask),
                  past_key_values=cache, use_cache=True, **last_only).logits[:, -1:]
    first = first[inverse]                                          # (B, 1, V): predicts each first response token
    if response_len == 1:
        return first
    cache.batch_select_indices(inverse)
    rest = model(input_ids=sequences[:, prompt_len:width - 1], attention_mask=attention_mask[:, :width - 1],
                 position_ids=position_ids_for(attention_mask)[:, prompt_len:width - 1], past_key_values=cache,
                 use_cache=True).logits
    return torch.cat([first, rest], dim=1)


def can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether a prompt's KV cache can stand in for its forward pass in this model, exactly."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or getattr(model.config, "is_encoder_decoder", False):
        return False
    if getattr(model, "is_gradient_checkpointing", False) or _sharded(model):
        return False
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return False
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or ())):
        return False
    return forward_accepts(model, "past_key_values")


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # tensor parallelism may leave some weights (embeddings) plain: any DTensor means the model is sharded
    return isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in model.parameters())
