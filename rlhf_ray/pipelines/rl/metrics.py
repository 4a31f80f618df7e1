"""Merging per-rank results into the logged metrics.

Trainer ranks return, per update step, metric sums weighted by their loss units (tokens or sequences) and the unit
count; merging divides the sums over all data-parallel ranks by the total units (tensor-parallel ranks of one group
saw the same rows, so only the first of each group counts). That makes every `loss/...` and `policy/...` value the
unit-weighted mean over the whole global batch. Values are then averaged over the episode's update steps.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence


def merge_update_results(per_rank: Sequence[Sequence[dict]], tp: int, prefix: str) -> dict[str, float]:
    """per_rank[r][s]: rank r's result for update step s. Returns the metrics averaged over steps, plus
    `<prefix>/grad_norm`, `<prefix>/lr` (rank 0, last step), `<prefix>/grad_norm_mean`, `perf/<prefix>_tokens_per_s`."""
    counted = list(per_rank)[::tp]
    steps = len(counted[0])
    averaged: dict[str, float] = defaultdict(float)
    grad_norms = []
    for step in range(steps):
        units = sum(rank[step]["units"] for rank in counted)
        sums: dict[str, float] = defaultdict(float)
        for rank in counted:
            for key, value in rank[step]["sums"].items():
                sums[key] += value
        for key, value in sums.items():
            averaged[key] += value / max(units, 1e-12) / steps
        grad_norms.append(counted[0][step]["grad_norm"])
    last = counted[0][-1]
    tokens = sum(rank[step]["tokens"] for rank in counted for step in range(steps))
    seconds = max(sum(rank[step]["time_s"] for step in range(steps)) for rank in per_rank)
    return {**averaged, f"{prefix}/grad_norm": last["grad_norm"], f"{prefix}/lr": last["lr"],
            f"{prefix}/grad_norm_mean": sum(grad_norms) / len(grad_norms),
            f"perf/{prefix}_tokens_per_s": tokens / max(seconds, 1e-9)}


def staleness_metrics(chunk_versions: Sequence[int], chunk_sizes: Sequence[int], trained_version: int) -> dict:
    """How many policy versions behind the trained policy the experience was generated (sample-weighted)."""
    held = sum(chunk_sizes)
    ages = [trained_version - version for version in chunk_versions]
    return {"rollout/staleness_mean": sum(a * n for a, n in zip(ages, chunk_sizes)) / max(held, 1),
            "rollout/staleness_max": float(max(ages, default=0))}
