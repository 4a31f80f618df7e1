"""Run every benchmark in turn (`rlhf-ray bench [--quick] [--only NAME ...]`); each prints its own ratios.

Each benchmark is its own module with `main(argv)`, measures its baseline in the same run, and writes JSON (and
plots where it makes them) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = {
    "prepare": "benchmarks.bench_prepare",
    "logprobs": "benchmarks.bench_logprobs",
    "engines": "benchmarks.bench_engines",
    "trainer": "benchmarks.bench_trainer",
    "rollout": "benchmarks.bench_rollout",
    "weight_sync": "benchmarks.bench_weight_sync",
    "rl_step": "benchmarks.bench_rl_step",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-ray bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small configuration of each benchmark")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only or BENCHMARKS:
        module_name = BENCHMARKS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            print(f"== {name}: not available ({exc})", flush=True)
            failed.append(name)
            continue
        print(f"== {name} ({module_name})", flush=True)
        start = time.perf_counter()
        status = module.main(["--quick"] if args.quick else [])
        print(f"== {name}: exit {status or 0} in {time.perf_counter() - start:.0f}s", flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"failed or missing: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
