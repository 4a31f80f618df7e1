"""Atomic checkpoint directories: every rank writes into a temporary sibling, rank 0 renames it into place.

    with atomic_directory(path, is_writer=rank == 0, barrier=engine_barrier) as tmp:
        ... every rank writes its files under tmp ...
    # here `path` holds the complete checkpoint, or (after a crash) the previous one, never a half-written one

A finished directory carries a `COMPLETE` marker written just before the rename; `is_complete` checks it and
`latest_checkpoint` finds the newest complete `step_*` directory for resuming. All ranks must see the same
filesystem (a shared volume on multi-node clusters), as with any sharded checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _no_barrier() -> None:
    return None


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, is_writer: bool = True,
                     barrier: Callable[[], None] = _no_barrier) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on clean exit it replaces `path` in one rename."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    if is_writer:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)           # left by a run that died mid-save
        tmp.mkdir()
    barrier()
    yield tmp
    barrier()                            # every rank has finished writing
    if is_writer:
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        _fsync_dir(tmp)
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    barrier()                            # nobody reads `path` before it is in place


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def require_complete(path: str | Path) -> Path:
    """The path, or a ValueError saying why it cannot be resumed from."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--checkpoint_path {path}: no such directory")
    if not is_complete(path):
        raise ValueError(f"--checkpoint_path {path}: no {COMPLETE_MARKER} marker, so the save did not finish; "
                         f"resume from an earlier checkpoint")
    return path


def step_directory(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step}"


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The complete `step_N` directory with the largest N under save_dir, or None."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    found = []
    for child in save_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and is_complete(child):
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None
