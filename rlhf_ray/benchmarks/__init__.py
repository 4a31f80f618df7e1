"""Benchmarks: `rlhf-ray bench [--quick] [--only NAME ...] [--out DIR]` runs them all (run_all.py); one alone is
`python -m rlhf_ray.benchmarks.bench_engines [--quick] [--out DIR]`. Each measures its baseline in the same run and
writes JSON (and a PNG where it plots) under --out: benchmarks/results under the current directory by default."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = "benchmarks/results"


def add_out_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for the results (created if missing; default "
                                                           f"{DEFAULT_OUT} under the current directory)")


def results_dir(out: str | Path) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path
