"""StandInTrainerWorker: a stand-in for the real trainer worker, for weight-sync tests and benchmarks.

It holds a plain transformers model (no optimizer, no parallel engine) and serves exactly what a trainer must for
weight sync (WeightSyncSourceMixin.weights_for_sync), plus the transformers references the tests compare the
generators against: greedy generation and log-probs of given responses. The real trainer worker
(workers/trainer.py) mixes in the same WeightSyncSourceMixin and returns `self.engine.iter_weights()`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from rlhf_ray.rollout.weight_sync import WeightSyncSourceMixin
from rlhf_ray.workers.base import RankedWorker


class StandInTrainerWorker(WeightSyncSourceMixin, RankedWorker):
    """A 'trainer' whose weights are the model at model_path, or (reinit_seed) a fresh random init of its config."""

    def __init__(self, rank: int, world_size: int, model_path: str, reinit_seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(rank, world_size, **kwargs)
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(1)
        if reinit_seed is None:
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        else:
            torch.manual_seed(reinit_seed)
            config = AutoConfig.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            self.model.generation_config = self.model.generation_config.from_pretrained(model_path)
        self.model.eval()

    def weights_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.model.state_dict().items():
            yield name, tensor

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    @torch.no_grad()
    def greedy_generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """transformers greedy decoding, one prompt at a time (no padding, so no padding-induced drift)."""
        out = []
        for ids in prompts:
            input_ids = torch.tensor([list(ids)])
            sequences = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                            max_new_tokens=max_new_tokens, pad_token_id=0)
            out.append(sequences[0, input_ids.shape[1]:].tolist())
        return out

    @torch.no_grad()
    def compute_logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                         temperature: float = 1.0) -> list[list[float]]:
        """log p(response token | prefix) under softmax(logits / temperature), per response token."""
        from rlhf_ray.algorithms.logprobs import compute_token_logprobs

        out = []
        for prompt, response in zip(prompts, responses):
            ids = torch.tensor([list(prompt) + list(response)])
            logits = self.model(ids).logits                                   # (1, seq, vocab)
            start = len(prompt) - 1                                           # logits at t predict token t + 1
            span = logits[:, start:start + len(response)]                     # (1, response_len, vocab)
            out.append(compute_token_logprobs(span, ids[:, len(prompt):], temperature)[0].tolist())
        return out
