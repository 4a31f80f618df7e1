"""Progress bars (tqdm) that switch off cleanly for logs and CI."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool = True, unit: str = "it") -> tqdm:
    disable = not enabled or os.environ.get("RLHF_RAY_NO_PROGRESS") == "1" or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, unit=unit, dynamic_ncols=True)
