"""What preparation needs from a tokenizer, in a form that travels cheaply to worker processes.

A HF fast tokenizer is a thin Python layer over a Rust `tokenizers.Tokenizer`. Preparation only needs batch
encoding with character offsets, decoding (for previews) and the bos/eos ids, so TokenEncoder keeps the Rust
tokenizer alone: workers unpickle it without importing transformers (seconds per worker on a busy machine), and
encoding skips the Python conversion layer. Tokenizers without a Rust backend (slow, Python-only) are kept whole
and called as usual. tests/data/test_data_tokenize.py checks that both paths give the same ids.
"""

from __future__ import annotations

import numpy as np


class TokenEncoder:
    """Batch encode (ids and (seq, 2) char offsets, no special tokens added) and decode. Picklable."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())  # a copy, so the caller's settings stay as they are
            backend.no_truncation()
            backend.no_padding()
        self._backend = backend
        self._tokenizer = None if backend is not None else tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def encode(self, texts: list[str]) -> tuple[list[list[int]], list[np.ndarray]]:
        if not texts:
            return [], []
        if self._backend is not None:
            encodings = self._backend.encode_batch(texts, add_special_tokens=False)
            return ([e.ids for e in encodings],
                    [np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) for e in encodings])
        encoded = self._tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return (list(encoded["input_ids"]),
                [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in encoded["offset_mapping"]])

    def decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=False)
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def as_encoder(tokenizer) -> TokenEncoder:
    return tokenizer if isinstance(tokenizer, TokenEncoder) else TokenEncoder(tokenizer)
