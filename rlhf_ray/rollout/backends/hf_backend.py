"""The transformers backend: a transformers model behind the generator interface.

It is the reference the vLLM backend is checked against, and the fallback where vLLM is absent. It decodes with
the lean loop of hf_sampler.py (generate's semantics, less per-step overhead), and with `model.generate` when the
request has stop strings, which generate matches on the decoded text as it samples. It returns the same fields as
vLLM: sampled tokens (EOS / stop token included), text (stop string cut off), each token's log-prob ('processed':
from the scores actually sampled from, after temperature / top-k / top-p; 'raw': log_softmax of the logits), and the
finish reason. It samples with the section's settings only: the checkpoint's generation_config
(repetition_penalty, no_repeat_ngram_size, top_k ...) is never applied, so that the trainer can recompute the
sampler's log-probs (tests/test_generator_hf_settings.py).

Limits: one batch per chunk, padded on the left; sampling is reproducible only for the same chunking (torch's
generator is seeded once per chunk, from the chunk's first prompt), unlike vLLM's per-prompt seeds.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf_ray.rollout.backends.base import GenerationBackend, decode_response, register_backend
from rlhf_ray.rollout.backends.hf_sampler import DecodeSettings, decode
from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.rollout.receiver import WeightReceiver, ipc_bytes_to_tensor
from rlhf_ray.rollout.types import PromptChunk, Sample, request_seed
from rlhf_ray.rollout.weight_buckets import unpack_bucket


@register_backend("hf")
class HFBackend(GenerationBackend):
    name = "hf"

    def __init__(self, section: GeneratorSection, model_path: str, tokenizer_dir: str | None,
                 engine_seed: int, model: torch.nn.Module | None = None) -> None:
        """model: a module to generate with instead of loading one (the policy's own, when the engine lives in the
        policy's process: weight updates then need no transfer, see workers/policy_generator.py)."""
        super().__init__(section, model_path, tokenizer_dir, engine_seed)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.shared = model is not None
        if self.shared:
            self.model, self.device = model, next(model.parameters()).device
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            if self.device.type == "cpu":
                torch.set_num_threads(section.resolved_cpu_threads())
            dtype = section.dtype if section.dtype != "auto" else ("float32" if self.device.type == "cpu"
                                                                   else "bfloat16")
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
            self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        checkpoint_config = self.model.generation_config
        eos = checkpoint_config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        # Sample with the project's settings only. The lean loop reads nothing from the checkpoint's
        # generation_config; generate() (stop strings) fills every field our config leaves unset from it
        # (repetition_penalty 1.05 in Qwen2.5-Instruct, no_repeat_ngram_size, min_p ...), which the trainer's
        # log-probs never reproduce, so a bare one is swapped in for those calls: a shared module keeps its own,
        # which its export writes.
        self._bare_generation_config = GenerationConfig(bos_token_id=checkpoint_config.bos_token_id,
                                                        eos_token_id=eos)
        self.max_model_len = section.resolved_max_model_len()
        self.receiver = WeightReceiver()
        self._tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, chunk: PromptChunk) -> list[list[Sample]]:
        sampling = chunk.sampling
        n = sampling["n_samples_per_prompt"]
        width = max(map(len, chunk.prompt_ids))
        input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk.prompt_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        # as in vLLM: ignore_eos drops only the model's EOS; explicit stop_token_ids still stop
        stop_ids = ([] if sampling["ignore_eos"] else self.eos_ids) + list(sampling["stop_token_ids"])
        seed = request_seed(sampling["seed"], chunk.seed_offset, chunk.indices[0])
        if seed is not None:
            torch.manual_seed(seed)
        own_mode = self.model.training
        self.model.eval()                               # a shared policy module is in training mode between steps
        try:
            if sampling["stop"]:
                generated, token_logprobs = self._generate_with_stop_strings(input_ids, attention, stop_ids, sampling)
            else:
                settings = DecodeSettings(max_new_tokens=sampling["max_new_tokens"],
                                          temperature=sampling["temperature"], top_k=sampling["top_k"],
                                          top_p=sampling["top_p"], stop_ids=tuple(stop_ids), pad_id=self.pad_id,
                                          logprobs_mode=self.section.logprobs_mode)
                generated, token_logprobs = decode(self.model, input_ids.to(self.device),
                                                   attention.to(self.device), n, settings)
        finally:
            self.model.train(own_mode)
        token_logprobs = token_logprobs.cpu()
        generated = generated.cpu()
        results = []
        for row in range(len(chunk)):
            samples = []
            for k in range(n):
                flat = row * n + k
                samples.append(self._sample(generated[flat], token_logprobs[flat], stop_ids, sampling))
            results.append(samples)
        return results

    def _generate_with_stop_strings(self, input_ids: torch.Tensor, attention: torch.Tensor, stop_ids: list[int],
                                    sampling: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' generate, which matches stop strings on the decoded text as it samples: returns the new
        tokens (rows * n, steps) and each one's log-prob."""
        from transformers import GenerationConfig

        greedy = sampling["temperature"] == 0
        # rows repeated in place rather than num_return_sequences, which generate refuses when greedy
        n = sampling["n_samples_per_prompt"]
        input_ids, attention = input_ids.repeat_interleave(n, dim=0), attention.repeat_interleave(n, dim=0)
        # One GenerationConfig carries every setting (passing a config plus loose generation kwargs is deprecated in
        # transformers 5). Unset (None) fields fall back to transformers' defaults (the checkpoint's are swapped
        # out for the call, below), so "off" is spelled out: top_k 0, eos_token_id [] (ignore_eos).
        config = GenerationConfig(max_new_tokens=sampling["max_new_tokens"], do_sample=not greedy, use_cache=True,
                                  pad_token_id=self.pad_id, eos_token_id=stop_ids,
                                  bos_token_id=self._bare_generation_config.bos_token_id, return_dict_in_generate=True,
                                  output_scores=self.section.logprobs_mode == "processed",
                                  output_logits=self.section.logprobs_mode == "raw",
                                  temperature=1.0 if greedy else sampling["temperature"], top_p=sampling["top_p"],
                                  top_k=max(0, sampling["top_k"]),  # 0 disables; None would fall back to 50
                                  stop_strings=list(sampling["stop"]))
        own_config = self.model.generation_config
        self.model.generation_config = self._bare_generation_config
        try:
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                      generation_config=config, tokenizer=self.tokenizer)
        finally:
            self.model.generation_config = own_config
        steps = out.scores if self.section.logprobs_mode == "processed" else out.logits
        generated = out.sequences[:, input_ids.shape[1]:]                           # (batch * n, new_len)
        step_logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in steps], dim=1)
        return generated, step_logprobs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)

    def _sample(self, ids: torch.Tensor, logprobs: torch.Tensor, stop_ids: list[int], sampling: dict) -> Sample:
        ids_list = ids.tolist()
        end, reason = len(ids_list), "length"
        for pos, token in enumerate(ids_list):
            if token in stop_ids:
                end, reason = pos + 1, "stop"          # the stop token stays in the response, as in vLLM
                break
        stops = list(sampling["stop"])
        if stops and any(s in self.tokenizer.decode(ids_list[:end], skip_special_tokens=True) for s in stops):
            # a row that hit a stop string is padded afterwards: keep tokens up to the one completing the string
            end = next(k for k in range(1, end + 1)
                       if any(s in self.tokenizer.decode(ids_list[:k], skip_special_tokens=True) for s in stops))
            reason = "stop"
        ids_list = ids_list[:end]
        return Sample(ids_list, decode_response(self.tokenizer, ids_list, stops), logprobs[:end].tolist(), reason)

    # ------------------------------------------------------------ weight updates
    def _copy_in(self, named: list[tuple[str, torch.Tensor]]) -> int:
        for name, tensor in named:
            target = self._tensors.get(name)
            if target is None:
                raise KeyError(f"weight sync sent {name!r}, which this {type(self.model).__name__} does not have "
                               f"(first names: {list(self._tensors)[:4]} ...)")
            if target.shape != tensor.shape:
                raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, engine expects "
                                 f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
        return len(named)

    def begin_weight_update(self) -> None:
        pass

    def load_bucket(self, metadata: Sequence[Sequence], buffer) -> int:
        return self._copy_in(unpack_bucket(metadata, buffer))

    def join_weight_group(self, kind: str, host: str, port: int, rank_offset: int, world_size: int,
                          group_id: str, timeout_s: float) -> list[int]:
        device = self.device if kind == "nccl" else None
        return [self.receiver.join(kind, host, port, rank_offset, world_size, group_id, timeout_s, device)]

    def leave_weight_group(self) -> None:
        self.receiver.leave()

    def weight_group_id(self) -> str | None:
        return self.receiver.group_id

    def receive_bucket(self, metadata: Sequence[Sequence]) -> int:
        device = self.device if self.receiver.group is not None and self.receiver.group.kind == "nccl" else "cpu"
        return self._copy_in(self.receiver.receive(metadata, device))

    def load_ipc_bucket(self, metadata: Sequence[Sequence], handle: bytes) -> int:  # pragma: no cover - GPU
        flat = ipc_bytes_to_tensor(handle, torch.cuda.current_device())
        loaded = self._copy_in(unpack_bucket(metadata, flat))
        torch.cuda.synchronize()
        return loaded

    def finish_weight_update(self) -> int:
        return 0
