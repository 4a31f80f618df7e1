"""Model loading: attention implementation, frozen loads, gradient checkpointing, LoRA, and the value model that
plain transformers reads back as a sequence classifier."""

from __future__ import annotations

import logging

import pytest
import torch

from rlhf_ray.config.sections import ModelSection
from rlhf_ray.models.loading import (count_parameters, load_causal_lm, load_value_model, resolve_attn_implementation,
                                     resolve_dtype)
from rlhf_ray.models.value_head import init_value_head, last_token_values, value_head_init_std

IDS = torch.randint(3, 500, (3, 12), generator=torch.Generator().manual_seed(1))


def cfg(model_dir, **kwargs) -> ModelSection:
    return ModelSection(pretrain=str(model_dir), **kwargs)


def test_sdpa_by_default_and_a_logged_fallback_for_flash_attention(caplog):
    assert resolve_attn_implementation(False) == "sdpa"
    with caplog.at_level(logging.WARNING):
        assert resolve_attn_implementation(True) == "sdpa"        # flash-attn has no CPU build
    assert "--use_flash_attn" in caplog.text and "SDPA" in caplog.text


def test_flash_attention_only_for_a_half_precision_forward(monkeypatch, caplog):
    monkeypatch.setattr("rlhf_ray.models.loading.flash_attn_available", lambda: True)   # as on a CUDA machine
    assert resolve_attn_implementation(True, torch.bfloat16) == "flash_attention_2"
    with caplog.at_level(logging.WARNING):
        assert resolve_attn_implementation(True, torch.float32) == "sdpa"   # flash-attn has no fp32 kernels
    assert "--mixed_precision fp32" in caplog.text


def test_causal_lm_loads_in_the_asked_dtype_with_sdpa(tiny_model_dir):
    model = load_causal_lm(cfg(tiny_model_dir), "bf16", for_training=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        resolve_dtype("fp8")


def test_missing_pretrain_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="--pretrain is required"):
        load_causal_lm(ModelSection())
    with pytest.raises(ValueError, match="no config.json there"):
        load_causal_lm(ModelSection(pretrain=str(tmp_path)))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir):
    results = []
    for checkpointing in (False, True):
        model = load_causal_lm(cfg(tiny_model_dir, grad_checkpoint=checkpointing))
        model.train()
        assert model.is_gradient_checkpointing == checkpointing
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_lora_trains_only_the_adapters(tiny_model_dir):
    model = load_causal_lm(cfg(tiny_model_dir, lora_rank=4, lora_target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * model.config.num_hidden_layers        # A and B, 2 targets, per layer
    assert count_parameters(model)[0] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    with pytest.raises(ValueError, match=r"lora_target_modules \['qkv'\] match no Linear layer.*'q_proj'"):
        load_causal_lm(cfg(tiny_model_dir, lora_rank=4, lora_target_modules=["qkv"]))


def test_value_head_is_initialised_the_colossalchat_way(tiny_model_dir):
    model = load_value_model(cfg(tiny_model_dir), seed=3)
    hidden = model.config.hidden_size
    expected = torch.empty(1, hidden).normal_(0.0, 1.0 / (hidden + 1), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.score.weight.detach(), expected, rtol=0, atol=0)
    assert value_head_init_std(hidden) == 1.0 / (hidden + 1)
    values = model(IDS, attention_mask=torch.ones_like(IDS))
    assert values.shape == IDS.shape and values.dtype == torch.float32


def test_value_model_with_lora_trains_adapters_and_the_head(tiny_model_dir):
    model = load_value_model(cfg(tiny_model_dir, lora_rank=4), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable
    assert all(".lora_" in n or n == "score.weight" for n in trainable)


def test_last_token_values_handles_left_and_right_padding():
    values = torch.arange(12.0).reshape(2, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    assert last_token_values(values, right).tolist() == [2.0, 11.0]
    assert last_token_values(values, left).tolist() == [5.0, 10.0]


def test_init_value_head_zeroes_a_bias():
    head = torch.nn.Linear(8, 1)
    init_value_head(head, 8)
    assert head.bias.item() == 0.0


def test_value_model_round_trips_through_hf_sequence_classification(tiny_model_dir, tmp_path):
    """save_hf of a value model -> AutoModelForSequenceClassification gives the last-token value as its logit, and
    load_value_model reads the trained head back instead of re-initialising it."""
    from engines_harness import make_engine
    from transformers import AutoModelForSequenceClassification

    engine = make_engine(tiny_model_dir, value=True)
    engine.save_hf(tmp_path / "rm")
    value_model = engine.unwrap()
    mask = torch.ones_like(IDS)
    mask[0, 8:] = 0                                          # right padding, as HF's classifier expects
    pad = value_model.config.pad_token_id
    padded = IDS.masked_fill(mask == 0, pad)
    with torch.no_grad():
        ours = last_token_values(value_model(padded, attention_mask=mask), mask)
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
        theirs = hf(padded, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    reloaded = load_value_model(cfg(tmp_path / "rm"), seed=99)      # another seed: the head must still be the same
    torch.testing.assert_close(reloaded.score.weight, value_model.score.weight, rtol=0, atol=0)
