"""Atomic checkpoint directories: every rank writes into a temporary sibling, rank 0 renames it into place.

    with atomic_directory(path, is_writer=rank == 0, agree=engine.agree) as tmp:
        ... every rank writes its files under tmp ...
    # here `path` holds the complete checkpoint, or (after a crash) the previous one, never a half-written one

A finished directory carries `MANIFEST.json` (sha256 and size of every file, written once all ranks are done) and
then a `COMPLETE` marker, both before the rename. `is_complete` checks the marker, `verify_checkpoint` the manifest,
`latest_checkpoint` finds the newest `step_*` directory that passes both (naming each one it skips), and
`rotate_checkpoints` keeps the newest N. All ranks must see the same filesystem (a shared volume on multi-node
clusters), as with any sharded checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

COMPLETE_MARKER = "COMPLETE"
MANIFEST_FILE = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _alone(ok: bool) -> bool:
    return ok


class PeerWriteError(OSError):
    """Another rank failed its part of a collective write; that rank raises the error itself."""


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, is_writer: bool = True, agree: Callable[[bool], bool] = _alone,
                     seal: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on clean exit it replaces `path` in one rename.

    agree(ok) -> whether every rank passed ok=True: a collective that is also the barrier between the phases
    (prepare, every rank writes, rank 0 seals and renames). A rank that fails a phase passes False, so every rank
    leaves together: the one that failed with its error, the others with PeerWriteError, instead of waiting in a
    barrier for the collective timeout. (A rank that fails inside a collective of the write itself, e.g. a
    sharded state-dict gather, still leaves its peers in that collective.)
    seal: write MANIFEST.json and the COMPLETE marker (resumable checkpoints); False for an HF export, which the
    rename alone makes atomic and whose readers (transformers, vLLM) expect no extra files."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")

    def phase(step: Callable[[], None], what: str) -> None:
        error = None
        try:
            step()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others have been told
            error = exc
        if not agree(error is None):
            if error is not None:
                raise error
            raise PeerWriteError(f"{final}: another rank failed to {what}; its error names the cause")

    def prepare() -> None:
        if is_writer:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)           # left by a run that died mid-save
            tmp.mkdir()

    def seal_and_rename() -> None:
        if not is_writer:
            return
        if seal:
            write_manifest(tmp)
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

    phase(prepare, "prepare the directory")
    try:
        try:
            yield tmp
        except BaseException:
            agree(False)                     # the others wait in the agree below: they leave too
            raise
        phase(lambda: None, "write its part")           # every rank has finished writing
        phase(seal_and_rename, "seal and rename it")    # nobody reads `path` before it is in place
    except BaseException:
        if is_writer:                    # a failed write leaves nothing half-written behind (a kill still may:
            shutil.rmtree(tmp, ignore_errors=True)      # the next save of the same path clears that)
        raise


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _payload_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() not in (MANIFEST_FILE, COMPLETE_MARKER))


def write_manifest(directory: Path) -> None:
    """MANIFEST.json: {"files": {relative path: {"sha256", "bytes"}}} over every file written so far (nested
    checkpoints included), flushed to disk."""
    files = {p.relative_to(directory).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in _payload_files(directory)}
    with (directory / MANIFEST_FILE).open("w") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def verify_checkpoint(path: str | Path, *, checksums: bool = True) -> str | None:
    """None when `path` is a finished checkpoint whose files match its manifest, else what is wrong. With
    checksums=False only the sizes are compared (cheap enough for every rank of a resume). Files added after the
    save (a config copy beside it) are not in the manifest and not checked."""
    path = Path(path)
    if not path.is_dir():
        return "no such directory"
    if not is_complete(path):
        return f"no {COMPLETE_MARKER} marker, so the save did not finish"
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable {MANIFEST_FILE} ({type(exc).__name__}: {exc})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if checksums and _sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST_FILE} (corrupted on disk)"
    return None


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def require_complete(path: str | Path) -> Path:
    """The path, or a ValueError saying why it cannot be resumed from (sizes only: the driver has checked the
    checksums when it resolved the path)."""
    problem = verify_checkpoint(path, checksums=False)
    if problem:
        raise ValueError(f"--checkpoint_path {path}: {problem}; resume from an earlier checkpoint")
    return Path(path)


def step_directory(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step}"


def _step_directories(save_dir: Path) -> list[tuple[int, Path]]:
    """(N, step_N) under save_dir, newest first."""
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in save_dir.iterdir() if (m := _STEP_DIR.match(child.name))]
    return sorted(found, reverse=True)


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The step_N directory with the largest N under save_dir that is complete and matches its manifest, or None.
    Each newer one that fails is skipped with a printed note naming it and why."""
    for _, child in _step_directories(Path(save_dir)):
        problem = verify_checkpoint(child)
        if problem is None:
            return child
        print(f"note: skipping checkpoint {child}: {problem}", flush=True)
    return None


def rotate_checkpoints(save_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete complete step_N directories beyond the newest `keep` (None or 0 keeps all); returns what went.
    The marker goes first, so a deletion cut short leaves a directory that is never taken for a checkpoint.
    Unfinished ones are left alone (a later save of the same step replaces them)."""
    if not keep:
        return []
    complete = [child for _, child in _step_directories(Path(save_dir)) if is_complete(child)]
    for child in complete[keep:]:
        (child / COMPLETE_MARKER).unlink()
        shutil.rmtree(child)
    return complete[keep:]
