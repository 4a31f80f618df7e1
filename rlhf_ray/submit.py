"""`rlhf-ray submit [options] -- <command> [flags]`: run any rlhf-ray job on a Ray cluster through the Jobs API.

    rlhf-ray submit --address http://127.0.0.1:8265 -- sft --pretrain runs/tiny --dataset data/sft ...

The same as `ray job submit --working-dir . -- python -m rlhf_ray.cli <command> ...`, plus: the runtime_env from
launch/runtime_env.yaml (if present), log streaming, and the job's final status as the exit code (0 = SUCCEEDED).
On clusters with token authentication (Ray's default), the client needs the cluster's token (~/.ray/auth_token or
RAY_AUTH_TOKEN) and RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path

import yaml

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def build_runtime_env(working_dir: str | None, runtime_env_file: str | None) -> dict:
    env: dict = {}
    if runtime_env_file:
        path = Path(runtime_env_file)
        if not path.is_file():
            raise FileNotFoundError(f"--runtime_env {path}: file not found")
        env = yaml.safe_load(path.read_text()) or {}
    if working_dir:
        env["working_dir"] = working_dir
        env.setdefault("excludes", [".venv", ".git", "output", "runs", "wandb", "benchmarks/results"])
    return env


async def _tail(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: rlhf-ray submit [--address URL] [--working_dir DIR] [--no_wait] -- <command> [flags]",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="rlhf-ray submit")
    parser.add_argument("--address", default=os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                        help="Ray dashboard/job server address (http://host:8265)")
    parser.add_argument("--working_dir", default=".", help="directory shipped to the cluster ('' for none)")
    parser.add_argument("--runtime_env", default="launch/runtime_env.yaml" if Path("launch/runtime_env.yaml").exists()
                        else None, help="YAML runtime_env merged under the working_dir")
    parser.add_argument("--python", default="python", help="interpreter on the cluster's nodes")
    parser.add_argument("--no_wait", action="store_true", help="print the job id and return")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not args.address:
        print("rlhf-ray submit: no cluster address; pass --address http://HEAD:8265 or set RAY_JOB_ADDRESS",
              file=sys.stderr)
        return 2
    if not command:
        print("rlhf-ray submit: nothing after `--`; e.g. `-- sft --pretrain ...`", file=sys.stderr)
        return 2
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    entrypoint = shlex.join([args.python, "-m", "rlhf_ray.cli", *command])
    job_id = client.submit_job(entrypoint=entrypoint,
                               runtime_env=build_runtime_env(args.working_dir or None, args.runtime_env))
    print(f"submitted {job_id}: {entrypoint}", flush=True)
    if args.no_wait:
        return 0
    asyncio.run(_tail(client, job_id))
    status = str(client.get_job_status(job_id)).split(".")[-1]
    print(f"job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
