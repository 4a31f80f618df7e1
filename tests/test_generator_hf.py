"""The transformers ('hf') generator backend behind the same group interface, on the real local Ray cluster.

It is the reference and the fallback where vLLM is absent, so it must honour the same contract: ids with the stop
token kept, text, log-probs of the sampling distribution, finish reasons, and weight updates over both CPU
channels (its receiver runs in the actor process, not in a vLLM worker).
"""

from __future__ import annotations

import pytest

from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.workers.generator_group import GeneratorGroup
from rlhf_ray.fixtures.standin_trainer import StandInTrainerWorker
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.workers.group import WorkerGroup

pytestmark = [pytest.mark.ray]

MAX_NEW = 10


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(3, 12))] for _ in range(count)]


@pytest.fixture(scope="module")
def hf_generators(ray_cluster, tiny_model_dir):
    # one prompt per chunk: no left padding, so greedy tokens can be compared exactly with unpadded references
    section = GeneratorSection(backend="hf", num_engines=1, cpus_per_engine=0.5, max_prompt_len=16,
                               max_new_tokens=MAX_NEW, n_samples_per_prompt=2, dispatch_chunk_size=1,
                               max_inflight_per_engine=4, weight_sync_bucket_mb=0.25)
    group = GeneratorGroup(section, str(tiny_model_dir))
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def trainer(ray_cluster, tiny_model_dir):
    group = WorkerGroup(StandInTrainerWorker, GroupSpec(num_workers=1, cpus_per_worker=0.5), name="hf-standin",
                        worker_kwargs={"model_path": str(tiny_model_dir), "reinit_seed": 7})
    yield group
    group.shutdown()


def test_hf_contract_with_padding(ray_cluster, tiny_model_dir):
    from rlhf_ray.fixtures.tiny import load_tiny_tokenizer

    section = GeneratorSection(backend="hf", num_engines=1, cpus_per_engine=0.5, max_prompt_len=8,
                               max_new_tokens=MAX_NEW, n_samples_per_prompt=3, temperature=0.9, top_k=50)
    group = GeneratorGroup(section, str(tiny_model_dir), name="hf-batch")
    try:
        prompts = make_prompts(5) + [list(range(3, 15))]          # the last is 12 tokens > 8
        result = group.generate(prompts)                          # one chunk of 6 prompts, left-padded
        tokenizer = load_tiny_tokenizer()
        assert [r.prompt_index for r in result] == list(range(6)) and result[5].truncated
        for rollout in result:
            assert len(rollout.samples) == 3
            for sample in rollout.samples:
                assert len(sample.logprobs) == len(sample.response_ids) <= MAX_NEW
                assert all(lp <= 0 for lp in sample.logprobs)
                assert (sample.finish_reason == "length") == (len(sample.response_ids) == MAX_NEW)
                assert sample.text == tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        full = group.generate(prompts[:2], sampling={"ignore_eos": True, "n_samples_per_prompt": 1})
        assert all(len(r.samples[0].response_ids) == MAX_NEW and r.samples[0].finish_reason == "length" for r in full)
        greedy = group.generate(prompts[:2], sampling={"temperature": 0, "n_samples_per_prompt": 1})
        stop_id = greedy[0].samples[0].response_ids[1]
        stopped = group.generate(prompts[:2], sampling={"temperature": 0, "n_samples_per_prompt": 1,
                                                        "stop_token_ids": [stop_id]})
        assert stopped[0].samples[0].response_ids[-1] == stop_id
        assert stopped[0].samples[0].finish_reason == "stop" and len(stopped[0].samples[0].response_ids) <= 2
        # a stop string: the text stops before it, the ids keep the token that completed it
        row = next(i for i, r in enumerate(greedy) if len(r.samples[0].text) >= 8)
        text = greedy[row].samples[0].text
        cut = group.generate(prompts[:2], sampling={"temperature": 0, "n_samples_per_prompt": 1,
                                                    "stop": [text[4:7]]})[row].samples[0]
        assert cut.finish_reason == "stop" and text[4:7] not in cut.text and text.startswith(cut.text)
        assert cut.response_ids == greedy[row].samples[0].response_ids[:len(cut.response_ids)]
        # greedy with n > 1, on both paths (transformers' generate refuses num_return_sequences > 1 when greedy)
        for extra in ({}, {"stop": [text[4:7]]}):
            twice = group.generate(prompts[:2], sampling={"temperature": 0, "n_samples_per_prompt": 2, **extra})
            assert all(len(r.samples) == 2 and r.samples[0].response_ids == r.samples[1].response_ids for r in twice)
    finally:
        group.shutdown()


@pytest.mark.parametrize("channel, version", [("object_store", 1), ("gloo", 2)])
def test_hf_weight_sync_matches_trainer(hf_generators, trainer, channel, version):
    prompts = make_prompts(4, seed=version)
    stats = hf_generators.sync_weights_from(trainer, version=version, channel=channel)
    assert stats["weight_sync/buckets"] > 1
    greedy = hf_generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
    assert greedy.policy_versions == {version}
    responses = [r.samples[0].response_ids for r in greedy]
    assert responses == trainer.call_rank(0, "greedy_generate", prompts, MAX_NEW)
    recomputed = trainer.call_rank(0, "compute_logprobs", prompts, responses)
    for rollout, reference in zip(greedy, recomputed):
        assert max(abs(a - b) for a, b in zip(rollout.samples[0].logprobs, reference)) < 1e-4
    sampled = hf_generators.generate(prompts, sampling={"temperature": 0.7})
    flat = [(r.prompt_ids, s.response_ids, s.logprobs) for r in sampled for s in r.samples]
    recomputed = trainer.call_rank(0, "compute_logprobs", [f[0] for f in flat], [f[1] for f in flat], 0.7)
    for (_, _, got), reference in zip(flat, recomputed):
        assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-4


def test_load_weights_from_the_driver(hf_generators, tiny_model_dir):
    """GeneratorGroup.load_weights: weights held by the driver (e.g. a checkpoint) go out over the object store."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir), dtype=torch.float32).eval()
    stats = hf_generators.load_weights(iter(model.state_dict().items()), version=10)
    assert stats["weight_sync/tensors"] == len(model.state_dict())
    prompts = make_prompts(3, seed=10)
    greedy = hf_generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
    assert greedy.policy_versions == {10}
    for rollout, ids in zip(greedy, prompts):
        expected = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
        assert rollout.samples[0].response_ids == expected[0, len(ids):].tolist()


def test_an_engine_lost_between_generate_and_sync_is_left_out_of_the_sync(ray_cluster, tiny_model_dir, trainer):
    """The race a lost host can hit: an engine dies after the batch it generated came back and before the weight
    sync asks it for its state. The sync goes to the live engine, the lost one is probed (no restarts: dead), and
    generation goes on without it."""
    import ray

    section = GeneratorSection(backend="hf", num_engines=2, cpus_per_engine=0.25, max_prompt_len=16,
                               max_new_tokens=4, n_samples_per_prompt=1, weight_sync_bucket_mb=0.25)
    group = GeneratorGroup(section, str(tiny_model_dir), name="hf-lost-before-sync")
    try:
        first = group.generate(make_prompts(4, seed=3))
        assert {r.engine_rank for r in first} == {0, 1}
        ray.kill(group.workers.actor(1), no_restart=True)
        stats = group.sync_weights_from(trainer, version=5, channel="object_store")
        assert stats["weight_sync/engines"] == 1.0
        group.wait_until_settled(timeout_s=60)
        assert [e["status"] for e in group.engine_states()] == ["ready", "dead"]
        after = group.generate(make_prompts(4, seed=4))
        assert after.policy_versions == {5} and {r.engine_rank for r in after} == {0}
    finally:
        group.shutdown()
