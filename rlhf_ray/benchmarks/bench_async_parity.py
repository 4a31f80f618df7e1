"""Does the off-policy correction earn its keep? The demo's GRPO task run in sync mode, in async mode with max
staleness 2 (correction on, the default, and off), and with an injected sampler/trainer mismatch (correction on
and off), from the same initial weights with the same seed, on one Ray cluster.

    python -m rlhf_ray.benchmarks.bench_async_parity            # 20 episodes per run
    python -m rlhf_ray.benchmarks.bench_async_parity --quick    # 10 episodes per run

Task: the demo's GRPO stage (rlhf_ray/demo.py): the bundled arithmetic prompts, the number-only rule reward (the
share of the response's characters that are digits), the 'debug' tiny Llama from random init (model seed 0),
8 samples per prompt, 4 prompts per episode, 4 new tokens, lr 5e-3, 2 update steps per episode, train seed 42.
The reward starts near 0.13 and rises to ~0.9 within 20 episodes.

Runs:
  sync                 the baseline
  async_corr           --async_mode --max_staleness 2 (--rollout_is auto: the decoupled objective, token-level
                       truncated IS min(pi_old / pi_sampler, 2) on the policy loss)
  async_nocorr         the same with --rollout_is none
  bf16_sampler_corr    sync, the vLLM engine in bfloat16 while the trainer is float32 (--dtype bfloat16), with
                       --rollout_is token: the realistic precision mismatch
  mismatch_corr        sync, --sampler_weight_noise_std 0.05 (a diagnostic knob: seeded N(0, 0.05^2) noise on every
                       weight the engine loads, at start and at each sync; a sampler/trainer log-prob gap of ~0.4
                       nats) with --rollout_is token --rollout_rs token (truncated IS, and IcePop token masking
                       outside [0.5, 2])
  mismatch_nocorr      the same mismatch with the correction off

Each run reports the first episode's mean reward, the mean of the last K=3 episodes, the whole curve, the means of
the rollout_corr/* metrics and of the sampler/trainer log-prob gap (not logged in async mode with the correction
off: the old log-probs are then computed inside the update only), and the staleness.

Pass criteria, fixed before the first measured run (a reasonable practitioner's tolerance for this task's noise):
  parity:    async_corr's last-K reward >= sync's last-K reward - 0.15 × sync's gain (last-K minus first episode)
  mismatch:  mismatch_corr's last-K reward - its first-episode reward >= 0.5 × sync's gain (learning still rises)
The correction-off runs are reported beside them, without a criterion. Writes <--out>/async_parity.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, set_quiet_env, write_report
from rlhf_ray.benchmarks.bench_rl_step import REWARD_FN, TEMPLATE, prepare_prompts

LAST_K = 3
PARITY_TOLERANCE = 0.15        # of sync's reward gain
MISMATCH_MIN_RISE = 0.5        # of sync's reward gain
NOISE_STD = 0.05
ASYNC = ["--async_mode", "--max_staleness", "2"]
MISMATCH = ["--sampler_weight_noise_std", str(NOISE_STD)]
RUNS = {"sync": [],
        "async_corr": ASYNC,
        "async_nocorr": [*ASYNC, "--rollout_is", "none"],
        "bf16_sampler_corr": ["--dtype", "bfloat16", "--rollout_is", "token"],
        "mismatch_corr": [*MISMATCH, "--rollout_is", "token", "--rollout_rs", "token"],
        "mismatch_nocorr": MISMATCH}


def demo_grpo_argv(model_dir: Path, prompts: Path, work: Path, name: str, episodes: int) -> list[str]:
    """The demo's GRPO stage (rlhf_ray/demo.py stage_commands) as flags, without checkpoints."""
    return ["--pretrain", str(model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
            "--conversation_template_config", TEMPLATE, "--max_new_tokens", "4", "--max_prompt_len", "32",
            "--kv_cache_gib", "0.25", "--kl_coef", "0.001", "--num_update_steps", "2", "--lr", "5e-3",
            "--warmup_steps", "0", "--num_episodes", str(episodes), "--n_samples_per_prompt", "8",
            "--experience_batch_size", "4", "--train_batch_size", "16", "--accumulation_steps", "2",
            "--colocate_all", "--seed", "42", "--save_path", str(work / f"policy-{name}"),
            "--log_dir", str(work / f"log-{name}"), "--tensorboard", "false", "--progress", "false"]


def summarize(rows: list[dict]) -> dict:
    """One run's reward curve and the means of its correction, gap and staleness metrics over the episodes."""
    curve = [row["reward/mean"] for row in rows]

    def mean(key: str) -> float | None:
        values = [row[key] for row in rows if key in row]
        return sum(values) / len(values) if values else None

    corr_keys = sorted({key for row in rows for key in row if key.startswith("rollout_corr/")})
    gap_key = "rollout_corr/logprob_gap" if "rollout_corr/logprob_gap" in corr_keys else "rollout/logprob_gap_mean"
    return {"first_reward": curve[0], "last_k_reward": sum(curve[-LAST_K:]) / len(curve[-LAST_K:]),
            "reward_curve": curve, "logprob_gap_mean": mean(gap_key),
            "rollout_corr_means": {key: mean(key) for key in corr_keys},
            "staleness_mean": mean("rollout/staleness_mean"),
            "staleness_max": max(row.get("rollout/staleness_max", 0.0) for row in rows)}


def run_one(model_dir: Path, prompts: Path, work: Path, name: str, episodes: int) -> dict:
    from rlhf_ray.config.base import parse_config
    from rlhf_ray.pipelines.rl.config import GRPOConfig
    from rlhf_ray.pipelines.rl.run import run_rl
    from rlhf_ray.telemetry.tracker import read_jsonl_metrics

    argv = demo_grpo_argv(model_dir, prompts, work, name, episodes) + RUNS[name]
    start = time.perf_counter()
    if run_rl(parse_config(GRPOConfig, argv, "bench_async_parity"), "grpo") != 0:
        raise SystemExit(f"{name} run failed")
    rows = [row for row in read_jsonl_metrics(work / f"log-{name}" / "metrics.jsonl") if "reward/mean" in row]
    return {"flags": RUNS[name], **summarize(rows), "wall_s": time.perf_counter() - start}


def verdicts(results: dict) -> dict:
    """The two pass criteria of the module docstring, with the numbers they compare."""
    sync = results["sync"]
    gain = sync["last_k_reward"] - sync["first_reward"]
    parity_floor = sync["last_k_reward"] - PARITY_TOLERANCE * gain
    rise = results["mismatch_corr"]["last_k_reward"] - results["mismatch_corr"]["first_reward"]
    return {"sync_gain": gain,
            "parity": {"floor": parity_floor, "async_corr": results["async_corr"]["last_k_reward"],
                       "pass": results["async_corr"]["last_k_reward"] >= parity_floor},
            "mismatch_rise": {"min_rise": MISMATCH_MIN_RISE * gain, "rise": rise,
                              "pass": rise >= MISMATCH_MIN_RISE * gain}}


def print_table(results: dict, checks: dict, episodes: int) -> None:
    print(f"\nthe demo's GRPO task ('debug' tiny Llama, number-only reward), {episodes} episodes per run, seed 42, "
          f"last {LAST_K} episodes' mean ({os.cpu_count()}-CPU machine)")
    print(f"  {'run':18s} {'first':>6s} {f'last{LAST_K}':>6s} {'gap':>7s} {'IS mean':>8s} {'IS max':>7s} "
          f"{'masked':>7s} {'stale':>6s} {'wall s':>7s}")
    for name, r in results.items():
        corr = r["rollout_corr_means"]
        cell = lambda key: f"{corr[key]:.3f}" if key in corr else "-"  # noqa: E731
        gap = "-" if r["logprob_gap_mean"] is None else f"{r['logprob_gap_mean']:.4f}"
        print(f"  {name:18s} {r['first_reward']:6.3f} {r['last_k_reward']:6.3f} {gap:>7s} "
              f"{cell('rollout_corr/is_weight_mean'):>8s} {cell('rollout_corr/is_weight_max'):>7s} "
              f"{cell('rollout_corr/masked_token_frac'):>7s} {r['staleness_mean'] or 0:6.2f} {r['wall_s']:7.1f}")
    parity, rise = checks["parity"], checks["mismatch_rise"]
    print(f"  parity (async_corr last{LAST_K} >= sync last{LAST_K} - {PARITY_TOLERANCE} × sync gain "
          f"{checks['sync_gain']:.3f} = {parity['floor']:.3f}): {parity['async_corr']:.3f} -> "
          f"{'PASS' if parity['pass'] else 'FAIL'}")
    print(f"  mismatch (mismatch_corr rise >= {MISMATCH_MIN_RISE} × sync gain = {rise['min_rise']:.3f}): "
          f"{rise['rise']:.3f} -> {'PASS' if rise['pass'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 episodes per run")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per run (default 20, quick 10)")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    set_quiet_env()
    from rlhf_ray.fixtures.tiny import build_tiny_model
    from rlhf_ray.placement import connect_ray, disconnect_ray

    episodes = args.episodes or (10 if args.quick else 20)
    if episodes <= LAST_K:
        raise SystemExit(f"--episodes {episodes}: need more than {LAST_K} (the last {LAST_K} are averaged)")
    work = Path(tempfile.mkdtemp(prefix="bench-async-parity-"))
    model_dir = build_tiny_model(work / "tiny-debug", flavour="debug", seed=0)
    prompts = prepare_prompts(model_dir, work / "prompts")
    started = connect_ray(num_cpus=max(4, os.cpu_count() or 1))
    try:
        results = {name: run_one(model_dir, prompts, work, name, episodes) for name in RUNS}
    finally:
        disconnect_ray(started)
    checks = verdicts(results)
    print_table(results, checks, episodes)
    write_report(args.out, "async_parity.json", {
        "quick": args.quick, "episodes": episodes, "last_k": LAST_K, "seed": 42, "noise_std": NOISE_STD,
        "criteria": {"parity": f"async_corr last-{LAST_K} reward >= sync last-{LAST_K} reward - "
                               f"{PARITY_TOLERANCE} x sync gain (last-{LAST_K} minus first episode)",
                     "mismatch": f"mismatch_corr last-{LAST_K} minus first-episode reward >= {MISMATCH_MIN_RISE} "
                                 f"x sync gain"},
        "results": results, "checks": checks})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
