"""Weight-sync bandwidth: trainer -> vLLM generator engines, against the raw channel measured in the same run.

    python -m rlhf_ray.benchmarks.bench_weight_sync --quick    # 'bench' tiny Llama (~13M params, 52 MB fp32), 1 engine
    python -m rlhf_ray.benchmarks.bench_weight_sync            # + a ~110M-param Llama (440 MB), 1 and 2 engines
    rlhf-ray bench sync --model DIR [--engines 2] [--channels gloo]   # your model (its config, fresh weights)
    rlhf-ray bench sync --model ~/.cache/rlhf-ray/smollm2-135m-instruct --name sync_smollm2
                                    # SmolLM2-135M (made by rlhf_ray.fixtures.smollm2.convert_smollm2())

For each channel (object_store, gloo) and engine count:
  sync   GeneratorGroup.sync_weights_from(trainer): a StandInTrainerWorker streams its state dict in buckets, the
         engines load them through vLLM's layerwise reload (the whole path a PPO step pays);
  raw    the same number of bytes in the same bucket sizes between two plain actors over the same channel, with
         the receiver copying each bucket into a preallocated buffer (the least a receiver can do), no packing
         and no model loading.
Reported: bytes/s of each (best of --repeats) and sync/raw. Writes <--out>/bench_weight_sync.json
(--quick: bench_weight_sync_quick.json; --name STEM: STEM.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, results_dir, write_report


class RawReceiver:
    """A receiver that only copies what arrives into its own buffer (the raw channel's consumer)."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)
        self.buffer = None
        self.group = None

    def take(self, array) -> int:
        import torch

        from rlhf_ray.rollout.weight_buckets import as_uint8_tensor

        flat = as_uint8_tensor(array)
        if self.buffer is None or self.buffer.numel() < flat.numel():
            self.buffer = torch.empty(flat.numel(), dtype=torch.uint8)
        self.buffer[:flat.numel()].copy_(flat)
        return flat.numel()

    def join(self, host: str, port: int, rank: int, world: int, group_id: str) -> int:
        from rlhf_ray.rollout.collective import join_broadcast_group

        self.group = join_broadcast_group("gloo", host, port, rank, world, group_id, 120)
        return rank

    def receive(self, nbytes: int) -> int:
        import torch

        flat = torch.empty(nbytes, dtype=torch.uint8)
        self.group.broadcast(flat)
        return self.take(flat)


class RawSender:
    """Sends `total` bytes in buckets over one channel to RawReceivers; returns seconds."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)

    def object_store(self, receivers, total: int, bucket: int) -> float:
        import numpy as np
        import ray

        start = time.perf_counter()
        window = []
        for offset in range(0, total, bucket):
            array = np.full(min(bucket, total - offset), 1, dtype=np.uint8)     # a packed bucket stand-in
            ref = ray.put(array)
            window.append([r.take.remote(ref) for r in receivers])
            if len(window) >= 2:
                ray.get(window.pop(0))
        for acks in window:
            ray.get(acks)
        return time.perf_counter() - start

    def gloo(self, receivers, total: int, bucket: int) -> float:
        import ray
        import torch

        from rlhf_ray.rollout.collective import join_broadcast_group
        from rlhf_ray.utils import free_port

        host, port = ray.util.get_node_ip_address(), free_port()
        world = 1 + len(receivers)
        joins = [r.join.remote(host, port, i + 1, world, "raw") for i, r in enumerate(receivers)]
        group = join_broadcast_group("gloo", host, port, 0, world, "raw", 120)
        ray.get(joins)
        start = time.perf_counter()
        window = []
        for offset in range(0, total, bucket):
            size = min(bucket, total - offset)
            flat = torch.ones(size, dtype=torch.uint8)
            acks = [r.receive.remote(size) for r in receivers]
            group.broadcast(flat)
            window.append(acks)
            if len(window) >= 2:
                ray.get(window.pop(0))
        for acks in window:
            ray.get(acks)
        seconds = time.perf_counter() - start
        group.close()
        return seconds


def write_model(out: Path, size: str) -> Path:
    """'bench' tiny flavour, or 'large': a ~110M-param Llama (hidden 1024, 8 layers) with the tiny tokenizer."""
    from rlhf_ray.fixtures.tiny import build_tiny_model, load_tiny_tokenizer

    if size != "large":
        return build_tiny_model(out, flavour=size, seed=0)
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaForCausalLM

    from rlhf_ray.fixtures.tiny import build_tiny_config

    config = build_tiny_config("bench")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 1024, 2816, 8
    config.num_attention_heads = config.num_key_value_heads = 16
    config.head_dim = 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    load_tiny_tokenizer().save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-ray bench sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bench model, one engine")
    parser.add_argument("--model", default=None, help="HF model directory to sync (default: the built-in sizes)")
    parser.add_argument("--engines", type=int, nargs="+", default=None, help="engine counts (default 1 2; "
                                                                             "quick 1)")
    parser.add_argument("--channels", nargs="+", default=["object_store", "gloo"],
                        choices=["object_store", "gloo"], help="weight-sync channels to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket_mb", type=float, default=64.0)
    parser.add_argument("--name", default=None, help="file name stem of the report (default bench_weight_sync; "
                                                     "bench_weight_sync_quick with --quick), e.g. sync_smollm2")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    results = results_dir(args.out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from rlhf_ray.rollout.config import GeneratorSection
    from rlhf_ray.workers.generator_group import GeneratorGroup
    from rlhf_ray.fixtures.standin_trainer import StandInTrainerWorker
    from rlhf_ray.placement.groups import GroupSpec
    from rlhf_ray.workers.group import WorkerGroup

    sizes, engine_counts = (["bench"], [1]) if args.quick else (["bench", "large"], [1, 2])
    sizes = [args.model] if args.model else sizes
    engine_counts = args.engines or engine_counts
    channels = args.channels
    bucket = int(args.bucket_mb * (1 << 20))
    from rlhf_ray.placement.cluster import connect_ray, disconnect_ray

    started = connect_ray(num_cpus=4)
    rows = []
    print(f"bucket {args.bucket_mb:g} MiB, best of {args.repeats}", flush=True)
    try:
        for size in sizes:
            label = Path(size).name
            model_dir = args.model or str(write_model(results / "models" / f"sync-{size}", size))
            trainer = WorkerGroup(StandInTrainerWorker, GroupSpec(num_workers=1, cpus_per_worker=0.5),
                                  name=f"sync-trainer-{label}", worker_kwargs={"model_path": model_dir,
                                                                              "reinit_seed": 1})
            nbytes = trainer.call_rank(0, "weight_bytes")
            for engines in engine_counts:
                section = GeneratorSection(num_engines=engines, cpus_per_engine=0.5, max_prompt_len=32,
                                           max_new_tokens=8, kv_cache_gib=1, weight_sync_bucket_mb=args.bucket_mb,
                                           max_restarts=0)
                group = GeneratorGroup(section, model_dir, name=f"sync-gen-{label}-{engines}")
                sender = ray.remote(RawSender).options(num_cpus=0.25).remote()
                receivers = [ray.remote(RawReceiver).options(num_cpus=0.25).remote() for _ in range(engines)]
                version = 0
                for channel in channels:
                    best_sync = best_raw = float("inf")
                    for _ in range(args.repeats):
                        version += 1
                        stats = group.sync_weights_from(trainer, version=version, channel=channel)
                        assert stats["weight_sync/bytes"] == nbytes
                        best_sync = min(best_sync, stats["weight_sync/seconds"])
                        best_raw = min(best_raw, ray.get(getattr(sender, channel).remote(receivers, nbytes, bucket)))
                    row = {"model": size, "bytes": nbytes, "engines": engines, "channel": channel,
                           "sync_seconds": best_sync, "raw_seconds": best_raw,
                           "sync_bytes_per_s": nbytes / best_sync, "raw_bytes_per_s": nbytes / best_raw,
                           "sync_gb_per_s": nbytes / best_sync / 1e9, "raw_gb_per_s": nbytes / best_raw / 1e9,
                           "sync_over_raw": best_raw / best_sync}
                    rows.append(row)
                    print(f"{label:5s} {nbytes / 2**20:6.0f} MiB engines {engines} {channel:12s} | sync "
                          f"{row['sync_bytes_per_s'] / 2**20:7.1f} MiB/s ({best_sync:.2f}s)  raw "
                          f"{row['raw_bytes_per_s'] / 2**20:7.1f} MiB/s ({best_raw:.2f}s) | sync/raw "
                          f"{row['sync_over_raw']:.2f}", flush=True)
                for actor in [sender, *receivers]:
                    ray.kill(actor)
                group.shutdown()
            trainer.shutdown()
    finally:
        disconnect_ray(started)
    stem = args.name or ("bench_weight_sync_quick" if args.quick else "bench_weight_sync")
    write_report(results, f"{stem}.json",
                 {"benchmark": "weight_sync", "quick": args.quick, "bucket_mb": args.bucket_mb,
                  "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
