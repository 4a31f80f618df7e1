"""The reward-model source: a group of frozen value-model workers (a `rlhf-ray rm` output) scoring responses.

    group = WorkerGroup(RLWorker, spec, name="reward", worker_kwargs={..., "model_kind": "value", "frozen": True})
    source = build_reward_source("model", group=group, pad_token_id=tokenizer.pad_token_id)
    refs = source.score_tokens_async(sequences, attention_mask)    # token path: what the PPO controller uses
    scores = source.collect(refs)                                  # (B,) tensor, the value at each last real token
    source.score(prompts, responses)                               # text path (RewardSource interface)

The token path scores exactly the ids the generator produced (prompt + response, the EOS included), so the reward
model must share the policy's tokenizer, as in ColossalChat. The batch is split evenly over the group's workers,
which run in parallel. The pipeline registers this class as reward source "model" (`register_model_source`) when
it starts a reward-model group; the slot is reserved in `rewards/base.py` until then.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_ray.rewards.base import REWARD_SOURCES, RewardResult, RewardSource, summarize_rewards


class RewardModelSource(RewardSource):
    """Scores with `group`, a WorkerGroup of frozen value-model workers that serve `compute_sequence_rewards`.

    Args:
        group: the reward-model WorkerGroup (its lifetime is the caller's).
        pad_token_id: pads token batches on the text path.
        tokenizer_dir: tokenizer for the text path (`score`); not needed on the token path.
    """

    name = "model"

    def __init__(self, group: Any, pad_token_id: int = 0, tokenizer_dir: str | None = None):
        self.group = group
        self.pad_token_id = int(pad_token_id)
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None

    # ------------------------------------------------------------ token path
    def score_tokens_async(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> list:
        """Start scoring `(B, L)` token rows; returns one object ref per worker (rows split evenly, in order)."""
        from rlhf_ray.utils import split_evenly

        rows = list(range(sequences.shape[0]))
        shards = [{"sequences": sequences[ix], "attention_mask": attention_mask[ix]} if ix else None
                  for ix in split_evenly(rows, self.group.world_size)]
        return [worker.compute_sequence_rewards.remote(shard)
                for worker, shard in zip(self.group.workers, shards) if shard is not None]

    @staticmethod
    def collect(refs: list) -> torch.Tensor:
        """Wait for `score_tokens_async` and return the `(B,)` float32 scores in row order."""
        import ray

        return torch.cat(ray.get(refs)).float()

    def score_tokens(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> RewardResult:
        scores = self.collect(self.score_tokens_async(sequences, attention_mask)).tolist()
        return RewardResult(scores, summarize_rewards(scores))

    # ------------------------------------------------------------ text path
    def compute_rewards(self, prompts: list[str], responses: list[str], gt_answers: list[str | None]) -> RewardResult:
        tokenizer = self._load_tokenizer()
        ids = [tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
               for prompt, response in zip(prompts, responses)]
        width = max(1, max(len(row) for row in ids))
        sequences = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(sequences)
        for index, row in enumerate(ids):
            sequences[index, :len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, :len(row)] = 1
        return self.score_tokens(sequences, attention_mask)

    def _load_tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_dir:
                raise ValueError("reward source 'model': scoring text needs tokenizer_dir (the token path, "
                                 "score_tokens, does not)")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer


def register_model_source() -> None:
    """Fill the reserved registry slot "model" with RewardModelSource (idempotent)."""
    if "model" not in REWARD_SOURCES:
        REWARD_SOURCES.add("model", RewardModelSource)
