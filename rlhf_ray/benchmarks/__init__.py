"""Benchmarks: `rlhf-ray bench [--quick] [--only NAME ...] [--out DIR]` runs them all (run_all.py); one alone is
`python -m rlhf_ray.benchmarks.bench_engines [--quick] [--out DIR]`. Each measures its baseline in the same run and
writes JSON (and a PNG where it plots) under --out: runs/bench under the current directory by default. The
reference results that README quotes are committed under benchmarks/results/; a new run never overwrites them
unless pointed there with --out."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

DEFAULT_OUT = "runs/bench"


def add_out_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for the results (created if missing; default "
                                                           f"{DEFAULT_OUT} under the current directory)")


def results_dir(out: str | Path) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_quiet_env() -> None:
    """One BLAS thread per process, no hub, no usage stats, no progress bars: the settings every RL benchmark runs
    under (the caller's own values win)."""
    for key, value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "RLHF_RAY_NO_PROGRESS": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)


def machine() -> str:
    """One line naming the machine a figure was measured on: OS, CPUs, memory, GPUs."""
    import torch

    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = (f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
            else "no GPU")
    return f"{platform.platform()}, {os.cpu_count()} CPUs, {memory_gib:.0f} GiB, {gpus}"


def write_report(out: str | Path, filename: str, report: dict) -> Path:
    """report + the machine line as JSON at out/filename; prints its absolute path (and, in a Ray job, the host)."""
    path = (results_dir(out) / filename).resolve()
    path.write_text(json.dumps({**report, "machine": machine()}, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:      # set by Ray in a submitted job's driver process
        print(f"(this ran as a Ray job on {platform.node()}: the files are on that node"
              + ("" if Path(out).is_absolute() else ", inside the job's copy of --working_dir, which Ray may delete "
                 "after the job; pass an absolute --out on that node or on storage you can read")
              + ")", flush=True)
    return path
