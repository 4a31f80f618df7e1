"""Automatic resume after a trainer rank dies: the restart loop every training job runs its attempts in.

    status = run_with_restarts(attempt, resume_from=path_or_None, save_dir=..., max_restarts=cfg.checkpoint.max_restarts,
                               prog="rlhf-ray sft")
    # attempt(resume_from) starts the groups, [restores], trains; its `finally` tears every group down

An attempt that loses a rank raises RankLostError (see `rank_lost`). The loop then starts a fresh attempt from the
newest complete checkpoint this job wrote (or the one it was started from, or the beginning), at most max_restarts
times, printing one line per restart. Resume is exact (data position, weights, optimizer, schedule, RNG), so the loss
curve after a restart is the uninterrupted run's. Any other error is not retried.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from ray.exceptions import RayActorError

from rlhf_ray.checkpoint.atomic import COMPLETE_MARKER, latest_checkpoint


class RankLostError(RuntimeError):
    """An actor of a training group died (killed, out of memory, its node lost) during an attempt."""


def rank_lost(exc: BaseException, groups: Iterable) -> RankLostError | None:
    """A RankLostError when `exc` came from a dead actor, else None (the error is the job's own and is re-raised).

    The driver may first see a surviving rank's error (its collective failed because the peer's socket closed), so
    besides RayActorError the groups are probed: any rank whose ping fails means a rank is gone."""
    lost = [f"{group.name} rank {rank}" for group in groups if group is not None for rank in group.lost_ranks()]
    if lost:
        return RankLostError(f"lost {', '.join(lost)}")
    if isinstance(exc, RayActorError):
        return RankLostError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return None


def newest_checkpoint_since(save_dir: Path, started: float) -> Path | None:
    """The newest complete, verified step_N under save_dir if it was completed after `started` (epoch seconds): one
    this job wrote, never a leftover of an earlier job with the same --save_path."""
    latest = latest_checkpoint(save_dir)
    if latest is not None and (latest / COMPLETE_MARKER).stat().st_mtime >= started:
        return latest
    return None


def run_with_restarts(attempt: Callable[[Path | None], int], *, resume_from: Path | None, save_dir: Path,
                      max_restarts: int, prog: str) -> int:
    """Run `attempt` until it returns an exit status; after a lost rank, run it again from the newest checkpoint,
    up to max_restarts times. Exhausted: one message naming the checkpoint to resume from, exit status 1."""
    started = time.time() - 1.0             # a file system's mtime may be coarser than time.time()
    restarts = 0
    while True:
        try:
            return attempt(resume_from)
        except RankLostError as exc:
            resume_from = newest_checkpoint_since(save_dir, started) or resume_from
            where = f"checkpoint {resume_from}" if resume_from else "the start (no checkpoint yet)"
            if restarts >= max_restarts:
                print(f"{prog}: {exc}; --max_restarts {max_restarts} restart(s) used up. Resume by hand from "
                      f"{where}" + (f" with --checkpoint_path {resume_from}" if resume_from else ""), file=sys.stderr)
                return 1
            restarts += 1
            print(f"[{prog.split()[-1]}] {exc}; restart {restarts}/{max_restarts} from {where}", flush=True)
