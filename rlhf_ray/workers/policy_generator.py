"""PolicyGeneratorWorker: a policy rank that is also the generation engine (--generator_in_policy).

For a model small enough that one process does everything (the demo's), a generator actor of its own costs more than
it gives: its start-up (a second torch and transformers import, a second model load), its memory, and a weight
transfer every episode. Here the transformers backend generates with the policy's own module, so a weight sync only
stamps the new policy version. Generation and training take turns (sync mode), as colocated roles do anyway.

The engine side is a GeneratorWorker object living in this process; the driver's GeneratorGroup reaches it through
the methods below (Ray calls only methods defined on the actor's class).
"""

from __future__ import annotations

from typing import Any, Sequence

from rlhf_ray.rollout.backends.hf_backend import HFBackend
from rlhf_ray.rollout.types import PromptChunk, PromptRollout
from rlhf_ray.workers.generator import GeneratorWorker
from rlhf_ray.workers.rl_actor import RLWorker


class PolicyGeneratorWorker(RLWorker):
    """RLWorker(**kwargs) plus one engine over its own module; `generator` is the GeneratorSection dict."""

    def __init__(self, rank: int, world_size: int, *, generator: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(rank, world_size, **kwargs)
        self.generator_section = generator
        self.generation: GeneratorWorker | None = None

    def build(self, num_training_steps: int = 1) -> dict[str, Any]:
        sizes = super().build(num_training_steps)
        module = self.engine.unwrap()
        self.generation = GeneratorWorker(
            self.rank, self.world_size, generator=self.generator_section, model_path=self.model_cfg.pretrain,
            build=lambda section, seed: HFBackend(section, self.model_cfg.pretrain,
                                                  self.model_cfg.resolved_tokenizer_dir(), seed, model=module))
        return sizes

    # ------------------------------------------------------------ the engine's calls (GeneratorGroup)
    def generate(self, chunk: PromptChunk) -> list[PromptRollout]:
        return self.generation.generate(chunk)

    def decode(self, responses: Sequence[Sequence[int]]) -> list[str]:
        return self.generation.decode(responses)

    def state(self) -> dict[str, Any]:
        return self.generation.state()

    def adopt_policy_version(self, version: int) -> int:
        return self.generation.adopt_policy_version(version)

    def inject_crash_on_next_generate(self) -> None:
        self.generation.inject_crash_on_next_generate()
