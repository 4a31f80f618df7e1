"""The generation-backend interface and its registry ('vllm', 'hf').

A backend owns one inference engine inside one generator actor. It generates completions for a PromptChunk and
receives weights in update sessions (begin, buckets, finish) over whichever channel the trainer uses:

    backend = build_backend("vllm", section, model_path)
    per_prompt = backend.generate(chunk)                 # list (one per prompt) of lists (n samples) of Sample
    backend.begin_weight_update()
    backend.load_bucket(meta, flat)                      # object store: the bucket came with the call
    backend.receive_bucket(meta)                         # gloo / NCCL: the bucket arrives by broadcast
    backend.finish_weight_update()                       # + prefix cache reset
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.rollout.types import PromptChunk, Sample

_BACKENDS: dict[str, type["GenerationBackend"]] = {}


def register_backend(name: str) -> Callable[[type], type]:
    """Class decorator: make a backend selectable as GeneratorSection.backend == name."""

    def decorate(cls: type) -> type:
        if name in _BACKENDS:
            raise ValueError(f"generation backend {name!r} is already registered ({_BACKENDS[name].__qualname__})")
        _BACKENDS[name] = cls
        return cls

    return decorate


def backend_names() -> list[str]:
    _import_builtin_backends()
    return sorted(_BACKENDS)


def build_backend(name: str, section: GeneratorSection, model_path: str, tokenizer_dir: str | None = None,
                  engine_seed: int = 0) -> "GenerationBackend":
    _import_builtin_backends()
    if name not in _BACKENDS:
        raise ValueError(f"unknown generation backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name](section, model_path, tokenizer_dir, engine_seed)


def decode_response(tokenizer, response_ids: Sequence[int], stop: Sequence[str]) -> str:
    """The response text, the same way in every backend: a full decode of the ids without special tokens, cut
    before the first stop string. (vLLM's own incremental text can differ from a full decode when a byte-level
    token sequence is not valid UTF-8 at the prompt/response seam.)"""
    text = tokenizer.decode(list(response_ids), skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def _import_builtin_backends() -> None:
    # The modules register themselves; their heavy imports (vllm, transformers) happen only when built.
    from rlhf_ray.rollout.backends import hf_backend, vllm_backend  # noqa: F401


class GenerationBackend(ABC):
    """One engine. Not thread-safe: the owning actor runs one call at a time."""

    name: str = ""
    #: True when it generates with a trainer's own module (its weights arrive without a transfer)
    shared: bool = False
    #: longest prompt + response the engine accepts
    max_model_len: int

    def __init__(self, section: GeneratorSection, model_path: str, tokenizer_dir: str | None,
                 engine_seed: int) -> None:
        self.section = section
        self.model_path = model_path
        self.tokenizer_dir = tokenizer_dir or model_path
        self.engine_seed = engine_seed

    @abstractmethod
    def generate(self, chunk: PromptChunk) -> list[list[Sample]]:
        """One list of n_samples_per_prompt Samples per prompt of the chunk, in chunk order."""

    def decode(self, responses: Sequence[Sequence[int]]) -> list[str]:
        """Response texts of token ids, as generate() writes them (partial rollouts decode joined segments once).
        Backends set self.tokenizer."""
        return [decode_response(self.tokenizer, ids, ()) for ids in responses]

    # ------------------------------------------------------------ weight updates (receiver side)
    @abstractmethod
    def begin_weight_update(self) -> None: ...

    @abstractmethod
    def load_bucket(self, metadata: Sequence[Sequence], buffer) -> int:
        """Load one packed bucket that travelled with the call; returns the number of tensors."""

    @abstractmethod
    def join_weight_group(self, kind: str, host: str, port: int, rank_offset: int, world_size: int,
                          group_id: str, timeout_s: float) -> list[int]:
        """Join the trainer's broadcast group; returns the ranks this engine's processes took."""

    @abstractmethod
    def leave_weight_group(self) -> None: ...

    @abstractmethod
    def weight_group_id(self) -> str | None: ...

    @abstractmethod
    def receive_bucket(self, metadata: Sequence[Sequence]) -> int:
        """Receive one bucket by broadcast from rank 0 and load it; returns the number of tensors."""

    def load_ipc_bucket(self, metadata: Sequence[Sequence], handle: bytes) -> int:  # pragma: no cover - GPU
        raise NotImplementedError(f"the {self.name} backend has no CUDA IPC receiver; use weight_sync_channel "
                                  f"nccl or object_store")

    @abstractmethod
    def finish_weight_update(self) -> int:
        """Complete the session (and drop caches built from the old weights); returns tensors loaded."""

    @property
    def ranks_per_engine(self) -> int:
        """Processes that receive weights (tensor-parallel ranks)."""
        return 1

    def shutdown(self) -> None:
        pass
