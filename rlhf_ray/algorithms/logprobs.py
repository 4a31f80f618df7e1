"""Token log-probabilities and entropies from logits, without a full log-softmax copy in forward or backward.

Callers shift: a causal LM's logits at position t predict the token at t + 1, so pass `logits[:, :-1]` with
`labels = input_ids[:, 1:]` (or slice both to the response span). These functions do no shifting and no masking.

Memory: `log_softmax(logits).gather(labels)` keeps a `(batch, seq, vocab)` float32 tensor alive until backward (and
bf16 logits upcast to float32 double that). Here log p(label) = z[label] - logsumexp(z) with z = logits / T is
computed in blocks of tokens, in float32, and only the `(batch, seq)` logsumexp is saved; backward recomputes the
softmax block by block (d log p(y) / dz = onehot(y) - softmax(z)). Peak extra memory is one block of about
`BLOCK_ELEMENTS` float32 values, whatever the batch, sequence length or vocabulary.
"""

from __future__ import annotations

import torch

# Elements (tokens x vocab) per block: 2^24 float32 values = 64 MiB of temporaries.
BLOCK_ELEMENTS = 1 << 24


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scaled_block(logits: torch.Tensor, row: int, tokens: slice, dtype: torch.dtype, temperature: float):
    """logits[row, tokens] / temperature in `dtype` (a view, no copy, when nothing needs changing)."""
    block = logits[row, tokens].to(dtype)
    return block if temperature == 1.0 else block / temperature


def _blocks(logits: torch.Tensor):
    """Yield (batch index, token slice) blocks of at most ~BLOCK_ELEMENTS elements, never copying the logits."""
    batch, length, vocab = logits.shape
    step = max(1, min(length, BLOCK_ELEMENTS // max(vocab, 1)))
    for row in range(batch):
        for start in range(0, length, step):
            yield row, slice(start, start + step)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature):
        dtype = _compute_dtype(logits)
        logprobs = torch.empty(labels.shape, dtype=dtype, device=logits.device)
        logsumexp = torch.empty_like(logprobs)
        for row, tokens in _blocks(logits):
            scaled = _scaled_block(logits, row, tokens, dtype, temperature)
            block_lse = torch.logsumexp(scaled, dim=-1)
            picked = scaled.gather(-1, labels[row, tokens].unsqueeze(-1)).squeeze(-1)
            logprobs[row, tokens] = picked - block_lse
            logsumexp[row, tokens] = block_lse
        ctx.save_for_backward(logits, labels, logsumexp)
        ctx.temperature = temperature
        return logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, labels, logsumexp = ctx.saved_tensors
        temperature = ctx.temperature
        grad_logits = torch.empty_like(logits)
        for row, tokens in _blocks(logits):
            scaled = _scaled_block(logits, row, tokens, logsumexp.dtype, temperature)
            grad = grad_output[row, tokens].unsqueeze(-1).to(logsumexp.dtype)
            # d/dz [z_y - lse(z)] = onehot(y) - softmax(z); chain through z = logits / T.
            block = (scaled - logsumexp[row, tokens].unsqueeze(-1)).exp_().mul_(-grad)
            block.scatter_add_(-1, labels[row, tokens].unsqueeze(-1), grad)
            if temperature != 1.0:
                block.div_(temperature)
            grad_logits[row, tokens] = block  # copy_ casts to the logits' dtype
        return grad_logits, None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, temperature):
        dtype = _compute_dtype(logits)
        entropy = torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)
        logsumexp = torch.empty_like(entropy)
        for row, tokens in _blocks(logits):
            scaled = _scaled_block(logits, row, tokens, dtype, temperature)
            block_lse = torch.logsumexp(scaled, dim=-1)
            probs = torch.exp(scaled - block_lse.unsqueeze(-1))
            entropy[row, tokens] = block_lse - (probs * scaled).sum(dim=-1)
            logsumexp[row, tokens] = block_lse
        ctx.save_for_backward(logits, logsumexp, entropy)
        ctx.temperature = temperature
        return entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, logsumexp, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        grad_logits = torch.empty_like(logits)
        for row, tokens in _blocks(logits):
            scaled = _scaled_block(logits, row, tokens, logsumexp.dtype, temperature)
            log_probs = scaled - logsumexp[row, tokens].unsqueeze(-1)
            # dH/dz_j = -p_j * (log p_j + H)
            block = torch.exp(log_probs).mul_(log_probs.add_(entropy[row, tokens].unsqueeze(-1)))
            block.mul_(grad_output[row, tokens].unsqueeze(-1).to(block.dtype)).neg_()
            if temperature != 1.0:
                block.div_(temperature)
            grad_logits[row, tokens] = block
        return grad_logits, None


def compute_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels) under softmax(logits / temperature).

    Args:
        logits: `(batch, seq, vocab)`, any float dtype; already shifted to align with `labels`. May be a
            non-contiguous slice (e.g. `logits[:, prompt_len - 1:-1]`); it is never copied whole.
        labels: `(batch, seq)` token ids (int64). Padding positions must still hold a valid id (e.g. pad id);
            mask their result afterwards.
        temperature: the sampling temperature, so that log-probs match what the generator sampled from.
    Returns:
        `(batch, seq)` float32 (float64 for float64 logits), differentiable with respect to `logits` (first order).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (batch, seq, vocab) and labels (batch, seq); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    return _TokenLogProbs.apply(logits, labels.long(), float(temperature))


def compute_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position: `(batch, seq, vocab)` -> `(batch, seq)`.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v, computed blockwise like `compute_token_logprobs`. Float32 output
    (float64 for float64 logits), differentiable (first order).
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits (batch, seq, vocab), got {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    return _Entropy.apply(logits, float(temperature))
