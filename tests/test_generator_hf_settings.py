"""The transformers backend samples with the project's settings only: a checkpoint's generation_config.json
(Qwen2.5-Instruct ships repetition_penalty 1.05) must not change the sampling distribution, or the sampler's
log-probs differ from what the trainer recomputes. In-process (no Ray): the backend object itself."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlhf_ray.rollout.backends.hf_backend import HFBackend
from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.rollout.types import PromptChunk
from rlhf_ray.workers.rl_objectives import compute_response_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs_despite_the_checkpoints_generation_config(
        tiny_model_dir, tmp_path, temperature):
    model_dir = tmp_path / "with-generation-config"
    shutil.copytree(tiny_model_dir, model_dir)
    config_path = model_dir / "generation_config.json"
    generation = json.loads(config_path.read_text()) if config_path.exists() else {}
    generation.update(repetition_penalty=1.05, no_repeat_ngram_size=2, top_k=5, top_p=0.8, do_sample=True)
    config_path.write_text(json.dumps(generation))

    section = GeneratorSection(backend="hf", max_prompt_len=16, max_new_tokens=12, n_samples_per_prompt=2,
                               temperature=temperature, cpu_threads=1)
    backend = HFBackend(section, str(model_dir), None, engine_seed=0)
    with torch.no_grad():                     # a random tiny model is near-uniform; sharpen it so penalties bite
        backend.model.get_output_embeddings().weight.mul_(40.0)
    prompts = [[7, 8, 7, 8, 7, 8, 9], [11, 12, 13, 11, 12, 13, 11]]         # repeats: where a penalty would bite
    chunk = PromptChunk(indices=[0, 1], prompt_ids=prompts, truncated=[False, False],
                        sampling={**section.sampling(), "ignore_eos": True})
    samples = [sample for row in backend.generate(chunk) for sample in row]

    width = max(len(p) for p in prompts)
    for index, sample in enumerate(samples):
        prompt = prompts[index // 2]
        sequences = torch.tensor([[0] * (width - len(prompt)) + prompt + sample.response_ids])
        attention = torch.tensor([[0] * (width - len(prompt)) + [1] * (len(prompt) + len(sample.response_ids))])
        trainer = compute_response_logprobs(backend.model, sequences, attention, len(sample.response_ids),
                                            temperature)[0]
        assert torch.allclose(trainer, torch.tensor(sample.logprobs), atol=1e-4), (trainer, sample.logprobs)
