"""The RL loop's generation side with a simulated trainer: sync vs one-step-off async vs async with partial rollouts,
on your model and cluster, measured in one run.

    rlhf-ray bench rl_loop                                    # 'debug' tiny Llama, length-skewed, S = 0.25 s
    rlhf-ray bench rl_loop --model DIR --simulated_trainer_step_s 30 --prompts 64 --n 8 --max_new_tokens 4096 \\
        -- --num_engines 8 --tensor_parallel_size 2 --generator_pool gen
    rlhf-ray submit -- bench rl_loop --model /models/qwen ...      # the same, on a Ray cluster

Each mode is one `rlhf-ray grpo` run with `--simulated_trainer_step_s S`: the policy group is a stand-in whose
optimizer step takes S seconds (workers/simulated_trainer.py); generation, the reward, the replay buffer, the async
collector, partial rollouts and every weight sync (the full weights, to every engine) run for real. S is what you
expect your trainer to take per step; flags after `--` go to every grpo run (engines, pools, parallelism, reward).

Workload: the demo's arithmetic prompts (--prompts per episode, --n samples each; or --prompt_dataset DIR, prepared
with `rlhf-ray prepare --type prompt`), the number-only rule reward. On the default model (random weights) 33 token
ids are made stop tokens, so lengths are geometric (mean ~16, a long tail up to --max_new_tokens): the skew under
which partial rollouts pay. On --model DIR the lengths are the model's own.

Reported per mode, as means over the episodes after the first: generated tokens per second of episode time, step
(episode) seconds, generate / update / weight-sync seconds, staleness (mean, max: policy versions between a sample's
oldest token and the weights that train on it), syncs crossed by unfinished samples and the share of samples that
resumed; tokens/s and step time as ratios against sync mode of the same run. Writes <--out>/rl_loop.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, set_quiet_env, write_report
from rlhf_ray.benchmarks.bench_partial_rollout import STOP_TOKENS, summarise_episodes
from rlhf_ray.benchmarks.bench_rl_step import REWARD_FN, TEMPLATE, prepare_prompts

MODES = ("sync", "async", "partial")


def mode_flags(mode: str, segment_tokens: int) -> list[str]:
    async_flags = ["--async_mode", "--max_staleness", "1"]
    return {"sync": [], "async": async_flags,
            "partial": async_flags + ["--partial_rollout", "--partial_rollout_segment_tokens", str(segment_tokens),
                                      "--partial_rollout_max_resumes", "1"]}[mode]


def grpo_argv(args, model_dir: Path, prompts: Path, work: Path, mode: str, extra: list[str]) -> list[str]:
    """One mode's `rlhf-ray grpo` flags: one optimizer step per episode over all of its samples."""
    samples = args.prompts * args.n
    # the tiny model: skewed lengths, and its short context and small KV cache
    tiny = ["--stop_token_ids", *STOP_TOKENS, "--max_prompt_len", "32", "--kv_cache_gib", "0.5"]
    return ["--pretrain", str(model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
            "--simulated_trainer_step_s", str(args.simulated_trainer_step_s), "--n_samples_per_prompt", str(args.n),
            "--max_new_tokens", str(args.max_new_tokens), "--num_episodes", str(args.episodes),
            "--experience_batch_size", str(args.prompts), "--train_batch_size", str(samples),
            "--accumulation_steps", "1", "--num_update_steps", "1", "--save_path", str(work / f"policy-{mode}"),
            "--log_dir", str(work / f"log-{mode}"), "--tensorboard", "false", "--progress", "false",
            *(tiny if args.model is None else []),
            *mode_flags(mode, args.segment_tokens), *extra]


def run_mode(args, model_dir: Path, prompts: Path, work: Path, mode: str, extra: list[str]) -> dict:
    from rlhf_ray.config.base import parse_config
    from rlhf_ray.pipelines.rl.config import GRPOConfig
    from rlhf_ray.pipelines.rl.run import run_rl

    cfg = parse_config(GRPOConfig, grpo_argv(args, model_dir, prompts, work, mode, extra), "rlhf-ray bench rl_loop")
    start = time.perf_counter()
    if run_rl(cfg, "grpo") != 0:
        raise SystemExit(f"rlhf-ray bench rl_loop: the {mode} run failed (its messages are above)")
    return {**summarise_episodes(work / f"log-{mode}"), "wall_s": time.perf_counter() - start}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="rlhf-ray bench rl_loop", description=__doc__.split("\n\n")[0],
                                     epilog="flags after -- go to every `rlhf-ray grpo` run")
    parser.add_argument("--model", default=None, help="HF model directory (default: a 'debug' tiny Llama built "
                                                      "here, with a length-skewing stop-token set)")
    parser.add_argument("--simulated_trainer_step_s", type=float, default=0.25,
                        help="seconds one optimizer step of the stand-in trainer takes (default 0.25)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="sync is always run: the "
                                                                                     "ratios' baseline")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per mode (default 8, --quick 4); "
                                                                   "the first is not measured")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per episode (default 16)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest response (default 256)")
    parser.add_argument("--segment_tokens", type=int, default=16,
                        help="partial mode: tokens per generation segment (default 16)")
    parser.add_argument("--prompt_dataset", default=None, help="prepared prompts (`rlhf-ray prepare --type "
                                                               "prompt`); default the demo's arithmetic prompts")
    parser.add_argument("--quick", action="store_true", help="4 episodes per mode")
    add_out_flag(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.episodes = args.episodes or (4 if args.quick else 8)
    if args.episodes < 2:
        parser.error(f"--episodes {args.episodes}: at least 2 (the first carries the warm-up and is not measured)")
    if args.simulated_trainer_step_s < 0:
        parser.error(f"--simulated_trainer_step_s {args.simulated_trainer_step_s}: give seconds >= 0")
    args.modes = ["sync"] + [mode for mode in args.modes if mode != "sync"]
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    set_quiet_env()
    from rlhf_ray.placement import connect_ray, disconnect_ray

    work = Path(tempfile.mkdtemp(prefix="bench-rl-loop-"))
    if args.model is None:
        from rlhf_ray.fixtures.tiny import build_tiny_model

        model_dir, template = build_tiny_model(work / "tiny-debug", flavour="debug", seed=0), TEMPLATE
    else:
        model_dir, template = Path(args.model), None         # its tokenizer's own chat template
    prompts = Path(args.prompt_dataset) if args.prompt_dataset else prepare_prompts(
        model_dir, work / "prompts", template, max_length=64 if args.model is None else 256)
    started = connect_ray(num_cpus=max(3, os.cpu_count() or 1))
    try:
        results = {mode: run_mode(args, model_dir, prompts, work, mode, extra) for mode in args.modes}
    finally:
        disconnect_ray(started)
    sync = results["sync"]
    ratios = {f"{mode}_over_sync": {"tokens_per_s": r["tokens_per_s"] / sync["tokens_per_s"],
                                    "step_s": r["step_s"] / sync["step_s"]}
              for mode, r in results.items() if mode != "sync"}
    print(f"\nRL loop with a simulated trainer ({args.simulated_trainer_step_s:g} s per optimizer step), "
          f"{args.model or 'debug tiny Llama'}: {args.prompts} prompts × {args.n} samples per episode, at most "
          f"{args.max_new_tokens} tokens; means over {args.episodes - 1} episodes after the first")
    print(f"  {'mode':8s} {'tokens/s':>9s} {'step s':>7s} {'generate':>9s} {'update':>7s} {'sync':>6s} "
          f"{'stale mean':>10s} {'stale max':>9s} {'syncs crossed':>13s} {'tok/s ÷ sync':>12s}")
    for mode, r in results.items():
        ratio = r["tokens_per_s"] / sync["tokens_per_s"]
        print(f"  {mode:8s} {r['tokens_per_s']:9.1f} {r['step_s']:7.3f} {r['generate_s']:9.3f} {r['update_s']:7.3f} "
              f"{r['weight_sync_s']:6.3f} {r['staleness_mean']:10.2f} {r['staleness_max']:9.0f} "
              f"{r['syncs_crossed']:13.0f} {ratio:12.2f}")
    write_report(args.out, "rl_loop.json", {
        "model": args.model or "debug tiny Llama (random init, 33 stop tokens: geometric lengths)",
        "simulated_trainer_step_s": args.simulated_trainer_step_s, "prompts": args.prompts, "n": args.n,
        "max_new_tokens": args.max_new_tokens, "segment_tokens": args.segment_tokens, "episodes": args.episodes,
        "episodes_measured": args.episodes - 1, "quick": args.quick, "grpo_flags": extra, "results": results,
        "ratios": ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
