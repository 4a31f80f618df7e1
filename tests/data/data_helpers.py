"""Helpers shared by the data tests (not a test module): shipped template configs, cached tokenizers, decoding."""

import functools
from pathlib import Path

import numpy as np

TEMPLATES = Path(__file__).resolve().parents[2] / "rlhf_ray" / "assets" / "templates"


@functools.lru_cache(maxsize=None)
def cached_tokenizer(directory: str):
    """One load per tokenizer per session, for tests that do not change it (loading Qwen3 takes seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def labeled_segments(tokenizer, ids, mask) -> list[str]:
    """Decode each run of consecutive labeled tokens (one per assistant turn)."""
    mask = np.asarray(mask, dtype=bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in zip(edges[::2], edges[1::2])]
