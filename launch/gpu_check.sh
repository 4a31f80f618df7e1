#!/usr/bin/env bash
# The GPU check (rlhf_ray/benchmarks/gpu_check.py): NCCL collectives, ddp/fsdp/tp engines on 1 and 2 GPUs, bf16 vs
# fp32, ColossalAI zero2/gemini when installed, frozen models on the GPU. Needs torch + transformers only (no Ray, no vLLM); run from the repo
# root on a GPU machine. Prints one table; exits 1 when a row failed. Extra arguments go to the module.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then PYTHON=python; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec timeout "${GPU_CHECK_TIMEOUT_S:-3000}" "$PYTHON" -m rlhf_ray.benchmarks.gpu_check "$@"
