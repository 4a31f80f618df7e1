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

`chunk_refs` are the object refs the replay buffer took for this rank's data-parallel group: the driver passes refs,
the tensors travel object store -> rank (fetch_experience). Ranks of one tensor-parallel group get the same refs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from rlhf_ray.buffer.experience import Experience
from rlhf_ray.buffer.replay_buffer import fetch_experience
from rlhf_ray.rollout.weight_sync import WeightSyncSourceMixin
from rlhf_ray.workers.rl_objectives import (RLLossSettings, actor_loss, apply_rollout_correction,
                                            compute_response_logprobs, compute_response_values, critic_loss, units_of)
from rlhf_ray.workers.trainer import TrainerWorker, frozen_forward

# Fields of an Experience a trainer micro-batch needs, per role.
ACTOR_FIELDS = ("sequences", "attention_mask", "response_mask", "old_logprobs", "advantages", "ref_logprobs",
                "rollout_is_weights", "rollout_logprobs")
CRITIC_FIELDS = ("sequences", "attention_mask", "response_mask", "values", "returns")


class RLWorker(TrainerWorker, WeightSyncSourceMixin):
    """One rank of an RL role. `loss` (a RLLossSettings dict) is given to the trainable roles."""

    def __init__(self, rank: int, world_size: int, *, model: dict, train: dict, parallel: dict,
                 loss: dict | None = None, model_kind: str = "causal_lm", frozen: bool = False,
                 forward_batch_size: int = 16, reference_in_process: bool = False) -> None:
        super().__init__(rank, world_size, model=model, train=train, parallel=parallel, model_kind=model_kind,
                         frozen=frozen)
        self.loss_settings = RLLossSettings(**(loss or {}))
        self.forward_batch_size = forward_batch_size
        self.reference_in_process = reference_in_process
        self.reference_model: torch.nn.Module | None = None

    def build(self, num_training_steps: int = 1) -> dict[str, Any]:
        """TrainerWorker's; with reference_in_process, also the frozen reference (the initial policy) in this
        process: what a reference group would hold, without its actors, their start-up and their transfers."""
        sizes = super().build(num_training_steps)
        if self.reference_in_process:
            self.reference_model = self._load_frozen()
        return sizes

    # ------------------------------------------------------------ weight sync (trainer -> generators)
    def weights_for_sync(self):
        return self.engine.iter_weights()

    # ------------------------------------------------------------ scoring
    def _score_in_chunks(self, batch: dict, fn: Callable, model: torch.nn.Module | None = None) -> torch.Tensor:
        """fn over micro-batches of forward_batch_size rows, with this rank's own model, or with `model` (frozen)."""
        sequences, attention_mask = batch["sequences"], batch["attention_mask"]
        outputs = []
        for start in range(0, sequences.shape[0], self.forward_batch_size):
            rows = slice(start, start + self.forward_batch_size)
            chunk = {"sequences": sequences[rows], "attention_mask": attention_mask[rows]}
            scored = self._forward(chunk, fn) if model is None else frozen_forward(model, chunk, fn)
            outputs.append(scored.float().cpu())
        return torch.cat(outputs) if outputs else torch.zeros(0)

    def compute_response_logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """batch: sequences, attention_mask (B, P + R), response_len R -> (B, R) float32 log-probs."""
        self._require_kind("causal_lm", "compute_response_logprobs")
        return self._response_logprobs(batch, temperature)

    def compute_reference_logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """compute_response_logprobs with the reference held in this process (reference_in_process)."""
        if self.reference_model is None:
            raise RuntimeError(f"rank {self.rank} holds no reference model: the driver asked for reference "
                               f"log-probs from the policy without reference_in_process (a bug)")
        return self._response_logprobs(batch, temperature, self.reference_model)

    def _response_logprobs(self, batch: dict, temperature: float, model: torch.nn.Module | None = None
                           ) -> torch.Tensor:
        response_len = int(batch["response_len"])
        share = self.loss_settings.shared_prompt_forward
        return self._score_in_chunks(batch, lambda m, b: compute_response_logprobs(
            m, b["sequences"], b["attention_mask"], response_len, temperature, share), model=model)

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

    def _require_kind(self, kind: str, method: str) -> None:
        if self.model_kind != kind:
            raise TypeError(f"{method} needs a {kind} model; this worker holds a {self.model_kind} model")

    # ------------------------------------------------------------ training
    def _micro_batches(self, experience: Experience, fields: tuple[str, ...], seed: int) -> list[dict]:
        accumulation = self.train_cfg.accumulation_steps
        expected = self.train_cfg.batch_size * accumulation
        if experience.batch_size != expected:
            raise RuntimeError(f"rank {self.rank} holds {experience.batch_size} samples but one optimizer step needs "
                               f"train_batch_size × accumulation_steps = {expected} (the buffer arithmetic is checked "
                               f"at start-up; this is a bug)")
        parts = experience.minibatches(self.train_cfg.batch_size, shuffle_seed=seed)
        batches = [{name: getattr(part, name) if hasattr(part, name) else part.extras.get(name)
                    for name in fields} for part in parts]
        return [{name: value for name, value in batch.items() if value is not None} for batch in batches]

    def _update(self, experience: Experience, fields: tuple[str, ...], loss_fn: Callable, num_update_steps: int,
                seed: int, extra_batches: list[list[dict]] | None = None) -> list[dict[str, Any]]:
        """num_update_steps optimizer steps over `experience` (reshuffled each step); returns per step what
        TrainerWorker._accumulated_step returns, `tokens` being the response tokens trained on."""
        settings = self.loss_settings

        def count_units(batch: dict) -> float:
            return units_of(batch["response_mask"], settings.loss_agg_mode)

        def summed_loss(model, batch: dict, scale: float):
            # The RL losses are micro-batch means times `rescale`; the step wants sums over the batch's units.
            units = count_units(batch)
            loss, means = loss_fn(model, batch, settings, units * scale)
            return loss, {key: value * units for key, value in means.items()}

        results = []
        for step in range(num_update_steps):
            start = time.perf_counter()
            micro_batches = self._micro_batches(experience, fields, seed * 1_000 + step)
            if extra_batches is not None:
                micro_batches = [{**batch, **extra} for batch, extra in zip(micro_batches, extra_batches[step])]
            results.append(self._accumulated_step(micro_batches, count_units, summed_loss,
                                                  lambda batch: float(batch["response_mask"].sum()), start))
        return results

    def ppo_update(self, chunk_refs: list, ptx_rows: list[dict] | None, num_update_steps: int,
                   seed: int) -> list[dict[str, Any]]:
        """The policy's update on its share of the buffer. When the experience carries no old log-probs (async
        mode), they are computed here first, with the weights as they are now (in async mode: the proximal policy
        of the decoupled objective), unless the loss takes them from its own forward pass
        (old_logprobs_from_update). The off-policy correction against the sampler's log-probs is then applied once
        to the whole share; its metrics join every step's."""
        experience = fetch_experience(chunk_refs, self.tokenizer.pad_token_id)
        if experience.old_logprobs is None and not self.loss_settings.old_logprobs_from_update:
            experience.old_logprobs = self.compute_response_logprobs(
                {"sequences": experience.sequences, "attention_mask": experience.attention_mask,
                 "response_len": experience.response_len}, self.loss_settings.temperature)
        correction = apply_rollout_correction(experience, self.loss_settings.rollout_correction)
        extra = self._ptx_batches(ptx_rows, num_update_steps) if ptx_rows else None
        results = self._update(experience, ACTOR_FIELDS, actor_loss, num_update_steps, seed, extra)
        for result in results:        # merged as sums over units, like the loss metrics
            result["sums"].update({key: value * result["units"] for key, value in correction.items()})
        return results

    def critic_update(self, chunk_refs: list, num_update_steps: int, seed: int) -> list[dict[str, Any]]:
        experience = fetch_experience(chunk_refs, self.tokenizer.pad_token_id)
        return self._update(experience, CRITIC_FIELDS, critic_loss, num_update_steps, seed)

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
