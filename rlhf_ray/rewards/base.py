"""One interface for every reward source, and the registry that names them.

    source = build_reward_source("gsm8k")                       # or "arithmetic", "rule", "remote", "model"
    result = source.score(prompts, responses, gt_answers)       # one float per response
    result.rewards -> [1.0, 0.0, ...];  result.metrics -> {"reward/mean": 0.5, "reward/accuracy": 0.5, ...}
    pending = source.score_async(RewardBatch(prompts, responses, gt_answers, sequences, attention_mask))
    result = pending.result()                                   # what the RL controller does, whatever the source

A source scores a batch of (prompt text, response text, ground-truth answer or None); the reward-model source
reads the batch's token rows instead. `score_async` starts scoring and returns at once, so the controller can run
the reference and critic calls meanwhile: text sources score in a thread, the reward-model source on its Ray
actors. Sources are picklable so the controller can hand them to Ray actors. The reward-model source needs the
trainer engines and is registered by the pipeline under the reserved name "model".
"""

from __future__ import annotations

import inspect
import math
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlhf_ray.algorithms.registry import Registry


@dataclass
class RewardResult:
    """One reward per response, and `reward/...` metrics for the batch."""

    rewards: list[float]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RewardBatch:
    """A batch to score: texts (every source reads them) and, for a source with `reads_tokens`, token rows. The
    caller calls every source the same way; it only fills the token rows when the source will read them.

    sequences, attention_mask: `(B, L)` token rows as the reward model should read them, or None (the reward-model
    source then tokenizes prompt + response itself).
    """

    prompts: list[str]
    responses: list[str]
    gt_answers: list[str | None] | None = None
    sequences: Any = None
    attention_mask: Any = None


class RewardSource(ABC):
    """Scores responses. Subclasses implement `compute_rewards`; `score` validates and adds summary metrics."""

    name: str = "reward"
    reads_tokens: bool = False      # True: scores RewardBatch.sequences, so the caller should fill them

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              gt_answers: Sequence[str | None] | None = None) -> RewardResult:
        if len(prompts) != len(responses):
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {len(responses)} responses")
        if gt_answers is None:
            gt_answers = [None] * len(responses)
        if len(gt_answers) != len(responses):
            raise ValueError(f"{self.name}: got {len(gt_answers)} gt_answers for {len(responses)} responses")
        result = self.compute_rewards(list(prompts), list(responses), list(gt_answers))
        if len(result.rewards) != len(responses):
            raise ValueError(f"{self.name}: produced {len(result.rewards)} rewards for {len(responses)} responses")
        result.metrics = {**summarize_rewards(result.rewards), **result.metrics}
        return result

    @abstractmethod
    def compute_rewards(self, prompts: list[str], responses: list[str],
                        gt_answers: list[str | None]) -> RewardResult:
        """Rewards for equally long lists (validated by `score`)."""

    def score_async(self, batch: RewardBatch) -> "Future[RewardResult]":
        """Start scoring `batch`; `.result()` waits for the RewardResult (and re-raises a scoring error). Text
        sources score `batch.prompts/responses/gt_answers` in a thread of their own."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(self.score(batch.prompts, batch.responses, batch.gt_answers))
            except BaseException as error:  # noqa: BLE001 - handed to whoever calls result()
                future.set_exception(error)

        threading.Thread(target=run, name=f"reward-{self.name}", daemon=True).start()
        return future

    def close(self) -> None:
        """Release resources (connections, actors). Default: nothing to release."""


def summarize_rewards(rewards: Sequence[float]) -> dict[str, float]:
    """`reward/mean`, `reward/std` (population), `reward/min`, `reward/max` of a batch (zeros when empty)."""
    if not rewards:
        return {"reward/mean": 0.0, "reward/std": 0.0, "reward/min": 0.0, "reward/max": 0.0}
    mean = sum(rewards) / len(rewards)
    return {"reward/mean": mean, "reward/std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)),
            "reward/min": min(rewards), "reward/max": max(rewards)}


def as_reward(value: Any, where: str) -> float:
    """A finite float from a number or bool; a clear TypeError/ValueError otherwise. `where` names the origin."""
    number = None
    if isinstance(value, (bool, int, float)):
        number = float(value)
    elif callable(getattr(value, "item", None)):  # numpy / torch scalars
        try:
            number = float(value.item())
        except (TypeError, ValueError, RuntimeError):
            number = None
    if number is None:
        raise TypeError(f"{where} returned {value!r} ({type(value).__name__}); expected a number (int, float or "
                        f"bool)")
    if not math.isfinite(number):
        raise ValueError(f"{where} returned {number}; rewards must be finite numbers")
    return number


REWARD_SOURCES: Registry[type[RewardSource]] = Registry("reward source", setting="reward_source")
REWARD_SOURCES.reserve("model", "the reward-model source is registered by the PPO pipeline once the reward-model "
                                "group exists; import rlhf_ray.pipelines first, or use gsm8k / arithmetic / rule / "
                                "remote")


def build_reward_source(kind: str, **options: Any) -> RewardSource:
    """Instantiate the registered source `kind` with its options (see each class for them)."""
    factory = REWARD_SOURCES.get(kind)
    signature = inspect.signature(factory)
    try:
        signature.bind(**options)
    except TypeError as error:
        accepted = [name for name in signature.parameters if name != "self"]
        raise TypeError(f"reward_source={kind!r}: options {sorted(options)} do not fit ({error}); it accepts "
                        f"{accepted}") from None
    return factory(**options)
