"""SimulatedTrainerWorker: the policy group of an RL run with --simulated_trainer_step_s S, in place of RLWorker.

It answers the calls the RL controller makes on the policy group, so that everything on the generation side
(generation, rewards, the replay buffer, the async collector, partial rollouts, weight syncs, staleness and timing)
runs for real while the training side costs a fixed, configured time:

    build(num_training_steps)          rank 0 loads the initial weights (float32, on the GPU when one is visible:
                                       where the real trainer keeps them), only to send them; other ranks hold none
    ppo_update(chunk_refs, ptx_rows, num_update_steps, seed)
                                       fetches its share of the buffer from the object store (as the real rank
                                       does), then sleeps until num_update_steps × S seconds have passed since the
                                       call began; returns one result per step in RLWorker's format, no loss terms
    send_weights(version) ...          WeightSyncSourceMixin, unchanged: each sync streams every weight to the
                                       engines, so a sync costs what a real one costs (less the gather of shards)
    save_checkpoint / save_hf          refused: the weights never change, so nothing may look like a trained model

It never computes log-probs: the controller takes the sampler's for the old and the reference log-probs (ratio 1,
KL 0) and starts no reference group (pipelines/rl/controller.py).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import torch

from rlhf_ray.buffer.replay_buffer import fetch_experience
from rlhf_ray.config.sections import ModelSection
from rlhf_ray.rollout.weight_sync import WeightSyncSourceMixin
from rlhf_ray.workers.base import RankedWorker


class SimulatedTrainerWorker(WeightSyncSourceMixin, RankedWorker):
    """One rank of a stand-in policy group whose optimizer step takes `step_s` seconds."""

    def __init__(self, rank: int, world_size: int, *, model: dict, step_s: float, **_: Any) -> None:
        super().__init__(rank, world_size)
        if step_s < 0:
            raise ValueError(f"step_s={step_s}: a simulated optimizer step takes >= 0 seconds")
        self.model_cfg = ModelSection(**model)
        self.step_s = float(step_s)
        self.model: torch.nn.Module | None = None
        torch.set_num_threads(1)             # it computes nothing; leave the CPUs to the generators

    def build(self, num_training_steps: int = 1) -> dict[str, Any]:
        """Rank 0 loads the weights it will sync; returns sizes like RLWorker.build."""
        from rlhf_ray.models.loading import count_parameters, load_causal_lm

        parameters = 0
        if self.rank == 0:
            self.model = load_causal_lm(self.model_cfg, torch.float32, for_training=False)
            if torch.cuda.is_available():
                self.model.to("cuda")
            parameters = count_parameters(self.model)[1]
        return {"rank": self.rank, "parameters": parameters, "trainable_parameters": 0,
                "threads": torch.get_num_threads(), "pid": os.getpid()}

    def weights_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        from rlhf_ray.engines.weights import iter_full_weights

        return iter_full_weights(self.model) if self.model is not None else iter(())

    def ppo_update(self, chunk_refs: list, ptx_rows: list[dict] | None, num_update_steps: int,
                   seed: int) -> list[dict[str, Any]]:
        """num_update_steps × step_s seconds in all, the fetch of the experience included. Per step: no metric sums,
        units = tokens = this rank's response tokens, time_s = the step's share of the wall time."""
        started = time.perf_counter()
        experience = fetch_experience(chunk_refs)        # the pad id of joined chunks is never read here
        tokens = float(experience.response_mask.sum())
        time.sleep(max(0.0, num_update_steps * self.step_s - (time.perf_counter() - started)))
        seconds = (time.perf_counter() - started) / num_update_steps
        return [{"sums": {}, "units": tokens, "tokens": tokens, "time_s": seconds, "grad_norm": 0.0, "lr": 0.0,
                 "skipped_steps": 0.0} for _ in range(num_update_steps)]

    def save_checkpoint(self, directory: str, client_state: dict[str, Any] | None = None) -> str:
        raise RuntimeError(f"a simulated trainer has no trained state to save (asked to write {directory})")

    def save_hf(self, directory: str) -> str:
        raise RuntimeError(f"a simulated trainer has no trained model to export (asked to write {directory})")
