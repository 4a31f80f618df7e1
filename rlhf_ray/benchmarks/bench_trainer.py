"""Trainer-actor throughput: `rlhf-ray sft`'s TrainerWorker against a bare single-process torch loop, same run.

    python -m rlhf_ray.benchmarks.bench_trainer --quick     # 'small' tiny Llama (~3M params), 3 rounds × 3 steps
    python -m rlhf_ray.benchmarks.bench_trainer             # 'bench' tiny Llama (~13M params), 4 rounds × 5 steps

Both sides train the same model on the same SFT batch (batch × seq tokens, every token a label) with AdamW, grad
clipping and the warmup-cosine schedule, on the same number of threads:

    bare     a plain loop in this process: HF forward with labels -> loss.backward() -> clip -> AdamW -> scheduler
    actor    one TrainerWorker (Ray actor, ddp engine, 1 rank): the driver puts the rows into the object store and
             calls train_step(rows); timed from the driver, so collate, dispatch and result transfer count

Measured in alternating rounds (bare, actor, bare, actor, ...) so that load from other processes on a shared
machine hits both; the ratio uses the median step time of each. Goal: actor / bare tokens/s >= 0.95.
Writes <--out>/bench_trainer.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, write_report


def make_rows(batch: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    import torch

    ids = torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{"input_ids": row, "attention_mask": [1] * seq_len, "labels": row} for row in ids]


class BareLoop:
    """The baseline: what a hand-written single-process training step costs."""

    def __init__(self, model_dir: str, rows: list[dict], lr: float, total_steps: int):
        import torch
        from transformers import AutoModelForCausalLM

        from rlhf_ray.engines.optim import WarmupCosineSchedule, build_optimizer

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.train()
        self.optimizer = build_optimizer(self.model, lr, 0.0)
        self.scheduler = WarmupCosineSchedule(self.optimizer, total_steps, None)
        self.input_ids = torch.tensor([r["input_ids"] for r in rows])
        self.attention_mask = torch.ones_like(self.input_ids)

    def step(self) -> None:
        import torch

        loss = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def start_actor(model_dir: str, threads: int, batch: int, lr: float, total_steps: int):
    from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
    from rlhf_ray.placement.groups import GroupSpec
    from rlhf_ray.workers.group import WorkerGroup
    from rlhf_ray.workers.trainer import TrainerWorker

    kwargs = {"model": ModelSection(pretrain=model_dir).model_dump(),
              "train": TrainSection(batch_size=batch, lr=lr, seed=0).model_dump(),
              "parallel": ParallelSection(num_workers=1, cpus_per_worker=threads).model_dump(),
              "objective": {"kind": "sft", "max_len": None}}
    group = WorkerGroup(TrainerWorker, GroupSpec(num_workers=1, cpus_per_worker=threads), name="bench-trainer",
                        worker_kwargs=kwargs)
    group.call_all("build", total_steps)
    return group


def timed(fn, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, fewer steps")
    parser.add_argument("--flavour", default=None, help="tiny model flavour (default: bench; small with --quick)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per row (default 256; 128 with --quick)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round and side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (= actor CPUs)")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    flavour = args.flavour or ("small" if args.quick else "bench")
    seq_len = args.seq_len or (128 if args.quick else 256)
    rounds = args.rounds or (3 if args.quick else 4)
    steps = args.steps or (3 if args.quick else 5)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("RLHF_RAY_NO_PROGRESS", "1")
    import ray
    import torch

    from rlhf_ray.fixtures.tiny import build_tiny_model
    from rlhf_ray.placement import connect_ray, disconnect_ray

    torch.set_num_threads(args.threads)
    model_dir = str(build_tiny_model(Path(tempfile.gettempdir()) / f"rlhf-ray-bench-{flavour}", flavour=flavour))
    rows = make_rows(args.batch, seq_len, vocab=500)
    tokens = args.batch * seq_len
    total_steps = rounds * steps + 2
    print(f"bench_trainer: {flavour} model, batch {args.batch} × {seq_len} tokens = {tokens} tokens/step, "
          f"{rounds} rounds × {steps} steps per side, {args.threads} thread(s)", flush=True)

    started = connect_ray()
    group = None
    try:
        bare = BareLoop(model_dir, rows, 1e-4, total_steps)
        group = start_actor(model_dir, args.threads, args.batch, 1e-4, total_steps)

        def actor_step():
            ray.get(group.call_split_async("train_step", [rows]))   # rows are put into the object store per call

        bare.step()                                                 # warm-up: allocator, autograd graph caches
        actor_step()
        bare_times, actor_times = [], []
        for round_index in range(rounds):
            bare_times += timed(bare.step, steps)
            actor_times += timed(actor_step, steps)
            print(f"  round {round_index + 1}: bare {statistics.median(bare_times[-steps:]) * 1e3:.0f} ms/step, "
                  f"actor {statistics.median(actor_times[-steps:]) * 1e3:.0f} ms/step", flush=True)
    finally:
        if group is not None:
            group.shutdown()
        disconnect_ray(started)

    bare_s, actor_s = statistics.median(bare_times), statistics.median(actor_times)
    result = {
        "benchmark": "trainer", "flavour": flavour, "batch": args.batch, "seq_len": seq_len, "threads": args.threads,
        "tokens_per_step": tokens, "rounds": rounds, "steps_per_round": steps,
        "bare_step_s_median": bare_s, "actor_step_s_median": actor_s,
        "bare_tokens_per_s": tokens / bare_s, "actor_tokens_per_s": tokens / actor_s,
        "ratio_actor_over_bare": bare_s / actor_s, "goal": 0.95,
        "bare_step_s": bare_times, "actor_step_s": actor_times,
        "torch": torch.__version__,
    }
    print(f"bare loop   {result['bare_tokens_per_s']:,.0f} tokens/s  ({bare_s * 1e3:.0f} ms/step)")
    print(f"actor       {result['actor_tokens_per_s']:,.0f} tokens/s  ({actor_s * 1e3:.0f} ms/step)")
    print(f"ratio actor / bare = {result['ratio_actor_over_bare']:.3f} (goal >= 0.95)")
    write_report(args.out, "bench_trainer.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
