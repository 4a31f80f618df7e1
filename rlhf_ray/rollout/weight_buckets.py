"""Weight buckets: a stream of (hf_name, tensor) grouped into byte-bounded buckets, each packed into one flat buffer.

    for bucket in iter_buckets(engine.iter_weights(), bucket_bytes=64 << 20):
        meta, flat = pack_bucket(bucket)          # flat: (total_bytes,) uint8, one copy of the bucket
        ... ship meta (small, plain lists) + flat over any channel ...
        named = unpack_bucket(meta, flat)         # views into flat, no copy

Why one flat uint8 buffer: every channel then moves exactly one contiguous array per bucket (one ray.put, one
broadcast), whatever the mix of dtypes; and the receiver's tensors are views into it. Only one bucket is alive at
a time on either side, so a sync never holds the whole model twice.

Bucket order follows the sender's iterator (HF parameter order: layer by layer). vLLM fuses q/k/v and gate/up
projections; its layerwise reload processes a fused layer once all its parts have arrived, so parts may straddle
buckets, but a sync must send every part of every layer it touches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

# dtype <-> name, kept as strings so the metadata survives msgpack / JSON (vLLM multiprocess RPC).
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                      torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a packed bucket."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def as_list(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.offset, self.nbytes]

    @classmethod
    def from_list(cls, row: Sequence) -> "TensorMeta":
        name, dtype, shape, offset, nbytes = row
        return cls(str(name), str(dtype), tuple(int(s) for s in shape), int(offset), int(nbytes))


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"weight sync cannot ship dtype {dtype}; supported: {sorted(_DTYPES)}")
    return name


def iter_buckets(weights: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs in order into lists of at most bucket_bytes (a larger tensor gets its own bucket).

    Pulls from `weights` lazily: a bucket is yielded before the next tensor is requested, so a gathering iterator
    (FSDP) materialises at most one bucket plus one tensor.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0 (got {bucket_bytes})")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def bucket_metadata(bucket: Sequence[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    metas, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        metas.append(TensorMeta(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes))
        offset += nbytes
    return metas


def pack_bucket(bucket: Sequence[tuple[str, torch.Tensor]],
                device: torch.device | str | None = None) -> tuple[list[list], torch.Tensor]:
    """Copy a bucket into one flat `(total_bytes,)` uint8 tensor on `device` (default: the first tensor's).

    Returns (metadata rows as plain lists, flat buffer).
    """
    metas = bucket_metadata(bucket)
    total = metas[-1].offset + metas[-1].nbytes if metas else 0
    device = device if device is not None else (bucket[0][1].device if bucket else "cpu")
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    for meta, (_, tensor) in zip(metas, bucket):
        source = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        flat[meta.offset:meta.offset + meta.nbytes].copy_(source)
    return [m.as_list() for m in metas], flat


def bucket_nbytes(metadata: Sequence[Sequence]) -> int:
    if not metadata:
        return 0
    last = TensorMeta.from_list(metadata[-1])
    return last.offset + last.nbytes


def as_uint8_tensor(buffer) -> torch.Tensor:
    """A flat uint8 tensor over `buffer` (torch tensor, numpy array, bytes, bytearray, memoryview), no copy
    where the buffer allows it."""
    if isinstance(buffer, torch.Tensor):
        return buffer.reshape(-1).view(torch.uint8)
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        if len(buffer) == 0:
            return torch.empty(0, dtype=torch.uint8)
        # read-only sources (bytes, Ray's zero-copy numpy) are only ever read: the loaders copy out of them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(buffer, dtype=torch.uint8)
    import numpy as np

    array = np.asarray(buffer).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # non-writable numpy from the object store: read-only use
        return torch.from_numpy(array)


def unpack_bucket(metadata: Sequence[Sequence], flat) -> list[tuple[str, torch.Tensor]]:
    """Views of each tensor inside `flat`, in bucket order. The views share `flat`'s memory: copy to keep."""
    flat = as_uint8_tensor(flat)
    out = []
    for row in metadata:
        meta = TensorMeta.from_list(row)
        if meta.offset + meta.nbytes > flat.numel():
            raise ValueError(f"weight bucket is truncated: {meta.name} needs bytes "
                             f"[{meta.offset}, {meta.offset + meta.nbytes}) of {flat.numel()}")
        piece = flat[meta.offset:meta.offset + meta.nbytes]
        out.append((meta.name, piece.view(_DTYPES[meta.dtype]).reshape(meta.shape)))
    return out
