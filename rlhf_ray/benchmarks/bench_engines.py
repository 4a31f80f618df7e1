"""Training-engine throughput: every CPU backend on 2 Ray ranks against DDP measured in the same run.

    python -m rlhf_ray.benchmarks.bench_engines --quick     # 'small' tiny Llama (~3M params), 4 timed steps
    python -m rlhf_ray.benchmarks.bench_engines             # 'bench' tiny Llama (~13M params), 8 timed steps, + bf16

For each layout: a 2-rank WorkerGroup (gloo) builds the engine, runs warm-up steps, then times optimizer steps
(forward_backward × accumulation + optimizer_step) on a fixed global batch split over the data-parallel ranks.
Also timed once per layout: gathering the full weights (iter_weights, the weight-sync source) and a resumable
checkpoint save. Reported: tokens/s of the whole group, step time, and each number as a ratio to DDP's.
A single-process run (1 rank, no process group) is measured too, for the cost of going distributed at all.
Writes <--out>/bench_engines.json. Absolute numbers on a shared 2-core CPU are noisy; ratios less so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, results_dir, write_report
from rlhf_ray.workers.base import RankedWorker


class EngineBenchWorker(RankedWorker):
    """One rank: build an engine, time its steps, its weight gather and a checkpoint save."""

    def run(self, model_dir: str, plugin: str, tp: int, precision: str, steps: int, warmup: int,
            global_batch: int, seq_len: int, accumulation: int, workdir: str) -> dict:
        import torch

        from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
        from rlhf_ray.engines.registry import build_engine
        from rlhf_ray.models.loading import load_causal_lm

        torch.set_num_threads(1)
        model_cfg = ModelSection(pretrain=model_dir)
        train = TrainSection(lr=1e-4, accumulation_steps=accumulation, mixed_precision=precision)
        engine = build_engine(ParallelSection(plugin=plugin, num_workers=self.world_size, tp=tp), train,
                              lambda: load_causal_lm(model_cfg), steps + warmup, model_cfg=model_cfg)
        dp = self.world_size // tp
        data = torch.randint(3, 500, (accumulation, global_batch, seq_len), generator=torch.Generator().manual_seed(0))

        def loss_fn(model, batch):
            return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss, {}

        def one_step():
            for micro in range(accumulation):
                engine.forward_backward({"input_ids": data[micro].chunk(dp)[self.rank // tp]}, loss_fn)
            engine.optimizer_step()

        for _ in range(warmup):
            one_step()
        engine.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        engine.barrier()
        step_s = (time.perf_counter() - start) / steps
        start = time.perf_counter()
        gathered = sum(t.numel() for _, t in engine.iter_weights())
        gather_s = time.perf_counter() - start
        start = time.perf_counter()
        engine.save_checkpoint(Path(workdir) / f"{plugin}-tp{tp}-{precision}", {"step": steps})
        save_s = time.perf_counter() - start
        return {"step_s": step_s, "gather_s": gather_s, "save_s": save_s, "parameters": gathered}


def single_process(model_dir, precision, steps, warmup, global_batch, seq_len, accumulation, workdir) -> dict:
    """The same loop in a fresh 1-rank group (no process group)."""
    from rlhf_ray.placement.groups import GroupSpec
    from rlhf_ray.workers.group import WorkerGroup

    group = WorkerGroup(EngineBenchWorker, GroupSpec(num_workers=1, cpus_per_worker=1), name="bench-1")
    try:
        return group.call_rank(0, "run", model_dir, "ddp", 1, precision, steps, warmup, global_batch, seq_len,
                               accumulation, workdir)
    finally:
        group.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, fewer steps, fp32 only")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--global_batch", type=int, default=8)
    add_out_flag(parser)
    args = parser.parse_args(argv)
    results = results_dir(args.out)

    import ray

    from rlhf_ray.fixtures.tiny import build_tiny_model
    from rlhf_ray.placement.groups import GroupSpec
    from rlhf_ray.workers.group import WorkerGroup

    flavour, steps, warmup = ("small", 4, 1) if args.quick else ("bench", 8, 2)
    precisions = ["fp32"] if args.quick else ["fp32", "bf16"]
    layouts = [("ddp", 1), ("fsdp", 1), ("fsdp_cpu", 1), ("tp", 2), ("fsdp", 2)]
    accumulation = 2
    model_dir = str(build_tiny_model(results / "models" / f"tiny-{flavour}", flavour=flavour))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    tokens_per_step = args.global_batch * args.seq_len * accumulation
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        group = WorkerGroup(EngineBenchWorker, GroupSpec(num_workers=2, cpus_per_worker=1), name="bench-engines")
        try:
            for precision in precisions:
                baseline = None
                single = single_process(model_dir, precision, steps, warmup, args.global_batch, args.seq_len,
                                        accumulation, workdir)
                measured = [("single process", 1, single)]
                for plugin, tp in layouts:
                    result = group.call_all("run", model_dir, plugin, tp, precision, steps, warmup,
                                            args.global_batch, args.seq_len, accumulation, workdir)[0]
                    measured.append((plugin, tp, result))
                baseline = next(r for name, tp, r in measured if name == "ddp" and tp == 1)
                print(f"\n{precision}: {flavour} tiny Llama ({single['parameters'] / 1e6:.1f}M params), "
                      f"{tokens_per_step} tokens/step, 2 ranks unless noted")
                print(f"{'layout':<18}{'tokens/s':>10}{'vs ddp':>8}{'step s':>9}{'gather s':>10}{'vs ddp':>8}"
                      f"{'save s':>8}{'vs ddp':>8}")
                for name, tp, r in measured:
                    label = name if tp == 1 else f"{name} --tp {tp}"
                    row = {"layout": label, "precision": precision, "tokens_per_s": tokens_per_step / r["step_s"],
                           "speed_vs_ddp": baseline["step_s"] / r["step_s"], **r,
                           "gather_vs_ddp": r["gather_s"] / baseline["gather_s"],
                           "save_vs_ddp": r["save_s"] / baseline["save_s"]}
                    rows.append(row)
                    print(f"{label:<18}{row['tokens_per_s']:>10.0f}{row['speed_vs_ddp']:>8.2f}{r['step_s']:>9.3f}"
                          f"{r['gather_s']:>10.3f}{row['gather_vs_ddp']:>8.2f}{r['save_s']:>8.3f}"
                          f"{row['save_vs_ddp']:>8.2f}")
        finally:
            group.shutdown()
            ray.shutdown()
    write_report(results, "bench_engines.json", {"benchmark": "engines", "quick": args.quick, "flavour": flavour,
                                                  "steps": steps, "tokens_per_step": tokens_per_step, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
