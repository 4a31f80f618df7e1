"""What a supervised trainer optimises: collate rows, run the forward pass, return a loss and metric sums.

An objective is the job-specific part of a TrainerWorker (the engine does not know SFT from DPO):

    batch = objective.collate(rows)                      # prepared arrow rows -> padded tensors
    units = objective.count_units(batch)                 # tokens (SFT) or pairs (RM, DPO) in this micro-batch
    loss, sums = objective.loss(model, batch, scale)     # sums: metric totals over the units, detached floats

Exact means under data parallelism and accumulation: `loss` returns sum_over_units(l) * scale, with
scale = dp_size * accumulation_steps / units_in_the_global_step. The engine divides by accumulation_steps and
DDP averages over dp ranks, so the gradient is that of the mean over every unit of the global step, however the
units are spread over ranks and micro-batches (an SFT token mean is not the mean of per-rank means). Metric sums
come back to the driver, which divides by the total units.

Causal-LM shift: logits at position t predict token t + 1, so masks and labels are read from position 1 on.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_ray.algorithms.logprobs import compute_token_logprobs
from rlhf_ray.algorithms.masking import masked_sum
from rlhf_ray.algorithms.preference import (PREFERENCE_LOSSES, REWARD_MODEL_LOSSES, PreferenceLossParams,
                                            compute_sequence_logprobs)
from rlhf_ray.data.collators import IGNORE_INDEX, PreferenceCollator, SFTCollator
from rlhf_ray.models.inputs import on_model_device, position_ids_for
from rlhf_ray.models.value_head import last_token_values


def causal_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) -> logits (batch, seq, vocab) of an HF causal LM (possibly DDP/FSDP-wrapped), left or right
    padded."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask),
                 use_cache=False).logits


def shifted_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t < seq-1: shape (batch, seq - 1), float32."""
    logits = causal_logits(model, input_ids, attention_mask)
    return compute_token_logprobs(logits[:, :-1], input_ids[:, 1:])


def truncate_preference_rows(rows: Sequence[dict], max_len: int | None) -> list[dict]:
    """Cut both sides of each pair to max_len tokens (their loss masks with them)."""
    if not max_len:
        return list(rows)
    keys = ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask")
    return [{**row, **{key: list(row[key])[:max_len] for key in keys}} for row in rows]


class SFTObjective:
    """Token-mean cross-entropy on the assistant tokens (labels != -100). Units: label tokens.

    Metric sums: `loss_sum` (summed token NLL; the driver divides by the tokens).
    """

    unit = "tokens"

    def __init__(self, pad_token_id: int, max_len: int | None = None):
        self.collator = SFTCollator(pad_token_id, max_length=max_len)

    def collate(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        return self.collator(rows)

    @staticmethod
    def _targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        return labels.masked_fill(~mask, 0), mask

    def count_units(self, batch: dict[str, torch.Tensor]) -> float:
        return float(self._targets(batch)[1].sum())

    def loss(self, model, batch, scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        labels, mask = self._targets(batch)
        logits = causal_logits(model, batch["input_ids"], batch["attention_mask"])
        nll = -compute_token_logprobs(logits[:, :-1], labels)                  # (batch, seq - 1)
        total = masked_sum(nll, mask)
        return total * scale, {"loss_sum": total.item()}


class RewardObjective:
    """Pairwise reward-model loss on the value at each response's last token. Units: pairs.

    Chosen and rejected go through one forward pass (concatenated on the batch axis; the collator pads both to one
    length). Metric sums: `loss_sum`, `rm/acc`, `rm/reward_chosen`, `rm/reward_rejected`, `rm/margin`.
    """

    unit = "pairs"

    def __init__(self, pad_token_id: int, max_len: int | None = None, loss_fn: str = "log_sig"):
        self.collator = PreferenceCollator(pad_token_id)
        self.max_len = max_len
        self.loss_fn = REWARD_MODEL_LOSSES.get(loss_fn)

    def collate(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        return self.collator(truncate_preference_rows(rows, self.max_len))

    def count_units(self, batch) -> float:
        return float(batch["chosen_input_ids"].shape[0])

    def rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen_rewards, rejected_rewards), each (batch,)."""
        n = batch["chosen_input_ids"].shape[0]
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        values = model(input_ids=input_ids, attention_mask=attention_mask)             # (2 * batch, seq)
        rewards = last_token_values(values, attention_mask)
        return rewards[:n], rewards[n:]

    def loss(self, model, batch, scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.rewards(model, batch)
        mean_loss, metrics = self.loss_fn(chosen, rejected)
        n = chosen.shape[0]
        sums = {"loss_sum": metrics.pop("loss/rm") * n, **{k: v * n for k, v in metrics.items()}}
        return mean_loss * n * scale, sums


class PreferenceObjective:
    """DPO / IPO / SimPO on sequence log-probs of the response tokens (loss mask). Units: pairs.

    Reference log-probs come either from a frozen model held by the same worker (`reference_model`), or
    precomputed by a reference group and attached to the batch as `ref_chosen_logps` / `ref_rejected_logps`
    (batch,), or not at all (SimPO; or reference-free DPO where the reference log-ratio is taken as 0).
    Metric sums: `loss_sum`, `dpo/reward_chosen`, `dpo/reward_rejected`, `dpo/reward_margin`, `dpo/acc`,
    `dpo/logps_chosen`, `dpo/logps_rejected`.
    """

    unit = "pairs"

    def __init__(self, pad_token_id: int, max_len: int | None = None, loss_type: str = "dpo", beta: float = 0.1,
                 gamma: float = 0.0, label_smoothing: float = 0.0, length_normalization: bool = False,
                 use_reference: bool = True):
        self.collator = PreferenceCollator(pad_token_id)
        self.max_len = max_len
        self.loss_type = loss_type
        self.loss_fn = PREFERENCE_LOSSES.get(loss_type)
        self.params = PreferenceLossParams(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        self.length_normalization = length_normalization
        self.use_reference = use_reference
        self.reference_model: torch.nn.Module | None = None

    def collate(self, rows: Sequence[dict]) -> dict[str, Any]:
        batch = self.collator(truncate_preference_rows(rows, self.max_len))
        if rows and "ref_chosen_logps" in rows[0]:
            batch["ref_chosen_logps"] = torch.tensor([float(r["ref_chosen_logps"]) for r in rows])
            batch["ref_rejected_logps"] = torch.tensor([float(r["ref_rejected_logps"]) for r in rows])
        return batch

    def count_units(self, batch) -> float:
        return float(batch["chosen_input_ids"].shape[0])

    def sequence_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen_logps, rejected_logps), each (batch,): summed (or length-normalised) response log-probs."""
        n = batch["chosen_input_ids"].shape[0]
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        loss_mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])[:, 1:]
        token_logps = shifted_token_logprobs(model, input_ids, attention_mask)      # (2 * batch, seq - 1)
        logps = compute_sequence_logprobs(token_logps, loss_mask, self.length_normalization)
        return logps[:n], logps[n:]

    @torch.no_grad()
    def attach_reference(self, batch) -> dict[str, Any]:
        """Add ref_chosen_logps / ref_rejected_logps from the colocated frozen model (no-op otherwise)."""
        if self.use_reference and self.reference_model is not None and "ref_chosen_logps" not in batch:
            # the batch comes from the collator, on the CPU; the reference sits on the rank's device
            ref_chosen, ref_rejected = self.sequence_logps(self.reference_model,
                                                           on_model_device(self.reference_model, batch))
            home = batch["chosen_input_ids"].device
            batch = {**batch, "ref_chosen_logps": ref_chosen.float().to(home),
                     "ref_rejected_logps": ref_rejected.float().to(home)}
        return batch

    def _reference(self, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.loss_type == "simpo":
            return None, None
        if not self.use_reference:
            # Reference-free DPO (the seed's --disable_reference_model): log pi_ref taken as 0.
            zeros = torch.zeros(batch["chosen_input_ids"].shape[0])
            return zeros, zeros
        if "ref_chosen_logps" not in batch:
            raise RuntimeError("preference batch has no reference log-probs: neither a colocated reference model "
                               "nor a reference group provided them")
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]

    def loss(self, model, batch, scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        ref_chosen, ref_rejected = self._reference(batch)
        chosen, rejected = self.sequence_logps(model, batch)
        mean_loss, metrics = self.loss_fn(chosen, rejected, ref_chosen, ref_rejected, params=self.params)
        n = chosen.shape[0]
        sums = {"loss_sum": metrics.pop("loss/preference") * n, **{k: v * n for k, v in metrics.items()}}
        return mean_loss * n * scale, sums


OBJECTIVES = {"sft": SFTObjective, "rm": RewardObjective, "dpo": PreferenceObjective}


def build_objective(spec: dict[str, Any], pad_token_id: int):
    """spec = {"kind": "sft" | "rm" | "dpo", **that objective's keyword arguments}."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind not in OBJECTIVES:
        raise ValueError(f"objective kind {kind!r} is unknown; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind](pad_token_id, **spec)
