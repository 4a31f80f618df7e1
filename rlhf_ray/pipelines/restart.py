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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

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


@contextmanager
def lost_ranks_raised(groups: Callable[[], Iterable]) -> Iterator[None]:
    """Around one attempt: an error that came from a dead rank of `groups()` (read when it happens, since the
    attempt creates them) leaves as RankLostError for the restart loop; any other error as it is."""
    try:
        yield
    except Exception as exc:
        lost = rank_lost(exc, groups())
        if lost is None:
            raise
        raise lost from exc


def train_then_export(train: Callable[[], Any], export: Callable[[Any], Any], prog: str) -> int:
    """`export(train())`, exit status 0. The two failures that end a job cleanly give one message and status 1:
    too many non-finite steps (the checkpoints written so far stay), and a failed checkpoint write (the model is
    still on the ranks, so `export(the failed step)` still writes the HF model first). `export` returns where it
    wrote."""
    from rlhf_ray.checkpoint.hf_export import CheckpointWriteError, export_despite
    from rlhf_ray.workers.trainer import NonFiniteStepsError

    try:
        result = train()
    except NonFiniteStepsError as exc:
        print(f"{prog}: {NonFiniteStepsError.message(exc)}", file=sys.stderr)
        return 1
    except CheckpointWriteError as failure:
        failed_step = failure.step
        print(f"{prog}: {export_despite(failure, lambda: export(failed_step))}", file=sys.stderr)
        return 1
    export(result)
    return 0


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
