"""The embedded end-to-end demo (`make demo`): prepare → SFT → RM → PPO, then GRPO, on a small model and bundled data.

Every stage is the command a user would type, printed before it runs, so the demo doubles as a tutorial:

    python -m rlhf_ray.demo                 # all stages, under .demo/
    python -m rlhf_ray.demo --out /tmp/d    # elsewhere
    python -m rlhf_ray.demo --only grpo     # one stage (earlier outputs must exist)

Data: arithmetic questions ("What is 3 + 5?") from rlhf_ray/fixtures/demo_data.py, whose answers can be checked, so
the RL stages can show the reward before and after. Model: the 'debug' tiny Llama (random init, bundled tokenizer).
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

ASSETS = Path(__file__).resolve().parent / "assets"
TEMPLATE = ASSETS / "templates" / "tiny.json"
REWARD_FN = ASSETS / "rewards" / "number_only.py"
STAGES = ("data", "prepare", "sft", "rm", "ppo", "grpo")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_ray.cli", *args]


def stage_commands(out: Path) -> dict[str, list[list[str]]]:
    """The commands of each stage, as a user would type them.

    PPO and GRPO start from the base model rather than the SFT model: the SFT model already answers with numbers,
    so the demo's rewards would have no room to rise. On a real task, pass --pretrain <sft output>.
    """
    base, data, raw = out / "base", out / "data", out / "raw"
    prepare = lambda kind, src: _cli(  # noqa: E731 - a table of three near-identical commands
        "prepare", "--type", kind, "--input", str(raw / src), "--tokenizer_dir", str(base),
        "--conversation_template_config", str(TEMPLATE), "--output", str(data / kind), "--max_length", "128",
        "--overwrite")
    small = ["--tensorboard", "false", "--warmup_steps", "0"]
    rl = ["--prompt_dataset", str(data / "prompt"), "--conversation_template_config", str(TEMPLATE),
          "--max_new_tokens", "4", "--max_prompt_len", "32", "--kv_cache_gib", "0.25", "--kl_coef", "0.001",
          "--num_update_steps", "2", "--lr", "5e-3"]
    return {
        "prepare": [prepare("sft", "sft.jsonl"), prepare("preference", "preference.jsonl"),
                    prepare("prompt", "prompt.jsonl")],
        "sft": [_cli("sft", "--pretrain", str(base), "--dataset", str(data / "sft"), "--max_epochs", "2",
                     "--batch_size", "16", "--lr", "2e-3", "--max_len", "64", *small,
                     "--save_path", str(out / "sft"), "--log_dir", str(out / "logs" / "sft"))],
        "rm": [_cli("rm", "--pretrain", str(base), "--dataset", str(data / "preference"), "--max_epochs", "2",
                    "--batch_size", "16", "--lr", "2e-3", "--max_len", "64", *small,
                    "--save_path", str(out / "rm"), "--log_dir", str(out / "logs" / "rm"))],
        # actor (2 DDP ranks), critic, reference and reward-model groups, 2 vLLM engines, async collection
        "ppo": [_cli("ppo", "--pretrain", str(base), "--rm_checkpoint_path", str(out / "rm"), *rl, *small,
                     "--num_episodes", "12", "--experience_batch_size", "16", "--train_batch_size", "8",
                     "--accumulation_steps", "2", "--num_workers", "2", "--critic_lr", "5e-3",
                     "--num_engines", "2", "--async_mode", "--max_staleness", "1", "--dual_clip", "3.0",
                     "--cpus_per_worker", "0.25", "--critic_cpus_per_worker", "0.25",
                     "--ref_cpus_per_worker", "0.25", "--reward_cpus_per_worker", "0.25", "--cpus_per_engine", "0.25",
                     "--save_interval", "6", "--save_path", str(out / "ppo"), "--log_dir", str(out / "logs" / "ppo"))],
        # a verifiable rule reward from a python file, n samples per prompt, no critic
        "grpo": [_cli("grpo", "--pretrain", str(base), "--reward_fn", f"{REWARD_FN}:number_only", *rl, *small,
                      "--num_episodes", "20", "--n_samples_per_prompt", "8", "--experience_batch_size", "4",
                      "--train_batch_size", "16", "--accumulation_steps", "2", "--colocate_all",
                      "--save_interval", "10", "--save_path", str(out / "grpo"), "--log_dir", str(out / "logs" / "grpo"))],
    }


def write_inputs(out: Path) -> None:
    from rlhf_ray.fixtures.demo_data import make_problems, number_preference_rows, prompt_rows, sft_rows, write_jsonl
    from rlhf_ray.fixtures.tiny import build_tiny_model

    problems = make_problems(1024, seed=0, max_operand=10)
    write_jsonl(sft_rows(problems[:512]), out / "raw" / "sft.jsonl")
    write_jsonl(prompt_rows(problems[512:768]), out / "raw" / "prompt.jsonl")
    # the reward model learns 'how much of the answer is a number' (chosen has more number tokens)
    write_jsonl(number_preference_rows(512, seed=1), out / "raw" / "preference.jsonl")
    build_tiny_model(out / "base", flavour="debug", seed=0)
    print(f"wrote bundled data and a 'debug' tiny Llama (0.46M parameters) under {out}", flush=True)


def reward_curve(log_dir: Path) -> tuple[float, float] | None:
    """(first, last) episode mean reward from a run's metrics.jsonl."""
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [r for r in read_jsonl_metrics(path) if r.get("reward/mean") is not None]
    return (rows[0]["reward/mean"], rows[-1]["reward/mean"]) if rows else None


def start_ray() -> dict[str, str]:
    """One local cluster for the whole demo; the jobs join it through RAY_ADDRESS."""
    import ray

    info = ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    # ray.init turns token authentication on; the jobs must use the same mode to join
    return {"RAY_ADDRESS": info.address_info["address"], "RAY_AUTH_MODE": "token"}


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
        env.update(start_ray())
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
    logs = out / "logs"
    drawn = [stage for stage in timings if (logs / stage / "plots").is_dir()]
    if drawn:
        print(f"  plots: {logs}/<{'|'.join(drawn)}>/plots/*.png; sampled responses: {logs}/<ppo|grpo>/samples.jsonl")
        print(f"  overlay runs: rlhf-ray plot {' '.join(str(logs / stage) for stage in drawn[-2:])} --out plots")
    if (out / "grpo" / "config.json").is_file():
        print(f"  talk to it: rlhf-ray chat --model {out / 'grpo'} --prompt 'What is 3 + 4?'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
