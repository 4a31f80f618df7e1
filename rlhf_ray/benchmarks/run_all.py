"""Run every benchmark in turn (`rlhf-ray bench [--quick] [--only NAME ...] [--out DIR]`); each prints its own
ratios. `rlhf-ray bench rollout|sync|rl_loop [flags]` runs one benchmark on your model with its own flags
(`rlhf-ray bench rollout --help`).

Each benchmark is its own module with `main(argv)`, measures its baseline in the same run, and writes JSON (and
plots where it makes them) under --out (default: runs/bench under the current directory; the committed
reference results live in benchmarks/results/).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from rlhf_ray.benchmarks import add_out_flag

BENCHMARKS = {
    "prepare": "rlhf_ray.benchmarks.bench_prepare",
    "logprobs": "rlhf_ray.benchmarks.bench_logprobs",
    "engines": "rlhf_ray.benchmarks.bench_engines",
    "trainer": "rlhf_ray.benchmarks.bench_trainer",
    "rollout": "rlhf_ray.benchmarks.bench_rollout",
    "weight_sync": "rlhf_ray.benchmarks.bench_weight_sync",
    "rl_step": "rlhf_ray.benchmarks.bench_rl_step",
    "partial_rollout": "rlhf_ray.benchmarks.bench_partial_rollout",
    "async_parity": "rlhf_ray.benchmarks.bench_async_parity",
    "rl_loop": "rlhf_ray.benchmarks.bench_rl_loop",
    "quantize": "rlhf_ray.benchmarks.bench_quantize",
    "startup": "rlhf_ray.benchmarks.bench_startup",
}


# `rlhf-ray bench <name> ...`: benchmarks that take a user's model and flags of their own.
SUBCOMMANDS = {"rollout": "rlhf_ray.benchmarks.bench_rollout", "sync": "rlhf_ray.benchmarks.bench_weight_sync",
               "rl_loop": "rlhf_ray.benchmarks.bench_rl_loop"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return int(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="rlhf-ray bench [rollout|sync|rl_loop]", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small configuration of each benchmark")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    add_out_flag(parser)
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
        status = module.main(["--out", args.out] + (["--quick"] if args.quick else []))
        print(f"== {name}: exit {status or 0} in {time.perf_counter() - start:.0f}s", flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"failed or missing: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
