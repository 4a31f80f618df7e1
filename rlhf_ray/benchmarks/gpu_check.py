"""The GPU check: what the CPU suite cannot run, on a machine with one or more GPUs and torch + transformers only.

    bash launch/gpu_check.sh                 # = python -m rlhf_ray.benchmarks.gpu_check [--timeout_s 300]

No Ray and no vLLM: each row starts its ranks with torch.multiprocessing, one GPU per rank, on the default process
group that a WorkerGroup rank would build (engines/collectives.py: "cpu:gloo,cuda:nccl"). Rows:

    collectives           world 1 and 2: all_reduce_sums on the rank's GPU (NCCL), a CPU tensor over gloo in the
                          same group, a barrier
    ddp, fsdp, fsdp_cpu, tp   a tiny Llama, 3 steps of one global batch: ddp world 1 is the reference (losses fall);
                          each world-2 layout matches it (rtol 1e-3); fsdp_cpu reduces CPU-offloaded gradients
    bf16 vs fp32          the ddp engine's bf16 losses within 5e-2 of its fp32 losses (one rank)
    zero2, zero2_cpu, gemini  ColossalAI plugins (when colossalai imports), world 1 and 2: finite, falling losses
    frozen models         in this process, last: a frozen rank's model is on the GPU, takes CPU batches and scores
                          as the untrained policy does (within 1e-4)

It prints one table (row, result) and exits 1 when any row failed. On a machine without CUDA every row reads
"skipped: no CUDA" and it exits 0 (tests/test_gpu_correctness.py checks that).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

STEPS = 3
GLOBAL_BATCH = 4
SEQ_LEN = 32
PROCESS_GROUP_TIMEOUT_S = 120


# ---------------------------------------------------------------- what runs on each rank

def _rank_device(rank: int) -> torch.device:
    """cuda:<rank> on a GPU machine; cpu elsewhere (the suite runs the same ranks on gloo)."""
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def _join(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from rlhf_ray.engines.collectives import process_group_backend

    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    dist.init_process_group(process_group_backend(torch.cuda.is_available()), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))


def _check_collectives(rank: int, world: int, _: str) -> dict:
    import torch.distributed as dist

    from rlhf_ray.engines.collectives import all_reduce_sums

    sums = all_reduce_sums([rank + 1.0, 1.0], _rank_device(rank))
    expected = [world * (world + 1) / 2, float(world)]
    assert sums == expected, f"all_reduce_sums on cuda gave {sums}, expected {expected}"
    on_cpu = torch.ones(3)                                   # the device map sends CPU tensors over gloo
    dist.all_reduce(on_cpu)
    assert on_cpu.tolist() == [float(world)] * 3, f"CPU all-reduce gave {on_cpu.tolist()}"
    dist.barrier()
    return {"detail": f"sums {sums}", "backend": str(dist.get_backend())}


def _engine_losses(model_dir: str, plugin: str, world: int, tp: int, precision: str, rank: int) -> list[float]:
    """STEPS optimizer steps on one fixed global batch (this rank's dp chunk); losses averaged over ranks."""
    from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
    from rlhf_ray.engines.registry import build_engine
    from rlhf_ray.models.loading import load_causal_lm

    model_cfg = ModelSection(pretrain=model_dir)
    train = TrainSection(lr=2e-3, accumulation_steps=1, warmup_steps=0, mixed_precision=precision, grad_clip=1.0,
                         seed=7)
    parallel = ParallelSection(plugin=plugin, num_workers=world, tp=tp, gpus_per_worker=1)
    engine = build_engine(parallel, train, lambda: load_causal_lm(model_cfg), STEPS, model_cfg=model_cfg)
    rows = torch.randint(3, 500, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    dp = world // tp
    batch = {"input_ids": rows.chunk(dp)[rank // tp]}
    losses = []
    engine.train()
    for _ in range(STEPS):
        loss = engine.forward_backward(batch, lambda model, b: (model(input_ids=b["input_ids"],
                                                                      labels=b["input_ids"]).loss, {}))["loss"]
        engine.optimizer_step()
        losses.append(engine.reduce_metrics({"loss": loss})["loss"])
    return losses


def _check_engine(rank: int, world: int, spec: str) -> dict:
    args = json.loads(spec)
    return {"losses": _engine_losses(args["model_dir"], args["plugin"], world, args.get("tp", 1),
                                     args.get("precision", "fp32"), rank)}


CHECKS: dict[str, Callable[[int, int, str], dict]] = {"collectives": _check_collectives, "engine": _check_engine}


def _rank_main(rank: int, world: int, port: int, check: str, spec: str, out_dir: str) -> None:
    _join(rank, world, port)
    try:
        result = CHECKS[check](rank, world, spec)
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(result))
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


# ---------------------------------------------------------------- the driver

def run_ranks(check: str, world: int, spec: str = "", timeout_s: float = 300.0) -> dict:
    """Start `world` processes (one GPU each, or CPU ranks on gloo without CUDA) running CHECKS[check]; rank 0's
    result dict. Raises on a rank's failure or after timeout_s (the ranks are then terminated)."""
    import torch.multiprocessing as mp

    from rlhf_ray.utils import free_port

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out_dir:
        context = mp.spawn(_rank_main, args=(world, free_port(), check, spec, out_dir), nprocs=world, join=False)
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.terminate()
                raise TimeoutError(f"{check} on {world} rank(s) did not finish in {timeout_s:.0f}s")
        return json.loads(Path(out_dir, "result.json").read_text())


def _close(a: list[float], b: list[float], rtol: float = 0.0, atol: float = 0.0) -> bool:
    return len(a) == len(b) and all(math.isfinite(x) and abs(x - y) <= atol + rtol * abs(y) for x, y in zip(a, b))


def _losses(values: list[float]) -> str:
    return " ".join(f"{v:.4f}" for v in values)


def build_rows(gpus: int, colossal: bool, model_dir: str, timeout_s: float) -> list[tuple[str, Callable[[], str]]]:
    """(row name, thunk) pairs; a thunk returns its detail line and raises on a failed check."""
    cache: dict[tuple, list[float]] = {}

    def losses(plugin: str, world: int, tp: int = 1, precision: str = "fp32") -> list[float]:
        key = (plugin, world, tp, precision)
        if key not in cache:
            spec = json.dumps({"model_dir": model_dir, "plugin": plugin, "tp": tp, "precision": precision})
            cache[key] = run_ranks("engine", world, spec, timeout_s)["losses"]
        return cache[key]

    def collectives(world: int) -> Callable[[], str]:
        return lambda: run_ranks("collectives", world, timeout_s=timeout_s)["detail"]

    def trains(plugin: str, world: int, precision: str = "fp32") -> Callable[[], str]:
        def check() -> str:
            got = losses(plugin, world, precision=precision)
            if not (all(math.isfinite(v) for v in got) and got[-1] < got[0]):
                raise AssertionError(f"losses {_losses(got)} are not finite and falling")
            return f"losses {_losses(got)}"
        return check

    def matches_world_1(plugin: str, world: int, tp: int = 1) -> Callable[[], str]:
        def check() -> str:
            got, want = losses(plugin, world, tp), losses("ddp", 1)
            if not _close(got, want, rtol=1e-3):
                raise AssertionError(f"losses {_losses(got)} differ from world 1 ddp {_losses(want)} (rtol 1e-3)")
            return f"losses {_losses(got)}"
        return check

    def bf16_near_fp32() -> str:
        got, want = losses("ddp", 1, precision="bf16"), losses("ddp", 1)
        if not _close(got, want, atol=5e-2):
            raise AssertionError(f"bf16 losses {_losses(got)} vs fp32 {_losses(want)} (atol 5e-2)")
        return f"bf16 {_losses(got)} / fp32 {_losses(want)}"

    def frozen_models_on_the_gpu() -> str:
        return check_frozen_models(model_dir)

    rows: list[tuple[str, Callable[[], str], int, bool]] = [
        ("collectives world 1", collectives(1), 1, False),
        ("collectives world 2", collectives(2), 2, False),
        ("ddp world 1 (reference)", trains("ddp", 1), 1, False),
        ("ddp world 2", matches_world_1("ddp", 2), 2, False),
        ("fsdp world 2", matches_world_1("fsdp", 2), 2, False),
        ("fsdp_cpu world 2", matches_world_1("fsdp_cpu", 2), 2, False),
        ("tp world 2", matches_world_1("tp", 2, tp=2), 2, False),
        ("bf16 vs fp32 (ddp world 1)", bf16_near_fp32, 1, False),
    ] + [(f"{plugin} world {world}", trains(plugin, world, precision="bf16"), world, True)
         for plugin in ("zero2", "zero2_cpu", "gemini") for world in (1, 2)]
    rows.append(("frozen models on the GPU", frozen_models_on_the_gpu, 1, False))   # last: CUDA in this process
    return [(name, _gate(thunk, needs, gpus, needs_colossal and not colossal)) for name, thunk, needs, needs_colossal
            in rows]


def check_frozen_models(model_dir: str) -> str:
    """In this process: a frozen rank's model (a reference or reward rank, and the reference a policy rank holds with
    --reference_in_policy, which loads the same way) sits on the rank's device, the GPU when one is visible (no
    engine places it), takes CPU batches, and scores as the untrained policy does. TrainerWorker, not RLWorker: the
    RL actor imports Ray, which a GPU check machine may not have."""
    from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
    from rlhf_ray.workers.rl_objectives import compute_response_logprobs
    from rlhf_ray.workers.trainer import TrainerWorker, frozen_forward

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"model": ModelSection(pretrain=model_dir).model_dump(), "train": TrainSection(batch_size=2).model_dump(),
              "parallel": ParallelSection(gpus_per_worker=1 if expected == "cuda" else 0).model_dump()}
    policy = TrainerWorker(0, 1, **kwargs)
    policy.build(1)
    frozen = TrainerWorker(0, 1, **kwargs, frozen=True)
    frozen.build(1)
    device = next(frozen.model.parameters()).device.type
    if device != expected:
        raise AssertionError(f"the frozen model is on {device}, expected {expected}")
    generator = torch.Generator().manual_seed(0)
    batch = {"sequences": torch.randint(3, 60, (4, 12), generator=generator),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)}            # on the CPU, as the driver sends it

    def score(model, chunk):
        return compute_response_logprobs(model, chunk["sequences"], chunk["attention_mask"], 5, 1.0).float().cpu()

    gap = (frozen_forward(frozen.model, batch, score) - policy._forward(batch, score).float().cpu()).abs().max().item()
    if not gap <= 1e-4:
        raise AssertionError(f"frozen log-probs differ from the untrained policy's by {gap:.2e} (> 1e-4)")
    dpo_gap = _check_colocated_dpo_reference(kwargs, expected, generator)
    return f"on {expected}; log-prob gap to the policy {gap:.1e}; DPO colocated reference gap {dpo_gap:.1e}"


def _check_colocated_dpo_reference(kwargs: dict, expected: str, generator: torch.Generator) -> float:
    """DPO's colocated reference (a frozen copy inside the trainer rank) sits on the rank's device, scores the
    collator's CPU batch, and gives the untrained policy's sequence log-probs; returns the largest gap."""
    from rlhf_ray.workers.trainer import TrainerWorker

    trainer = TrainerWorker(0, 1, **kwargs, objective={"kind": "dpo", "beta": 0.1}, colocated_reference=True)
    trainer.build(1)
    reference = trainer.objective.reference_model
    device = next(reference.parameters()).device.type
    if device != expected:
        raise AssertionError(f"DPO's colocated reference is on {device}, expected {expected}")

    def pair() -> dict:
        return {f"{side}_{key}": (torch.randint(3, 60, (10,), generator=generator).tolist() if key == "input_ids"
                                  else [0] * 5 + [1] * 5)
                for side in ("chosen", "rejected") for key in ("input_ids", "loss_mask")}

    rows = [pair(), pair()]
    batch = trainer.objective.attach_reference(trainer.objective.collate(rows))     # on the CPU, as collated
    policy = trainer._forward(batch, lambda model, b: torch.stack(trainer.objective.sequence_logps(model, b)))
    reference_logps = torch.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    gap = (reference_logps - policy.float().cpu()).abs().max().item()
    if not gap <= 1e-4:
        raise AssertionError(f"DPO's colocated reference log-probs differ from the untrained policy's by {gap:.2e}")
    return gap


def _gate(thunk: Callable[[], str], needs: int, gpus: int, no_colossal: bool) -> Callable[[], str]:
    """The thunk, or one that reports why the row cannot run here."""
    if gpus == 0:
        return lambda: "skipped: no CUDA"
    if gpus < needs:
        return lambda: f"skipped: needs {needs} GPUs ({gpus} visible)"
    if no_colossal:
        return lambda: "skipped: colossalai not importable"
    return thunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout_s", type=float, default=300.0, help="seconds per row before its ranks are killed")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    colossal = importlib.util.find_spec("colossalai") is not None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"gpu check: torch {torch.__version__}, {gpus} GPU(s)"
          f"{', ' + torch.cuda.get_device_name(0) if gpus else ''}, colossalai {'yes' if colossal else 'no'}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-model-") as tmp:
        model_dir = str(Path(tmp, "tiny"))
        if gpus:
            from rlhf_ray.fixtures.tiny import build_tiny_model

            build_tiny_model(model_dir)
        failed = 0
        width = 30
        print(f"{'row':<{width}} result")
        for name, thunk in build_rows(gpus, colossal, model_dir, args.timeout_s):
            try:
                result = thunk()
                result = result if result.startswith("skipped") else f"ok: {result}"
            except Exception as exc:  # noqa: BLE001 - one row's failure is reported, the others still run
                failed += 1
                lines = [line for line in str(exc).splitlines() if line.strip()]   # a rank's error ends its traceback
                result = f"FAIL: {type(exc).__name__}: {lines[-1] if lines else ''}"
                traceback.print_exc(file=sys.stderr)
            print(f"{name:<{width}} {result}", flush=True)
    print(f"gpu check: {failed} row(s) failed" if failed else "gpu check: no failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
