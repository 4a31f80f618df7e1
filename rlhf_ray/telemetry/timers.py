"""Named wall-clock timers for the phases of a step; read out as `timing/<name>` metrics."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class Timers:
    def __init__(self) -> None:
        self._elapsed: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._elapsed[name] += time.perf_counter() - start

    def metrics(self, reset: bool = True) -> dict[str, float]:
        out = {f"timing/{name}": seconds for name, seconds in self._elapsed.items()}
        if reset:
            self._elapsed.clear()
        return out
