"""Partial rollouts on a length-skewed batch: tokens/s and step time of sync mode, one-step-off async mode, and async
mode with partial rollouts (a weight sync lands between two generation segments instead of waiting for the longest
response), measured in one run on one Ray cluster.

    python -m rlhf_ray.benchmarks.bench_partial_rollout            # 8 episodes per mode
    python -m rlhf_ray.benchmarks.bench_partial_rollout --quick    # 4 episodes per mode

The job is the same GRPO run as bench_rl_step ('debug' tiny Llama, one vLLM engine, the number-only rule reward).
Length skew: the randomly initialised model samples almost uniformly over its 528-token vocabulary, so making
STOP_TOKENS (33 ids) stop tokens ends a response after each token with probability ~1/16: lengths are geometric,
mean ~16, most short, a few near max_new_tokens (128). Each mode reports the mean episode time over the episodes
after the first and generated tokens per second of episode time; ratios are against sync and async. Writes
<--out>/partial_rollout.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, set_quiet_env, write_report
from rlhf_ray.benchmarks.bench_rl_step import REWARD_FN, prepare_prompts

MODES = {"sync": [], "async": ["--async_mode", "--max_staleness", "1"],
         "async_partial": ["--async_mode", "--max_staleness", "1", "--partial_rollout",
                           "--partial_rollout_segment_tokens", "16", "--partial_rollout_max_resumes", "1"]}
STOP_TOKENS = [str(token) for token in range(200, 233)]
MAX_NEW_TOKENS = 128


def run_mode(model_dir: Path, prompts: Path, work: Path, mode: str, episodes: int) -> dict:
    from rlhf_ray.config.base import parse_config
    from rlhf_ray.pipelines.rl.config import GRPOConfig
    from rlhf_ray.pipelines.rl.run import run_rl

    log_dir = work / f"log-{mode}"
    argv = ["--pretrain", str(model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
            "--n_samples_per_prompt", "4", "--max_new_tokens", str(MAX_NEW_TOKENS), "--max_prompt_len", "32",
            "--stop_token_ids", *STOP_TOKENS, "--kv_cache_gib", "0.5", "--num_episodes", str(episodes),
            "--experience_batch_size", "8", "--train_batch_size", "8", "--accumulation_steps", "4",
            "--num_update_steps", "1", "--lr", "1e-5", "--kl_coef", "0.01", "--save_path", str(work / f"policy-{mode}"),
            "--log_dir", str(log_dir), "--tensorboard", "false", "--progress", "false", *MODES[mode]]
    cfg = parse_config(GRPOConfig, argv, "bench_partial_rollout")
    if run_rl(cfg, "grpo") != 0:
        raise SystemExit(f"{mode} run failed")
    return summarise_episodes(log_dir)


def summarise_episodes(log_dir: Path) -> dict:
    """A run's metrics.jsonl -> means over its episodes after the first (the first carries the warm-up)."""
    from rlhf_ray.telemetry.tracker import read_jsonl_metrics

    rows = [row for row in read_jsonl_metrics(log_dir / "metrics.jsonl") if "timing/episode" in row][1:]
    mean = lambda key: sum(row.get(key, 0.0) for row in rows) / len(rows)  # noqa: E731
    tokens = sum(row["rollout/response_len_mean"] * row["rollout/samples"] for row in rows)
    seconds = sum(row["timing/episode"] for row in rows)
    return {"episodes_measured": len(rows), "step_s": seconds / len(rows), "tokens_per_s": tokens / seconds,
            "response_len_mean": mean("rollout/response_len_mean"),
            "response_len_max": max(row["rollout/response_len_max"] for row in rows),
            "generate_s": mean("timing/generate"), "update_s": mean("timing/update"),
            "weight_sync_s": mean("timing/weight_sync"),
            "staleness_max": max(row["rollout/staleness_max"] for row in rows),
            "staleness_mean": mean("rollout/staleness_mean"),
            "syncs_crossed": sum(row.get("rollout/partial_syncs_crossed", 0.0) for row in rows),
            "resumed_frac": mean("rollout/partial_resumed_frac"),
            "newer_token_frac": mean("rollout/partial_newer_token_frac")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 episodes per mode")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per mode (default 8, quick 4)")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    set_quiet_env()
    from rlhf_ray.fixtures.tiny import build_tiny_model
    from rlhf_ray.placement import connect_ray, disconnect_ray

    episodes = args.episodes or (4 if args.quick else 8)
    work = Path(tempfile.mkdtemp(prefix="bench-partial-rollout-"))
    model_dir = build_tiny_model(work / "tiny-debug", flavour="debug", seed=0)
    prompts = prepare_prompts(model_dir, work / "prompts")
    started = connect_ray(num_cpus=max(3, os.cpu_count() or 1))
    try:
        results = {}
        for mode in MODES:
            start = time.perf_counter()
            results[mode] = run_mode(model_dir, prompts, work, mode, episodes)
            results[mode]["wall_s"] = time.perf_counter() - start
    finally:
        disconnect_ray(started)
    ratios = {"async_over_sync_tokens_per_s": results["async"]["tokens_per_s"] / results["sync"]["tokens_per_s"],
              "partial_over_sync_tokens_per_s": results["async_partial"]["tokens_per_s"]
              / results["sync"]["tokens_per_s"],
              "partial_over_async_tokens_per_s": results["async_partial"]["tokens_per_s"]
              / results["async"]["tokens_per_s"]}
    print(f"\nlength-skewed GRPO on the 'debug' tiny Llama: 32 samples per episode, max {MAX_NEW_TOKENS} tokens, "
          f"mean over {results['sync']['episodes_measured']} episodes after the first ({os.cpu_count()}-CPU machine)")
    print(f"  {'mode':14s} {'step s':>8s} {'tokens/s':>9s} {'len mean':>9s} {'len max':>8s} {'syncs crossed':>14s}")
    for mode, r in results.items():
        print(f"  {mode:14s} {r['step_s']:8.3f} {r['tokens_per_s']:9.1f} {r['response_len_mean']:9.1f} "
              f"{r['response_len_max']:8.0f} {r['syncs_crossed']:14.0f}")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")
    write_report(args.out, "partial_rollout.json", {"quick": args.quick, "episodes": episodes,
                                                    "max_new_tokens": MAX_NEW_TOKENS, "results": results,
                                                    "ratios": ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
