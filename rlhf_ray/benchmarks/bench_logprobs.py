"""Token log-probs: blockwise `compute_token_logprobs` against `log_softmax(logits.float()).gather(...)`.

    python -m rlhf_ray.benchmarks.bench_logprobs           # batch 2 x 1024 tokens x 151,669 vocab (Qwen3-sized), bf16 + fp32
    python -m rlhf_ray.benchmarks.bench_logprobs --quick   # batch 2 x 256 tokens x 32,000 vocab

Each case runs forward + backward in a fresh process and reports: the memory autograd keeps from forward to
backward beyond the logits (exact, from saved-tensor hooks), the peak memory above the logits (CPU: peak RSS, which
includes allocator and first-call overheads, so small shapes are noisy; CUDA: max allocated) and the time, with
ratios to the log_softmax baseline of the same case. Writes <--out>/bench_logprobs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from rlhf_ray.benchmarks import add_out_flag, write_report


def run_case(method: str, dtype: str, batch: int, length: int, vocab: int, device: str) -> dict:
    """Child process body: allocate logits, measure one forward + backward."""
    import resource

    import torch

    from rlhf_ray.algorithms.logprobs import compute_token_logprobs

    torch.manual_seed(0)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    logits = torch.randn(batch, length, vocab, dtype=torch_dtype, device=device).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, length), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # What autograd keeps from forward to backward (activation memory), beyond the logits themselves.
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() != logits.untyped_storage().data_ptr():
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if method == "blockwise":
            logprobs = compute_token_logprobs(logits, labels)
        else:
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    logprobs.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": time.perf_counter() - start, "extra_peak_mib": peak / 2**20,
            "saved_for_backward_mib": sum(saved.values()) / 2**20,
            "logits_mib": logits.numel() * logits.element_size() / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    add_out_flag(parser)
    args = parser.parse_args(argv)
    if args.child:
        method, dtype, batch, length, vocab, device = args.child
        print(json.dumps(run_case(method, dtype, int(batch), int(length), int(vocab), device)))
        return 0

    batch, length, vocab = (2, 256, 32_000) if args.quick else (2, 1024, 151_669)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = []
    print(f"batch {batch} x {length} tokens x vocab {vocab}, device {args.device}, forward + backward")
    for dtype in ("bf16", "fp32"):
        rows = {}
        for method in ("log_softmax", "blockwise"):
            out = subprocess.run([sys.executable, "-m", __spec__.name, "--child", method, dtype, str(batch), str(length),
                                  str(vocab), args.device], capture_output=True, text=True, env=env, check=True)
            rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        baseline = rows["log_softmax"]
        for method, row in rows.items():
            row.update({"method": method, "dtype": dtype,
                        "memory_ratio": row["extra_peak_mib"] / max(baseline["extra_peak_mib"], 1e-9),
                        "time_ratio": row["seconds"] / baseline["seconds"]})
            results.append(row)
            print(f"  {dtype:5s} {method:12s} logits {row['logits_mib']:7.0f} MiB  kept for backward "
                  f"{row['saved_for_backward_mib']:7.1f} MiB  extra peak {row['extra_peak_mib']:7.0f} MiB "
                  f"({row['memory_ratio']:.2f}x)  {row['seconds']:6.2f} s ({row['time_ratio']:.2f}x)")
    write_report(args.out, "bench_logprobs.json", {"shape": [batch, length, vocab], "device": args.device,
                                                   "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
