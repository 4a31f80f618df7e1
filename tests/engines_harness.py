"""Shared pieces of the engine tests: building engines on a tiny Llama, fixed data, the training loop, and the
Ray worker that runs the same loop on each rank of a WorkerGroup (tests/ is on the workers' PYTHONPATH).

Data layout: data[step, micro] is the *global* micro-batch (global_batch rows, no padding); data-parallel rank r of
dp takes rows chunk(dp)[r], TP ranks of one group take the same rows. Every row has the same number of tokens, so
the mean of the ranks' token-mean losses equals the single-process token-mean loss of the whole micro-batch —
which is what makes 2-rank and 1-process trajectories comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
from rlhf_ray.engines.registry import build_engine
from rlhf_ray.models.loading import load_causal_lm, load_value_model
from rlhf_ray.models.value_head import last_token_values
from rlhf_ray.workers.base import RankedWorker

STEPS = 5
ACCUMULATION = 2
GLOBAL_BATCH = 4
SEQ_LEN = 16


def make_data(steps: int = STEPS, accumulation: int = ACCUMULATION, seed: int = 0) -> torch.Tensor:
    """(steps, accumulation, GLOBAL_BATCH, SEQ_LEN) token ids below the tiny vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (steps, accumulation, GLOBAL_BATCH, SEQ_LEN), generator=generator)


def lm_loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, {}


def value_loss(model, batch):
    """Regress the last-token value of each row to +1 / -1 (even / odd rows of the global batch)."""
    input_ids = batch["input_ids"]
    mask = torch.ones_like(input_ids)
    values = last_token_values(model(input_ids, attention_mask=mask), mask)
    return ((values - batch["targets"]) ** 2).mean(), {"value_mean": values.mean().detach()}


def make_engine(model_dir: str | Path, plugin: str = "ddp", *, world: int = 1, tp: int = 1, precision: str = "fp32",
                accumulation: int = ACCUMULATION, lora_rank: int = 0, value: bool = False, merge_lora: bool = True,
                total_steps: int = 10, grad_clip: float = 1.0, grad_checkpoint: bool = False, meta_init: bool = True):
    model_cfg = ModelSection(pretrain=str(model_dir), lora_rank=lora_rank, lora_alpha=8,
                             merge_lora_weights=merge_lora, grad_checkpoint=grad_checkpoint)
    train = TrainSection(lr=2e-3, accumulation_steps=accumulation, warmup_steps=2, mixed_precision=precision,
                         weight_decay=0.1, grad_clip=grad_clip, seed=7)
    parallel = ParallelSection(plugin=plugin, num_workers=world, tp=tp, meta_init=meta_init)
    if value:
        factory = lambda: load_value_model(model_cfg, seed=train.seed)  # noqa: E731
    else:
        factory = lambda: load_causal_lm(model_cfg)  # noqa: E731
    return build_engine(parallel, train, factory, total_steps, model_cfg=model_cfg)


def run_steps(engine, data: torch.Tensor, steps, *, dp_rank: int = 0, dp: int = 1, value: bool = False,
              reduce=None) -> list[float]:
    """Train on data[step] for each step; return each step's loss (mean over micro-batches and ranks)."""
    losses = []
    engine.train()
    for step in steps:
        micro_losses = []
        for micro in range(data.shape[1]):
            rows = data[step, micro]
            batch: dict[str, Any] = {"input_ids": rows.chunk(dp)[dp_rank]}
            if value:
                targets = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(rows.shape[0])])
                batch["targets"] = targets.chunk(dp)[dp_rank]
            micro_losses.append(engine.forward_backward(batch, value_loss if value else lm_loss)["loss"])
        assert engine.is_accumulation_boundary()
        engine.optimizer_step()
        loss = sum(micro_losses) / len(micro_losses)
        losses.append(reduce({"loss": loss})["loss"] if reduce else loss)
    return losses


def random_draws() -> list[float]:
    import random

    import numpy as np

    return torch.rand(2).tolist() + np.random.rand(2).tolist() + [random.random()]


class EngineWorker(RankedWorker):
    """One rank: builds an engine on request and runs the shared loop on its data shard."""

    def build(self, model_dir: str, plugin: str, **kwargs) -> str:
        self.value = kwargs.get("value", False)
        self.engine = make_engine(model_dir, plugin, world=self.world_size, **kwargs)
        return type(self.engine).__name__

    def build_error(self, model_dir: str, plugin: str, **kwargs) -> str:
        try:
            make_engine(model_dir, plugin, world=self.world_size, **kwargs)
        except (ValueError, RuntimeError) as exc:
            return str(exc)
        return ""

    def train_steps(self, data: torch.Tensor, start: int, stop: int) -> list[float]:
        tp = self.engine.tp
        dp = self.world_size // tp
        return run_steps(self.engine, data, range(start, stop), dp_rank=self.rank // tp, dp=dp, value=self.value,
                         reduce=self.engine.reduce_metrics)

    def save(self, path: str, client_state: dict) -> None:
        self.engine.save_checkpoint(path, client_state)

    def load(self, path: str) -> dict:
        return self.engine.load_checkpoint(path)

    def draws(self) -> list[float]:
        return random_draws()

    def full_weights(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self.engine.iter_weights()}

    def save_hf(self, path: str) -> None:
        self.engine.save_hf(path)
