"""One RL step's time breakdown (generate / score / advantage / update / weight sync) and async mode's speed-up
over sync mode, measured in the same run on the same Ray cluster.

    python -m rlhf_ray.benchmarks.bench_rl_step            # 'small' tiny Llama (~3M), 8 prompts × 4 samples × 64 tokens
    python -m rlhf_ray.benchmarks.bench_rl_step --quick    # 'debug' tiny Llama (~0.4M), 8 prompts × 4 samples × 16 tokens

Both modes run the same GRPO job (`run_rl`, the code behind `rlhf-ray grpo`: policy, reference, one vLLM engine,
the bundled number-only rule reward) from the same initial weights. Per-phase times are means over the episodes
after the first (which pays for warm-up); the speed-up is sync's mean episode time over async's. In async mode the
phases overlap, so its per-phase times add up to more than its episode time. Writes
<--out>/bench_rl_step.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, set_quiet_env, write_report

PHASES = ("generate", "score", "advantage", "buffer_put", "update", "weight_sync")
ASSETS = Path(__file__).resolve().parent.parent / "assets"        # shipped inside the package
REWARD_FN = f"{ASSETS / 'rewards' / 'number_only.py'}:number_only"
TEMPLATE = str(ASSETS / "templates" / "tiny.json")


def prepare_prompts(model_dir: Path, out: Path, template: str | None = TEMPLATE, max_length: int = 64) -> Path:
    """The demo's arithmetic prompts, prepared with `template` (None: the tokenizer's own chat template)."""
    from rlhf_ray.fixtures.demo_data import make_problems, prompt_rows, write_jsonl
    from rlhf_ray.pipelines import prepare

    source = write_jsonl(prompt_rows(make_problems(256, seed=5)), out.with_suffix(".jsonl"))
    status = prepare.main(["--type", "prompt", "--input", str(source), "--tokenizer_dir", str(model_dir),
                           *(["--conversation_template_config", template] if template else []), "--output", str(out),
                           "--max_length", str(max_length), "--write_jsonl", "false", "--overwrite"])
    if status:
        raise SystemExit(f"prepare failed ({status})")
    return out


def run_mode(model_dir: Path, prompts: Path, work: Path, mode: str, episodes: int, new_tokens: int) -> dict:
    from rlhf_ray.config.base import parse_config
    from rlhf_ray.pipelines.rl.config import GRPOConfig
    from rlhf_ray.pipelines.rl.run import run_rl
    from rlhf_ray.telemetry.tracker import read_jsonl_metrics

    log_dir = work / f"log-{mode}"
    argv = ["--pretrain", str(model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
            "--n_samples_per_prompt", "4", "--max_new_tokens", str(new_tokens), "--max_prompt_len", "32",
            "--ignore_eos", "--kv_cache_gib", "0.5", "--num_episodes", str(episodes), "--experience_batch_size", "8",
            "--train_batch_size", "8", "--accumulation_steps", "4", "--num_update_steps", "1", "--lr", "1e-4",
            "--kl_coef", "0.01", "--save_path", str(work / f"policy-{mode}"), "--log_dir", str(log_dir),
            "--tensorboard", "false", "--progress", "false"]
    if mode == "async":
        argv += ["--async_mode", "--max_staleness", "1"]
    cfg = parse_config(GRPOConfig, argv, "bench_rl_step")
    if run_rl(cfg, "grpo") != 0:
        raise SystemExit(f"{mode} run failed")
    rows = [row for row in read_jsonl_metrics(log_dir / "metrics.jsonl") if "timing/episode" in row][1:]
    mean = lambda key: sum(row.get(key, 0.0) for row in rows) / len(rows)  # noqa: E731
    return {"episodes_measured": len(rows), "episode_s": mean("timing/episode"),
            "phases_s": {phase: mean(f"timing/{phase}") for phase in PHASES},
            "startup_s": read_jsonl_metrics(log_dir / "metrics.jsonl")[0].get("timing/startup"),
            "staleness_max": max(row["rollout/staleness_max"] for row in rows),
            "samples_per_episode": rows[0]["rollout/samples"], "tokens_per_sample": new_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="debug model, 16 new tokens, 6 episodes")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per mode (default 8, quick 6)")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    set_quiet_env()
    from rlhf_ray.fixtures.tiny import build_tiny_model
    from rlhf_ray.placement import connect_ray, disconnect_ray

    flavour, new_tokens = ("debug", 16) if args.quick else ("small", 64)
    episodes = args.episodes or (6 if args.quick else 8)
    work = Path(tempfile.mkdtemp(prefix="bench-rl-step-"))
    model_dir = build_tiny_model(work / f"tiny-{flavour}", flavour=flavour, seed=0)
    prompts = prepare_prompts(model_dir, work / "prompts")
    started = connect_ray(num_cpus=max(3, os.cpu_count() or 1))
    try:
        results = {}
        for mode in ("sync", "async"):
            start = time.perf_counter()
            results[mode] = run_mode(model_dir, prompts, work, mode, episodes, new_tokens)
            results[mode]["wall_s"] = time.perf_counter() - start
    finally:
        disconnect_ray(started)
    speedup = results["sync"]["episode_s"] / max(results["async"]["episode_s"], 1e-9)
    print(f"\nRL step on the '{flavour}' tiny Llama: {results['sync']['samples_per_episode']:.0f} samples × "
          f"{new_tokens} tokens per episode, mean over {results['sync']['episodes_measured']} episodes after the "
          f"first ({os.cpu_count()}-CPU machine)")
    print(f"  {'phase':12s} {'sync s':>9s} {'share':>7s} {'async s':>9s}")
    for phase in PHASES:
        sync_s, async_s = results["sync"]["phases_s"][phase], results["async"]["phases_s"][phase]
        print(f"  {phase:12s} {sync_s:9.3f} {sync_s / results['sync']['episode_s']:7.1%} {async_s:9.3f}")
    print(f"  {'episode':12s} {results['sync']['episode_s']:9.3f} {'':7s} {results['async']['episode_s']:9.3f}")
    print(f"  async speed-up over sync: {speedup:.2f}x (staleness max {results['async']['staleness_max']:.0f})")
    write_report(args.out, "bench_rl_step.json", {"quick": args.quick, "flavour": flavour, "episodes": episodes,
                                                  "results": results, "async_speedup": speedup})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
