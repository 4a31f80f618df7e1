"""Where a job's checkpoints live and how a `--checkpoint_path` given by the user resolves to one step_N directory.

    <save_path>                 the final HF export (replaced whole at the end, so checkpoints live beside it)
    <save_path>-checkpoints/    step_N/ directories (or --save_dir), each complete only with its COMPLETE marker and
                                a MANIFEST.json its files match; --save_total_limit keeps the newest N
        step_N/rlhf_ray_config.json   the resolved config of the run that wrote it
"""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.checkpoint.atomic import COMPLETE_MARKER, is_complete, latest_checkpoint, verify_checkpoint
from rlhf_ray.config.base import ConfigError

CONFIG_BESIDE_CHECKPOINT = "rlhf_ray_config.json"


def checkpoint_dir(save_path: str, save_dir: str | None = None) -> Path:
    """Where step_N checkpoints go: `save_dir`, or a sibling of `save_path` (the HF export replaces save_path
    whole, so checkpoints must not live inside it)."""
    if save_dir:
        return Path(save_dir)
    path = Path(save_path)
    return path.with_name(path.name + "-checkpoints")


def resolve_checkpoint_path(path: str) -> Path:
    """A step_N directory as given, or the newest verified step_N under a save_dir; never a partial or corrupted
    one (checksums are checked here, once, on the driver)."""
    candidate = Path(path)
    if not candidate.is_dir():
        raise ConfigError(f"--checkpoint_path {path}: no such checkpoint directory")
    if is_complete(candidate):
        problem = verify_checkpoint(candidate)
        if problem:
            raise ConfigError(f"--checkpoint_path {path}: {problem}; point it at an earlier step_N directory, or "
                              f"at its parent directory to take the newest one that verifies")
        return candidate
    latest = latest_checkpoint(candidate)
    if latest is None:
        raise ConfigError(f"--checkpoint_path {path}: neither a complete checkpoint (no {COMPLETE_MARKER} marker) nor "
                          f"a directory holding a complete step_N checkpoint; point it at a step_N directory a run "
                          f"wrote")
    return latest
