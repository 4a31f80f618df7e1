"""The reward-model source: a group of frozen value-model workers (a `rlhf-ray rm` output) scoring responses.

    group = WorkerGroup(RLWorker, spec, name="reward", worker_kwargs={..., "model_kind": "value", "frozen": True})
    source = build_reward_source("model", group=group, pad_token_id=tokenizer.pad_token_id)
    pending = source.score_async(RewardBatch(prompts, responses, sequences=rows, attention_mask=mask))
    result = pending.result()                       # rewards: the value at each row's last real token
    source.score(prompts, responses)                # texts only: tokenized here, then the same call

Given token rows (what the RL controller passes), it scores exactly the ids the generator produced (prompt +
response, the EOS included), so the reward model must share the policy's tokenizer, as in ColossalChat. The rows
are split evenly over the group's data-parallel ranks (`WorkerGroup.call_rows_async`), which run in parallel. The
pipeline registers this class as reward source "model" (`register_model_source`) when it starts a reward-model
group; the slot is reserved in `rewards/base.py` until then.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_ray.rewards.base import REWARD_SOURCES, RewardBatch, RewardResult, RewardSource, summarize_rewards


class PendingScores:
    """The reward-model workers' results for one batch, in row order; `.result()` waits for them."""

    def __init__(self, refs: list) -> None:
        self.refs = refs

    def result(self, timeout: float | None = None) -> RewardResult:
        import ray

        scores = torch.cat(ray.get(self.refs, timeout=timeout)).float().tolist()
        return RewardResult(scores, summarize_rewards(scores))


class RewardModelSource(RewardSource):
    """Scores with `group`, a WorkerGroup of frozen value-model workers that serve `compute_sequence_rewards`.

    Args:
        group: the reward-model WorkerGroup (its lifetime is the caller's).
        pad_token_id: pads the rows it tokenizes itself.
        tokenizer_dir: tokenizer for batches without token rows (`score`); not needed when rows are given.
    """

    name = "model"
    reads_tokens = True

    def __init__(self, group: Any, pad_token_id: int = 0, tokenizer_dir: str | None = None):
        self.group = group
        self.pad_token_id = int(pad_token_id)
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None

    def score_async(self, batch: RewardBatch) -> PendingScores:
        """Start scoring the `(B, L)` token rows of `batch` (tokenizing prompt + response when it has none)."""
        if batch.sequences is None:
            batch = self._tokenize(batch)
        rows = {"sequences": batch.sequences, "attention_mask": batch.attention_mask}
        return PendingScores(self.group.call_rows_async("compute_sequence_rewards", rows))

    def compute_rewards(self, prompts: list[str], responses: list[str], gt_answers: list[str | None]) -> RewardResult:
        return self.score_async(RewardBatch(prompts, responses, gt_answers)).result()

    def _tokenize(self, batch: RewardBatch) -> RewardBatch:
        """Right-padded `(B, L)` rows of prompt + response, tokenized without special tokens."""
        tokenizer = self._load_tokenizer()
        ids = [tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
               for prompt, response in zip(batch.prompts, batch.responses)]
        width = max(1, max(len(row) for row in ids))
        sequences = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(sequences)
        for index, row in enumerate(ids):
            sequences[index, :len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, :len(row)] = 1
        return RewardBatch(batch.prompts, batch.responses, batch.gt_answers, sequences, attention_mask)

    def _load_tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_dir:
                raise ValueError("reward source 'model': scoring text needs tokenizer_dir (batches that carry token "
                                 "rows do not)")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer


def register_model_source() -> None:
    """Fill the reserved registry slot "model" with RewardModelSource (idempotent)."""
    if "model" not in REWARD_SOURCES:
        REWARD_SOURCES.add("model", RewardModelSource)
