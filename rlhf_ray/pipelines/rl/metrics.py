"""Merging the trainer ranks' update results into the logged metrics.

Per update step, the ranks' metric sums and unit counts (tokens or sequences) are merged by merge_step_results (the
supervised jobs' merge): sums over the data-parallel ranks divided by their total units, counting only the first
rank of each tensor-parallel group. That makes every `loss/...` and `policy/...` value the unit-weighted mean over
the whole global batch. Values are then averaged over the episode's update steps.
"""

from __future__ import annotations

from typing import Sequence

from rlhf_ray.workers.trainer import merge_step_results


def merge_update_results(per_rank: Sequence[Sequence[dict]], tp: int, prefix: str) -> dict[str, float]:
    """per_rank[r][s]: rank r's result for update step s. Returns the metrics averaged over steps, plus
    `<prefix>/grad_norm`, `<prefix>/lr` (rank 0, last step), `<prefix>/grad_norm_mean`, `perf/<prefix>_tokens_per_s`
    (tokens of every step over the slowest rank's total time) and `<prefix>/skipped_steps` (the run's count of
    optimizer steps skipped for a non-finite loss or gradient, when the ranks report it)."""
    per_rank = list(per_rank)
    steps = [merge_step_results([rank[step] for rank in per_rank], tp) for step in range(len(per_rank[0]))]
    keys = {key for rank in per_rank for result in rank for key in result["sums"]}
    averaged = {key: sum(step.get(key, 0.0) for step in steps) / len(steps) for key in keys}
    seconds = max(sum(result["time_s"] for result in rank) for rank in per_rank)
    skipped = {f"{prefix}/skipped_steps": float(steps[-1]["skipped_steps"])} if "skipped_steps" in steps[-1] else {}
    return {**averaged, f"{prefix}/grad_norm": steps[-1]["grad_norm"], f"{prefix}/lr": steps[-1]["lr"],
            f"{prefix}/grad_norm_mean": sum(step["grad_norm"] for step in steps) / len(steps),
            f"perf/{prefix}_tokens_per_s": sum(step["tokens"] for step in steps) / max(seconds, 1e-9), **skipped}
