"""A lean decode loop for the transformers backend: one prefill, then one token per forward over a KV cache.

Why not `model.generate`: on the small models this backend serves (the CPU demo, unit jobs, a policy generating in
its own process), generate's per-step machinery (logits-processor and stopping-criteria lists, output dicts, cache
bookkeeping) is 10-15% of decode time; this loop keeps only what the generator returns. It follows generate's
semantics for the settings a generator section has, so the two agree token for token when greedy
(tests/test_hf_sampler.py):

- prompts padded on the left; each is prefilled once and its KV cache copied to its n sample rows (row r's samples
  are rows r*n .. r*n+n-1), so a GRPO group of n pays for one prefill;
- position ids count real tokens only; the prefill computes the last position's logits only where the model allows;
- temperature, then top-k, then top-p (transformers' order and tie rules, at least one token kept); temperature 0 is
  greedy on the raw logits;
- a stop id ends its row (kept in the output), later positions hold pad_id, and the loop ends when every row has.

Sampling is by inverse CDF (a cumulative sum and a binary search per row): on CPU it is several times cheaper than
torch.multinomial or an exponential race over the vocabulary, and exact. The random stream is torch's global
generator, so seeding it before the call reproduces a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_ray.models.inputs import forward_accepts, position_ids_for


@dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int
    temperature: float                      # 0: greedy
    top_k: int                              # 0 or less: off
    top_p: float                            # 1.0: off
    stop_ids: tuple[int, ...]
    pad_id: int
    logprobs_mode: str                      # 'processed' (after temperature/top-k/top-p) or 'raw'


def filter_scores(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k then top-p drop from (rows, vocab) scores, with transformers' rules: top-k keeps
    every token tied with the k-th; top-p keeps the smallest high-probability set whose mass reaches top_p."""
    if 0 < top_k < scores.size(-1):
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        drop[..., -1] = False                                       # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def inverse_cdf_sample(log_probs: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from softmax-normalised log_probs: the first token whose cumulative probability
    exceeds a uniform draw scaled to the row's total (zero-probability tokens can never be that first one)."""
    cumulative = log_probs.exp().cumsum(dim=-1)
    total = cumulative[:, -1:]
    token = torch.searchsorted(cumulative, torch.rand_like(total) * total, right=True)
    # float rounding can put the draw at the total itself: take the last token with mass (argmax: first maximum)
    return torch.minimum(token.squeeze(-1), cumulative.argmax(dim=-1))


@torch.no_grad()
def decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
           settings: DecodeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `n` continuations of each left-padded prompt row; returns (tokens, their log-probs), both
    (rows * n, steps) with steps <= max_new_tokens (fewer when every row stopped early)."""
    from transformers import DynamicCache

    prompts, width = input_ids.shape
    rows, steps = prompts * n, settings.max_new_tokens
    mask = torch.ones((rows, width + steps), dtype=attention_mask.dtype, device=input_ids.device)
    mask[:, :width] = attention_mask.repeat_interleave(n, dim=0)
    prompt_positions = position_ids_for(attention_mask)
    tokens = torch.full((rows, steps), settings.pad_id, dtype=torch.long, device=input_ids.device)
    logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=input_ids.device)
    stop_ids = torch.tensor(settings.stop_ids, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    cache = DynamicCache(config=model.config)
    last_only = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}

    # each prompt is prefilled once; its cache (and last logits) are then copied to its n sample rows
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=prompt_positions,
                past_key_values=cache, use_cache=True, **last_only)
    logits = out.logits[:, -1].float()
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
    next_position = prompt_positions[:, -1:].repeat_interleave(n, dim=0) + 1
    done = 0
    for step in range(steps):
        token, logprob = _pick(logits, settings)
        if len(settings.stop_ids):
            token = token.masked_fill(finished, settings.pad_id)
            logprob = logprob.masked_fill(finished, 0.0)
            finished |= torch.isin(token, stop_ids)
        tokens[:, step], logprobs[:, step] = token, logprob
        done = step + 1
        if done == steps or (len(settings.stop_ids) and bool(finished.all())):
            break
        out = model(input_ids=token[:, None], attention_mask=mask[:, :width + done], position_ids=next_position,
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        next_position = next_position + 1
    return tokens[:, :done], logprobs[:, :done]


def _pick(logits: torch.Tensor, settings: DecodeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its log-prob under the configured mode."""
    if settings.temperature == 0:
        token = logits.argmax(dim=-1)
        return token, torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
    scores = logits if settings.temperature == 1.0 else logits / settings.temperature
    processed = torch.log_softmax(filter_scores(scores, settings.top_k, settings.top_p), dim=-1)
    token = inverse_cdf_sample(processed)
    chosen = processed if settings.logprobs_mode == "processed" else torch.log_softmax(logits, dim=-1)
    return token, chosen.gather(-1, token[:, None]).squeeze(-1)
