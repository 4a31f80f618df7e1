"""`rlhf-ray <command> [flags]`: one entry point, one module per job.

Each command lives in its own module exposing `main(argv) -> int`; it is imported only when asked for, so
`rlhf-ray prepare` never pays for importing vLLM or Ray.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("rlhf_ray.pipelines.prepare", "tokenize conversations into arrow shards (sft, preference, prompt, ptx)"),
    "sft": ("rlhf_ray.pipelines.sft", "supervised fine-tuning on prepared sft data"),
    "rm": ("rlhf_ray.pipelines.rm", "train a reward model on prepared preference data"),
    "dpo": ("rlhf_ray.pipelines.dpo", "direct preference optimisation (DPO, IPO, SimPO)"),
    "ppo": ("rlhf_ray.pipelines.ppo", "PPO with actor, critic, reward and reference groups and vLLM rollouts"),
    "grpo": ("rlhf_ray.pipelines.grpo", "GRPO / RLOO / REINFORCE++ with verifiable rewards, no critic"),
    "chat": ("rlhf_ray.pipelines.chat", "talk to a checkpoint through its chat template (one-shot or interactive)"),
    "plot": ("rlhf_ray.telemetry.plots", "draw the curves of one or more runs (their --log_dir) into PNGs"),
    "bench": ("rlhf_ray.benchmarks.run_all", "benchmarks vs baselines; `bench rollout|sync|rl_loop --model DIR` on yours"),
    "submit": ("rlhf_ray.submit", "submit any of these to a Ray cluster (ray job submit), stream logs, exit with its status"),
    "cluster": ("rlhf_ray.hostfile_cluster", "up --hostfile FILE: Ray on the hosts of a hostfile; down: stop it"),
    "demo": ("rlhf_ray.demo", "the embedded end-to-end demo (what `make demo` runs)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhf-ray <command> [flags]   (rlhf-ray <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    as_program, argv = argv is None, list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlhf-ray: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    status = int(module.main(rest) or 0)
    if as_program:
        # The process ends next. Its final garbage collections would walk every object of torch, transformers and
        # Ray (~2 s on 2 cores); frozen objects are skipped, and nothing the job wrote depends on them.
        import gc

        gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(main())
