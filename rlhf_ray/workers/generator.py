"""GeneratorWorker: the Ray actor that owns one generation engine (vLLM or transformers).

It is thin on purpose: generation and weight loading live in the backend (rollout/backends/), dispatch and
retries in the driver-side GeneratorGroup (workers/generator_group.py). What the actor adds is the policy version: every
rollout is stamped with the version of the weights that produced it, and generation is refused while an update
session is open (half the layers would still be old).
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Sequence

from rlhf_ray.rollout.backends import GenerationBackend, build_backend
from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.rollout.types import PromptChunk, PromptRollout
from rlhf_ray.workers.base import RankedWorker


class GeneratorWorker(RankedWorker):
    """One engine; rank = engine index in the generator group (no torch process group among generators)."""

    def __init__(self, rank: int, world_size: int, generator: dict[str, Any], model_path: str,
                 tokenizer_dir: str | None = None,
                 build: Callable[[GeneratorSection, int], GenerationBackend] | None = None, **kwargs: Any) -> None:
        """build(section, engine_seed): the engine, when the caller makes it (the policy's own module,
        workers/policy_generator.py); default: the section's backend loading model_path."""
        super().__init__(rank, world_size, **kwargs)
        self.section = GeneratorSection.model_validate(generator)
        base_seed = self.section.seed if self.section.seed is not None else random.randrange(2**30)
        build = build or (lambda section, seed: build_backend(section.backend, section, model_path, tokenizer_dir,
                                                              engine_seed=seed))
        self.backend = build(self.section, base_seed + rank)
        self.policy_version = 0
        self._updating_to: int | None = None
        self._crash_on_next_generate = False

    # ------------------------------------------------------------ generation
    def generate(self, chunk: PromptChunk) -> list[PromptRollout]:
        if self._updating_to is not None:
            raise RuntimeError(f"generator {self.rank}: generate during a weight update to version "
                               f"{self._updating_to}; the group serialises these, so this is a caller bug")
        if self._crash_on_next_generate:
            os._exit(1)                                # fault injection, see inject_crash_on_next_generate
        per_prompt = self.backend.generate(chunk)
        return [PromptRollout(index, ids, truncated, samples, self.policy_version, self.rank)
                for index, ids, truncated, samples in zip(chunk.indices, chunk.prompt_ids, chunk.truncated,
                                                          per_prompt)]

    def decode(self, responses: Sequence[Sequence[int]]) -> list[str]:
        return self.backend.decode(responses)

    def state(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "pid": os.getpid(), "policy_version": self.policy_version,
                "updating": self._updating_to is not None, "weight_group_id": self.backend.weight_group_id(),
                "ranks_per_engine": self.backend.ranks_per_engine, "max_model_len": self.backend.max_model_len,
                "backend": self.backend.name, "node_id": ctx.get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    # ------------------------------------------------------------ weight updates (called by the trainer's sender)
    def begin_weight_update(self, version: int) -> int:
        self.backend.begin_weight_update()
        self._updating_to = version
        return self.rank

    def load_weight_bucket(self, metadata: Sequence[Sequence], buffer) -> int:
        return self.backend.load_bucket(metadata, buffer)

    def join_weight_group(self, kind: str, host: str, port: int, rank_offset: int, world_size: int,
                          group_id: str, timeout_s: float) -> list[int]:
        return self.backend.join_weight_group(kind, host, port, rank_offset, world_size, group_id, timeout_s)

    def leave_weight_group(self) -> None:
        self.backend.leave_weight_group()

    def receive_weight_bucket(self, metadata: Sequence[Sequence]) -> int:
        return self.backend.receive_bucket(metadata)

    def load_ipc_weight_bucket(self, metadata: Sequence[Sequence], handle: bytes) -> int:  # pragma: no cover
        return self.backend.load_ipc_bucket(metadata, handle)

    def adopt_policy_version(self, version: int) -> int:
        """The weights are the trainer's own tensors (a shared module): a sync only stamps the new version."""
        if not self.backend.shared:
            raise RuntimeError(f"generator {self.rank}: adopt_policy_version on an engine with its own weights; "
                               f"they must be sent (sync_weights_from)")
        self.policy_version = version
        return 0

    def finish_weight_update(self, version: int) -> int:
        if self._updating_to != version:
            raise RuntimeError(f"generator {self.rank}: finish_weight_update({version}) but the open update is "
                               f"{self._updating_to}")
        loaded = self.backend.finish_weight_update()
        self.policy_version = version
        self._updating_to = None
        return loaded

    # ------------------------------------------------------------ testing
    def inject_crash_on_next_generate(self) -> None:
        """Fault injection for tests and drills: the next generate call kills this process (os._exit), as an
        OOM kill or a node loss would, after the chunk has been handed to it."""
        self._crash_on_next_generate = True

    def shutdown(self) -> None:
        self.backend.shutdown()
