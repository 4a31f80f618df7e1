"""The embedded end-to-end demo (`make demo`): prepare → SFT → RM → PPO, then GRPO, on a small model and bundled data.

Every stage is the command a user would type, printed before it runs, so the demo doubles as a tutorial:

    python -m rlhf_ray.demo                 # all stages, under .demo/
    python -m rlhf_ray.demo --out /tmp/d    # elsewhere
    python -m rlhf_ray.demo --only grpo     # one stage (earlier outputs must exist)

Data: arithmetic questions ("What is 3 + 5?") from rlhf_ray/data/synthetic.py, whose answers can be checked, so
the RL stages can show the reward before and after. Model: the 'small' tiny Llama (random init, bundled tokenizer).
One local Ray cluster is started for the whole demo and every job joins it through RAY_ADDRESS.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rlhf_ray.telemetry.tracker import read_jsonl_metrics

TEMPLATE = Path(__file__).resolve().parent / "assets" / "templates" / "tiny.json"
STAGES = ("data", "prepare", "sft", "rm", "ppo", "grpo")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_ray.cli", *args]


def stage_commands(out: Path) -> dict[str, list[list[str]]]:
    """The commands of each stage, as a user would type them."""
    base, data, raw = out / "base", out / "data", out / "raw"
    prepare = lambda kind, src: _cli(  # noqa: E731 - a table of four near-identical commands
        "prepare", "--type", kind, "--input", str(raw / src), "--tokenizer_dir", str(base),
        "--conversation_template_config", str(TEMPLATE), "--output", str(data / kind), "--max_length", "128",
        "--overwrite")
    common_rl = ["--prompt_dataset", str(data / "prompt"), "--conversation_template_config", str(TEMPLATE),
                 "--max_new_tokens", "8", "--max_prompt_len", "64", "--kv_cache_gib", "0.25",
                 "--experience_batch_size", "8", "--warmup_steps", "0", "--tensorboard", "false"]
    return {
        "prepare": [prepare("sft", "sft.jsonl"), prepare("preference", "preference.jsonl"),
                    prepare("prompt", "prompt.jsonl")],
        "sft": [_cli("sft", "--pretrain", str(base), "--dataset", str(data / "sft"), "--max_epochs", "3",
                     "--batch_size", "16", "--lr", "2e-3", "--warmup_steps", "5", "--max_len", "128",
                     "--save_path", str(out / "sft"), "--log_dir", str(out / "logs" / "sft"),
                     "--tensorboard", "false")],
        "rm": [_cli("rm", "--pretrain", str(base), "--dataset", str(data / "preference"), "--max_epochs", "2",
                    "--batch_size", "16", "--lr", "2e-3", "--warmup_steps", "5", "--max_len", "128",
                    "--save_path", str(out / "rm"), "--log_dir", str(out / "logs" / "rm"), "--tensorboard", "false")],
        "ppo": [_cli("ppo", "--pretrain", str(out / "sft"), "--rm_pretrain", str(out / "rm"), *common_rl,
                     "--num_episodes", "6", "--n_samples_per_prompt", "1", "--train_batch_size", "8",
                     "--accumulation_steps", "1", "--lr", "1e-4", "--critic_lr", "1e-4",
                     "--save_path", str(out / "ppo"), "--log_dir", str(out / "logs" / "ppo"))],
        "grpo": [_cli("grpo", "--pretrain", str(out / "sft"), "--reward_source", "arithmetic", *common_rl,
                      "--num_episodes", "6", "--n_samples_per_prompt", "4", "--train_batch_size", "16",
                      "--accumulation_steps", "2", "--lr", "1e-4",
                      "--save_path", str(out / "grpo"), "--log_dir", str(out / "logs" / "grpo"))],
    }


def write_inputs(out: Path) -> None:
    from rlhf_ray.data.synthetic import (make_problems, prompt_rows, sft_rows, verifiable_preference_rows,
                                         write_jsonl)
    from rlhf_ray.models.tiny import build_tiny_model

    problems = make_problems(1024, seed=0, max_operand=10)
    write_jsonl(sft_rows(problems[:512]), out / "raw" / "sft.jsonl")
    write_jsonl(prompt_rows(problems[512:]), out / "raw" / "prompt.jsonl")
    write_jsonl(verifiable_preference_rows(512, seed=1), out / "raw" / "preference.jsonl")
    build_tiny_model(out / "base", flavour="small", seed=0)
    print(f"wrote bundled data and a 'small' tiny Llama under {out}", flush=True)


def reward_curve(log_dir: Path) -> tuple[float, float] | None:
    """(first, last) episode mean reward from a run's metrics.jsonl."""
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [r for r in read_jsonl_metrics(path) if r.get("reward/mean") is not None]
    return (rows[0]["reward/mean"], rows[-1]["reward/mean"]) if rows else None


def start_ray(out: Path) -> dict[str, str]:
    """One local cluster for the whole demo; the jobs join it through RAY_ADDRESS."""
    import ray

    info = ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    return {"RAY_ADDRESS": info.address_info["address"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-ray demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".demo", help="working directory for every output")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = args.only or STAGES
    for key, value in {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                       "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    env = dict(os.environ)
    if any(stage in ("sft", "rm", "ppo", "grpo") for stage in stages) and "RAY_ADDRESS" not in env:
        env.update(start_ray(out))
    commands = stage_commands(out)
    timings = {}
    for stage in stages:
        start = time.perf_counter()
        print(f"\n=== {stage} ===", flush=True)
        if stage == "data":
            write_inputs(out)
        for cmd in commands.get(stage, []):
            shown = ["rlhf-ray", *cmd[3:]]
            print("$ " + shlex.join(shown), flush=True)
            status = subprocess.run(cmd, env=env).returncode
            if status:
                print(f"demo: stage {stage!r} failed (exit {status}); its command is above", file=sys.stderr)
                return status
        timings[stage] = time.perf_counter() - start
    print("\n=== summary ===")
    for stage, seconds in timings.items():
        print(f"  {stage:8s} {seconds:7.1f}s")
    for stage in ("ppo", "grpo"):
        curve = reward_curve(out / "logs" / stage)
        if curve:
            print(f"  {stage} mean reward: first episode {curve[0]:.3f} -> last episode {curve[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
