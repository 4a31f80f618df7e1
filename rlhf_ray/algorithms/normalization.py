"""Running reward normalisation (`--reward_normalization`): scores are standardised with the mean and standard
deviation of every score seen so far in the run, so that the reward scale a policy-gradient step sees stays about 1
whatever the reward function's range (as OpenRLHF's `--normalize_reward` does with its reward model's statistics).

    moments = RunningMoments()
    scores = moments.update_and_normalize(scores)       # (B,) -> (B,): (s - mean) / (std + eps), after the update

The statistics combine batches exactly (Chan et al.'s parallel update of count, mean and the sum of squared
deviations), so the running values equal those of all scores concatenated (population variance).
"""

from __future__ import annotations

import torch


class RunningMoments:
    """Count, mean and sum of squared deviations of all values seen; float64 internally."""

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count else 1.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        if values.numel() == 0:
            return
        n, mean = values.numel(), values.mean().item()
        m2 = ((values - mean) ** 2).sum().item()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return ((values.double() - self.mean) / (self.std + self.eps)).to(values.dtype)

    def update_and_normalize(self, values: torch.Tensor) -> torch.Tensor:
        self.update(values)
        return self.normalize(values)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
