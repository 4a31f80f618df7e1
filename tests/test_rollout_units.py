"""Rollout pieces that need neither Ray nor vLLM: config rules, prompt limits, seeds, dispatch decisions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf_ray.config.base import ConfigError
from rlhf_ray.rollout.config import GeneratorSection, sampling_overrides
from rlhf_ray.rollout.dispatch import DEAD, READY, STALE, EngineLoad, chunk_size_for, pick_engine, split_into_chunks
from rlhf_ray.rollout.types import PromptRollout, RolloutResult, Sample, apply_prompt_limit, request_seed


def test_left_truncation_keeps_the_end_and_flags_it():
    kept, flags = apply_prompt_limit([[1, 2, 3, 4, 5], [6, 7]], max_prompt_len=3, policy="left")
    assert kept == [[3, 4, 5], [6, 7]] and flags == [True, False]


def test_refuse_names_the_prompt_and_the_fix():
    with pytest.raises(ValueError, match=r"prompt 1 has 4 tokens > max_prompt_len \(3\).*prompt_truncation left"):
        apply_prompt_limit([[1], [1, 2, 3, 4]], max_prompt_len=3, policy="refuse")
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        apply_prompt_limit([[]], max_prompt_len=3, policy="left")


def test_section_refuses_lengths_that_do_not_fit():
    with pytest.raises(ValueError, match=r"max_prompt_len \(100\) \+ max_new_tokens \(50\) = 150 exceeds "
                                         r"max_model_len \(128\)"):
        GeneratorSection(max_prompt_len=100, max_new_tokens=50, max_model_len=128)
    assert GeneratorSection(max_prompt_len=100, max_new_tokens=50).resolved_max_model_len() == 150
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs backend vllm"):
        GeneratorSection(backend="hf", tensor_parallel_size=2)


def test_sampling_overrides_are_validated_like_the_section():
    section = GeneratorSection(temperature=1.0, n_samples_per_prompt=4)
    merged = section.sampling({"temperature": 0, "n_samples_per_prompt": 1})
    assert merged["temperature"] == 0 and merged["n_samples_per_prompt"] == 1 and merged["top_p"] == 1.0
    with pytest.raises(ConfigError, match="unknown field.*'temprature'"):
        sampling_overrides(section, {"temprature": 0})
    with pytest.raises(ConfigError, match="top_p"):
        sampling_overrides(section, {"top_p": 1.5})


def test_request_seed_depends_on_prompt_not_engine():
    seeds = {request_seed(0, offset, index) for offset in range(3) for index in range(50)}
    assert len(seeds) == 150                                # distinct per (call, prompt)
    assert request_seed(0, 1, 7) == request_seed(0, 1, 7)
    assert request_seed(None, 1, 7) is None


def test_chunks_cover_every_prompt_once():
    for n in range(0, 13):
        for size in (1, 2, 5):
            chunks = split_into_chunks(list(range(n)), size)
            assert sum(chunks, []) == list(range(n)) and all(1 <= len(c) <= size for c in chunks)
    assert chunk_size_for(10, 3, 0) == 4 and chunk_size_for(10, 3, 2) == 2 and chunk_size_for(0, 2, 0) == 1


def test_pick_engine_is_least_loaded_ready_with_room():
    engines = [EngineLoad(0, inflight_chunks=1, inflight_prompts=8), EngineLoad(1, inflight_chunks=1,
                                                                                inflight_prompts=3),
               EngineLoad(2, status=STALE), EngineLoad(3, status=DEAD)]
    assert pick_engine(engines, max_inflight=2).rank == 1
    engines[1].inflight_chunks = 2
    assert pick_engine(engines, max_inflight=2).rank == 0
    engines[0].inflight_chunks = 2
    assert pick_engine(engines, max_inflight=2) is None     # stale and dead engines never get work
    engines[2].status = READY
    assert pick_engine(engines, max_inflight=2).rank == 2


def test_rollout_metrics():
    rollouts = [PromptRollout(0, [1], False, [Sample([5, 6], "ab", [-1.0, -2.0], "stop")], 3, 0),
                PromptRollout(1, [2], True, [Sample([5, 6, 7, 8], "abcd", [-1.0] * 4, "length")], 3, 1)]
    metrics = RolloutResult(rollouts, retried_chunks=1, generate_seconds=2.0).metrics()
    assert metrics["rollout/response_len_mean"] == 3 and metrics["rollout/finish_stop_frac"] == 0.5
    assert metrics["rollout/prompts_truncated"] == 1 and metrics["perf/rollout_tokens_per_s"] == 3.0


def test_importing_rollout_config_loads_no_engine():
    code = ("import sys, rlhf_ray.rollout, rlhf_ray.rollout.config, rlhf_ray.rollout.types, "
            "rlhf_ray.rollout.dispatch; print('vllm' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
