"""RLWorker: a trainer rank for the RL roles — policy and critic (trainable), reference and reward model (frozen).

It is a TrainerWorker (one engine, or a frozen model; checkpoints; HF export) that also serves weight sync to the
generators and the RL calls:

    scoring (no grad, micro-batches of forward_batch_size rows)
        compute_response_logprobs(batch, temperature) -> (B, R)    policy old log-probs, reference log-probs
        compute_response_values(batch)               -> (B, R)    critic
        compute_sequence_rewards(batch)              -> (B,)      reward model: value at the last real token
    training (one optimizer step per update step over this rank's share of the buffer)
        ppo_update(chunk_refs, ptx_rows, num_update_steps, seed)     policy
        critic_update(chunk_refs, num_update_steps, seed)            critic

`chunk_refs` are the object refs the replay-buffer shard of this rank's data-parallel group held: the driver passes
refs, the tensors travel object store -> rank. Ranks of one tensor-parallel group get the same refs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

import torch

from rlhf_ray.buffer.experience import Experience
from rlhf_ray.rollout.weight_sync import WeightSyncSourceMixin
from rlhf_ray.workers.rl_objectives import (RLLossSettings, actor_loss, compute_response_logprobs,
                                            compute_response_values, critic_loss, units_of)
from rlhf_ray.workers.trainer import TrainerWorker

# Fields of an Experience a trainer micro-batch needs, per role.
ACTOR_FIELDS = ("sequences", "attention_mask", "response_mask", "old_logprobs", "advantages", "ref_logprobs")
CRITIC_FIELDS = ("sequences", "attention_mask", "response_mask", "values", "returns")


class RLWorker(TrainerWorker, WeightSyncSourceMixin):
    """One rank of an RL role. `loss` (a RLLossSettings dict) is given to the trainable roles."""

    def __init__(self, rank: int, world_size: int, *, model: dict, train: dict, parallel: dict,
                 loss: dict | None = None, model_kind: str = "causal_lm", frozen: bool = False,
                 forward_batch_size: int = 16) -> None:
        super().__init__(rank, world_size, model=model, train=train, parallel=parallel, model_kind=model_kind,
                         frozen=frozen)
        self.loss_settings = RLLossSettings(**(loss or {}))
        self.forward_batch_size = forward_batch_size

    # ------------------------------------------------------------ weight sync (trainer -> generators)
    def weights_for_sync(self):
        return self.engine.iter_weights()

    # ------------------------------------------------------------ scoring
    def _score_in_chunks(self, batch: dict, fn: Callable) -> torch.Tensor:
        sequences, attention_mask = batch["sequences"], batch["attention_mask"]
        outputs = []
        for start in range(0, sequences.shape[0], self.forward_batch_size):
            rows = slice(start, start + self.forward_batch_size)
            chunk = {"sequences": sequences[rows], "attention_mask": attention_mask[rows]}
            outputs.append(self._forward(chunk, fn).float().cpu())
        return torch.cat(outputs) if outputs else torch.zeros(0)

    def compute_response_logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """batch: sequences, attention_mask (B, P + R), response_len R -> (B, R) float32 log-probs."""
        self._require_kind("causal_lm", "compute_response_logprobs")
        response_len = int(batch["response_len"])
        return self._score_in_chunks(batch, lambda m, b: compute_response_logprobs(
            m, b["sequences"], b["attention_mask"], response_len, temperature))

    def compute_response_values(self, batch: dict) -> torch.Tensor:
        """batch: sequences, attention_mask (B, P + R), response_len R -> (B, R) float32 critic values."""
        self._require_kind("value", "compute_response_values")
        response_len = int(batch["response_len"])
        return self._score_in_chunks(batch, lambda m, b: compute_response_values(
            m, b["sequences"], b["attention_mask"], response_len))

    def compute_sequence_rewards(self, batch: dict) -> torch.Tensor:
        """batch: sequences, attention_mask (B, L) -> (B,) reward = the value at each row's last real token."""
        from rlhf_ray.models.value_head import last_token_values
        from rlhf_ray.workers.rl_objectives import position_ids_for

        self._require_kind("value", "compute_sequence_rewards")
        return self._score_in_chunks(batch, lambda m, b: last_token_values(
            m(input_ids=b["sequences"], attention_mask=b["attention_mask"],
              position_ids=position_ids_for(b["attention_mask"])), b["attention_mask"]))

    # ------------------------------------------------------------ training
    def _fetch(self, chunk_refs: list) -> Experience:
        import ray

        chunks = ray.get([wrapped[0] for wrapped in chunk_refs])
        if not chunks:
            raise RuntimeError(f"rank {self.rank}: no experience to train on (the buffer shard was empty)")
        return chunks[0] if len(chunks) == 1 else Experience.concat(chunks, self.tokenizer.pad_token_id)

    def _global_sum(self, local: float) -> float:
        """Sum over the data-parallel ranks (tensor-parallel ranks share a shard, so the world sum / tp)."""
        import torch.distributed as dist

        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        total = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(total)
        return total.item() / self.parallel_cfg.tp

    def _micro_batches(self, experience: Experience, fields: tuple[str, ...], seed: int) -> list[dict]:
        accumulation = self.train_cfg.accumulation_steps
        expected = self.train_cfg.batch_size * accumulation
        if experience.batch_size != expected:
            raise RuntimeError(f"rank {self.rank} holds {experience.batch_size} samples but one optimizer step needs "
                               f"train_batch_size × accumulation_steps = {expected} (the buffer arithmetic is checked "
                               f"at start-up; this is a bug)")
        parts = experience.minibatches(self.train_cfg.batch_size, shuffle_seed=seed)
        return [{name: getattr(part, name) for name in fields if getattr(part, name) is not None} for part in parts]

    def _update(self, experience: Experience, fields: tuple[str, ...], loss_fn: Callable, num_update_steps: int,
                seed: int, extra_batches: list[list[dict]] | None = None) -> list[dict[str, Any]]:
        """num_update_steps optimizer steps over `experience`; returns per-step {sums, units, grad_norm, lr}."""
        settings = self.loss_settings
        dp_accumulation = self.parallel_cfg.dp * self.train_cfg.accumulation_steps
        results = []
        for step in range(num_update_steps):
            start = time.perf_counter()
            micro_batches = self._micro_batches(experience, fields, seed * 1_000 + step)
            local = [units_of(mb["response_mask"], settings.loss_agg_mode) for mb in micro_batches]
            tokens = float(sum(mb["response_mask"].sum().item() for mb in micro_batches))
            global_units = self._global_sum(sum(local))
            sums: dict[str, float] = defaultdict(float)
            self.engine.train()
            for index, (mb, units) in enumerate(zip(micro_batches, local)):
                if extra_batches is not None:
                    mb = {**mb, **extra_batches[step][index]}
                rescale = units * dp_accumulation / max(global_units, 1e-12)
                metrics = self.engine.forward_backward(mb, lambda model, b: loss_fn(model, b, settings, rescale))
                for key, value in metrics.items():
                    if key != "loss":
                        sums[key] += float(value) * units
            optim = self.engine.optimizer_step()
            results.append({"sums": dict(sums), "units": float(sum(local)), "tokens": tokens,
                            "time_s": time.perf_counter() - start, **{k: float(v) for k, v in optim.items()}})
        return results

    def ppo_update(self, chunk_refs: list, ptx_rows: list[dict] | None, num_update_steps: int,
                   seed: int) -> list[dict[str, Any]]:
        """The policy's update on its share of the buffer. When the experience carries no old log-probs (async
        mode, or they were left to the trainer), they are computed here first, with the weights as they are now."""
        experience = self._fetch(chunk_refs)
        if experience.old_logprobs is None:
            experience.old_logprobs = self.compute_response_logprobs(
                {"sequences": experience.sequences, "attention_mask": experience.attention_mask,
                 "response_len": experience.response_len}, self.loss_settings.temperature)
        extra = self._ptx_batches(ptx_rows, num_update_steps) if ptx_rows else None
        return self._update(experience, ACTOR_FIELDS, actor_loss, num_update_steps, seed, extra)

    def critic_update(self, chunk_refs: list, num_update_steps: int, seed: int) -> list[dict[str, Any]]:
        return self._update(self._fetch(chunk_refs), CRITIC_FIELDS, critic_loss, num_update_steps, seed)

    def _ptx_batches(self, rows: list[dict], num_update_steps: int) -> list[list[dict]]:
        """ptx rows -> per update step, per micro-batch: ptx_input_ids / ptx_attention_mask / ptx_labels."""
        from rlhf_ray.data.collators import SFTCollator

        accumulation = self.train_cfg.accumulation_steps
        per_micro = len(rows) // (num_update_steps * accumulation)
        if per_micro < 1:
            raise ValueError(f"got {len(rows)} ptx rows for {num_update_steps} update steps × {accumulation} "
                             f"micro-batches")
        collate = SFTCollator(self.tokenizer.pad_token_id)
        out = []
        for step in range(num_update_steps):
            per_step = []
            for micro in range(accumulation):
                start = (step * accumulation + micro) * per_micro
                batch = collate(rows[start:start + per_micro])
                per_step.append({"ptx_input_ids": batch["input_ids"], "ptx_attention_mask": batch["attention_mask"],
                                 "ptx_labels": batch["labels"]})
            out.append(per_step)
        return out
