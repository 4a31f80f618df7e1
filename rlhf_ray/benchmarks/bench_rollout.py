"""Rollout throughput: our generator group through Ray against the raw vLLM engine and transformers generate.

    python -m rlhf_ray.benchmarks.bench_rollout --quick     # 1 engine, 16 prompts, n 1|4, 64 tokens   (a few minutes)
    python -m rlhf_ray.benchmarks.bench_rollout             # engines 1|2 x prompts 8|32 x n 1|4 x tokens 32|128

Three ways to produce the same completions (the 'bench' tiny Llama, ~13M parameters, float32, so that decoding
dominates; prompts are chat-formatted arithmetic questions):
  (a) raw   one `vllm.LLM` in a plain child process (no Ray), one `llm.generate` call for the whole batch, timed
            inside that process: the ceiling;
  (b) group our GeneratorGroup: Ray actors, chunk dispatch, per-prompt seeds, log-prob extraction, text decode;
  (c) hf    transformers `model.generate` in another plain child process, the whole batch at once (left-padded),
            with scores.
All three generate exactly max_new_tokens per sample (ignore_eos) and return the sampled tokens' log-probs.
Ray starts its workers at niceness 15; the baselines run at 0. On a machine shared with other work that alone
cost the group ~12% here, so by default this benchmark starts Ray with RAY_worker_niceness=0 (equal priority);
--ray_worker_niceness 15 measures Ray's default.
The three run interleaved inside each configuration, in rotated order, best of --repeats rounds (more for short
configurations, until each mode ran --min_seconds), so that the machine's background load hits them alike. Ratios (b)/(a) and (b)/(c) are of generated tokens per second.
(a) is always one engine: with 2 engines, (b)/(a) is the scaling of the group over one raw engine.

Writes <--out>/bench_rollout.json and bench_rollout.png (--quick: bench_rollout_quick.*).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, results_dir, write_report


def build_prompts(count: int) -> list[list[int]]:
    from rlhf_ray.fixtures.demo_data import make_problems
    from rlhf_ray.fixtures.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    prompts = []
    for problem in make_problems(count, seed=11):
        messages = [{"role": "user", "content": problem.question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return prompts


def sampling_for(n: int, max_new: int) -> dict:
    return {"n_samples_per_prompt": n, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": max_new,
            "stop": [], "stop_token_ids": [], "ignore_eos": True, "seed": 0}


class RawVLLM:
    """(a): the engine our backend builds, driven directly."""

    def __init__(self, section, model_dir: str) -> None:
        from rlhf_ray.rollout.backends.vllm_backend import VLLMBackend

        self.backend = VLLMBackend(section, model_dir, None, engine_seed=0)   # same LLM(...) arguments as (b)

    def run(self, prompts, sampling) -> int:
        from rlhf_ray.rollout.backends.vllm_backend import vllm_sampling_params
        from rlhf_ray.rollout.types import request_seed

        params = [vllm_sampling_params(sampling, request_seed(0, 0, i)) for i in range(len(prompts))]
        outputs = self.backend.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outputs for c in o.outputs)


class RawHF:
    """(c): transformers generate, whole batch left-padded, processed scores kept for log-probs."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(self, prompts, sampling) -> int:
        torch = self.torch
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        config = self.model.generation_config.__class__.from_dict(self.model.generation_config.to_dict())
        config.update(eos_token_id=[], do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
                      max_new_tokens=sampling["max_new_tokens"], return_dict_in_generate=True, output_scores=True,
                      num_return_sequences=sampling["n_samples_per_prompt"])
        torch.manual_seed(0)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            new = out.sequences[:, width:]
            logprobs = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, new.unsqueeze(-1))
        assert logprobs.shape[:2] == new.shape and new.shape[1] == sampling["max_new_tokens"]
        return new.numel()


def _baseline_server(conn, mode: str, model_dir: str, section_fields: dict, threads: int) -> None:
    """Child-process body hosting one baseline, (a) or (c), alone: no Ray in the process, and no other engine
    (an HF model generating in the same process measurably slowed the vLLM engine there)."""
    import torch

    torch.set_num_threads(threads)
    from rlhf_ray.rollout.config import GeneratorSection

    engine = RawHF(model_dir) if mode == "hf" else RawVLLM(GeneratorSection(**section_fields), model_dir)
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            return
        prompts, sampling = message
        start = time.perf_counter()
        tokens = engine.run(prompts, sampling)
        conn.send((time.perf_counter() - start, tokens))


class Baseline:
    """Driver-side handle of one baseline process; run(...) returns the (seconds, tokens) timed inside it."""

    def __init__(self, mode: str, model_dir: str, section_fields: dict, threads: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_baseline_server, args=(child_conn, mode, model_dir, section_fields,
                                                                  threads), daemon=True)
        self.process.start()
        assert self.conn.recv() == "ready"

    def run(self, prompts, sampling) -> tuple[float, int]:
        self.conn.send((prompts, sampling))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


def ray_round_trip_ms(group) -> float:
    """Median latency of an empty actor call: the fixed cost (b) pays per chunk on top of generation."""
    import statistics

    samples = []
    for _ in range(20):
        start = time.perf_counter()
        group.workers.call_rank(0, "ping")
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def timed_interleaved(modes: dict, repeats: int, min_seconds: float) -> dict[str, tuple[float, int]]:
    """Best time per mode over at least `repeats` rounds, and more rounds until every mode has run for
    `min_seconds` in total (short configurations get more tries); each round runs every mode once, in a rotated
    order, so that a burst of background load or a warm cache does not favour one mode."""
    best = {name: (float("inf"), 0) for name in modes}
    spent = {name: 0.0 for name in modes}
    names = list(modes)
    round_ = 0
    while round_ < repeats or min(spent.values()) < min_seconds:
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            seconds, tokens = modes[name]()
            best[name] = (min(best[name][0], seconds), tokens)
            spent[name] += seconds
        round_ += 1
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one engine count, one batch size, one length")
    parser.add_argument("--flavour", default="bench", help="tiny model flavour (bench: ~13M params)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine (all three modes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per mode (best kept)")
    parser.add_argument("--min_seconds", type=float, default=4.0,
                        help="keep repeating a configuration until each mode ran this long in total")
    parser.add_argument("--skip_hf", action="store_true", help="leave out (c)")
    parser.add_argument("--ray_worker_niceness", type=int, default=0,
                        help="niceness of the Ray worker processes (Ray's own default is 15, which on a shared, "
                             "loaded machine costs the generators CPU share against the nice-0 baselines)")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    results = results_dir(args.out)
    os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)     # read by the raylet ray.init starts
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.quick:
        engines_list, batches, samples, lengths, repeats = [1], [16], [1, 4], [64], args.repeats or 5
    else:
        engines_list, batches, samples, lengths, repeats = [1, 2], [8, 32], [1, 4], [32, 128], args.repeats or 3

    import ray
    import torch

    torch.set_num_threads(args.threads)
    from rlhf_ray.fixtures.tiny import build_tiny_model
    from rlhf_ray.rollout.config import GeneratorSection
    from rlhf_ray.workers.generator_group import GeneratorGroup

    model_dir = str(build_tiny_model(results / "models" / f"tiny-{args.flavour}", flavour=args.flavour, seed=0))
    max_len = max(lengths)
    base = dict(cpus_per_engine=1, cpu_threads=args.threads, max_prompt_len=64, max_new_tokens=max_len,
                kv_cache_gib=1, ignore_eos=True, max_restarts=0)
    prompts_all = build_prompts(max(batches))
    from transformers import AutoConfig, AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
                   .parameters())
    hf = not args.skip_hf
    baselines = {"raw_vllm": Baseline("raw_vllm", model_dir, base, args.threads)}
    if hf:
        baselines["hf"] = Baseline("hf", model_dir, base, args.threads)
    print(f"model: tiny-{args.flavour}, {n_params / 1e6:.1f}M params, float32; prompts "
          f"{min(map(len, prompts_all))}-{max(map(len, prompts_all))} tokens; threads/engine {args.threads}; "
          f"best of {repeats}; Ray worker niceness {args.ray_worker_niceness}; 2-core CPU, loaded machine")
    ray.init(address="local", num_cpus=max(engines_list) + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}})
    rows = []
    try:
        for engines in engines_list:
            group = GeneratorGroup(GeneratorSection(num_engines=engines, **base), model_dir, name=f"bench-{engines}")
            warm = sampling_for(1, 8)
            baselines["raw_vllm"].run(prompts_all[:4], warm)
            group.generate(prompts_all[:4], sampling={k: warm[k] for k in ("max_new_tokens", "ignore_eos")})
            if hf:
                baselines["hf"].run(prompts_all[:2], warm)
            round_trip_ms = ray_round_trip_ms(group)
            print(f"engines {engines}: Ray round trip to an engine (empty call, median of 20) "
                  f"{round_trip_ms:.1f} ms", flush=True)
            for batch, n, length in itertools.product(batches, samples, lengths):
                prompts = prompts_all[:batch]
                sampling = sampling_for(n, length)
                overrides = {k: sampling[k] for k in ("n_samples_per_prompt", "max_new_tokens", "ignore_eos")}
                row = {"engines": engines, "prompts": batch, "n": n, "max_new_tokens": length,
                       "ray_round_trip_ms": round_trip_ms}

                def run_group():
                    start = time.perf_counter()
                    result = group.generate(prompts, sampling=overrides, seed_offset=0)
                    return time.perf_counter() - start, sum(len(s.response_ids) for r in result for s in r.samples)

                modes = {"raw_vllm": lambda: baselines["raw_vllm"].run(prompts, sampling), "group": run_group}
                if hf:
                    modes["hf"] = lambda: baselines["hf"].run(prompts, sampling)
                for mode, (seconds, tokens) in timed_interleaved(modes, repeats, args.min_seconds).items():
                    assert tokens == batch * n * length, (mode, tokens)
                    row[mode] = {"seconds": seconds, "tokens_per_s": tokens / seconds,
                                 "prompts_per_s": batch / seconds}
                row["group_over_raw"] = row["group"]["tokens_per_s"] / row["raw_vllm"]["tokens_per_s"]
                if hf:
                    row["group_over_hf"] = row["group"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
                rows.append(row)
                print(f"engines {engines} prompts {batch:3d} n {n} tokens {length:4d} | tok/s raw "
                      f"{row['raw_vllm']['tokens_per_s']:8.0f} group {row['group']['tokens_per_s']:8.0f}"
                      + (f" hf {row['hf']['tokens_per_s']:8.0f}" if hf else "")
                      + f" | (b)/(a) {row['group_over_raw']:.3f}"
                      + (f" (b)/(c) {row['group_over_hf']:.2f}" if hf else ""), flush=True)
            group.shutdown()
    finally:
        ray.shutdown()
        for baseline in baselines.values():
            baseline.close()

    one_engine = [r for r in rows if r["engines"] == 1]
    summary = {"group_over_raw_min_1_engine": min(r["group_over_raw"] for r in one_engine),
               "group_over_raw_mean_1_engine": sum(r["group_over_raw"] for r in one_engine) / len(one_engine)}
    if hf:
        summary["group_over_hf_min"] = min(r["group_over_hf"] for r in one_engine)
        summary["group_over_hf_max"] = max(r["group_over_hf"] for r in one_engine)
    report = {"benchmark": "rollout", "quick": args.quick, "model": f"tiny-{args.flavour}",
              "params": n_params,
              "threads_per_engine": args.threads, "repeats": repeats,
              "ray_worker_niceness": args.ray_worker_niceness, "min_seconds": args.min_seconds,
              "rows": rows, "summary": summary}
    stem = "bench_rollout_quick" if args.quick else "bench_rollout"
    print(json.dumps(summary, indent=2))
    write_report(results, f"{stem}.json", report)
    plot(rows, results / f"{stem}.png", bool(hf))
    print(f"wrote {results / (stem + '.png')}")
    return 0


def plot(rows: list[dict], path: Path, with_hf: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"E{r['engines']} P{r['prompts']}\nn{r['n']} T{r['max_new_tokens']}" for r in rows]
    modes = ["raw_vllm", "group"] + (["hf"] if with_hf else [])
    names = {"raw_vllm": "(a) raw vLLM", "group": "(b) GeneratorGroup (Ray)", "hf": "(c) transformers"}
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    for k, mode in enumerate(modes):
        ax.bar([i + k * width for i in range(len(rows))], [r[mode]["tokens_per_s"] for r in rows], width,
               label=names[mode])
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("generated tokens / s")
    ax.set_title("rollout throughput (E engines, P prompts, n samples, T new tokens); 2-core CPU, loaded")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
