"""Small helpers that several layers need; the bottom layer, importing nothing of rlhf_ray."""

from __future__ import annotations

import socket
from typing import Any, Sequence


def free_port() -> int:
    """A TCP port that is free on this host right now (for a rendezvous or a broadcast group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def split_evenly(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Contiguous, near-equal chunks (sizes differ by at most one), order preserved; nothing lost or duplicated."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1 (got {parts})")
    base, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        chunks.append(list(items[start:start + size]))
        start += size
    return chunks


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark in MiB (getrusage: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 20 if sys.platform == "darwin" else 1024)
