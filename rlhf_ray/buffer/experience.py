"""Experience: the per-sample tensors that one rollout step produces and the trainers consume.

Layout of one sample (the vocabulary used across rlhf-ray):

    sequences       (batch, prompt_len + response_len)  prompt ids (left-padded) then response ids (right-padded);
                                                        the last `response_len` columns are the response span
    attention_mask  (batch, prompt_len + response_len)  1 on real tokens of prompt and response
    response_mask   (batch, response_len)               1 on tokens the policy generated (and is trained on)
    old_logprobs    (batch, response_len)               log-probs of the policy that generated (for the ratio)
    rollout_logprobs(batch, response_len)               the sampler's own log-probs (vLLM), when kept
    ref_logprobs    (batch, response_len)               reference-model log-probs (KL)
    values          (batch, response_len)               critic values when the experience was scored
    rewards         (batch, response_len)               token-level rewards (score on the last token - KL penalty)
    scores          (batch,)                            one reward per response (reward model / rule)
    advantages      (batch, response_len)
    returns         (batch, response_len)               critic targets
    policy_version  (batch,) int64                      which policy weights generated each sample
    group_ids       (batch,) int64                      responses to the same prompt share an id
    extras          name -> (batch, ...)                anything else per sample (e.g. sample ids for tracing)

Only sequences, attention_mask and response_mask are required. No Ray here: this is a plain container with
split / concat / select helpers; the replay buffer (replay_buffer.py) moves it through the object store.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from rlhf_ray.utils import split_evenly

RESPONSE_FIELDS = ("response_mask", "old_logprobs", "rollout_logprobs", "ref_logprobs", "values", "rewards",
                   "advantages", "returns")
SEQUENCE_FIELDS = ("sequences", "attention_mask")
PER_SAMPLE_FIELDS = ("scores", "policy_version", "group_ids")


@dataclass
class Experience:
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    policy_version: torch.Tensor | int | None = None
    group_ids: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        batch = self.sequences.shape[0]
        if isinstance(self.policy_version, int):
            self.policy_version = torch.full((batch,), self.policy_version, dtype=torch.int64)
        if self.sequences.dim() != 2 or self.attention_mask.shape != self.sequences.shape:
            raise ValueError(f"sequences {tuple(self.sequences.shape)} and attention_mask "
                             f"{tuple(self.attention_mask.shape)} must share one (batch, seq_len) shape")
        response_shape = tuple(self.response_mask.shape)
        if len(response_shape) != 2 or response_shape[0] != batch or response_shape[1] > self.sequences.shape[1]:
            raise ValueError(f"response_mask {response_shape} must be (batch={batch}, response_len <= "
                             f"{self.sequences.shape[1]})")
        for name in RESPONSE_FIELDS[1:]:
            tensor = getattr(self, name)
            if tensor is not None and tuple(tensor.shape) != response_shape:
                raise ValueError(f"Experience.{name} has shape {tuple(tensor.shape)}, expected {response_shape} "
                                 f"like response_mask")
        for name in PER_SAMPLE_FIELDS:
            tensor = getattr(self, name)
            if tensor is not None and tuple(tensor.shape) != (batch,):
                raise ValueError(f"Experience.{name} has shape {tuple(tensor.shape)}, expected ({batch},)")
        for name, tensor in self.extras.items():
            if tensor.dim() == 0 or tensor.shape[0] != batch:
                raise ValueError(f"Experience.extras[{name!r}] has shape {tuple(tensor.shape)}; its first "
                                 f"dimension must be the batch ({batch})")

    # --- views -----------------------------------------------------------------------------------------------
    @property
    def input_ids(self) -> torch.Tensor:
        """Alias of `sequences` (the name the model call uses)."""
        return self.sequences

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    @property
    def prompt_len(self) -> int:
        return self.sequences.shape[1] - self.response_len

    def __len__(self) -> int:
        return self.batch_size

    def oldest_version(self) -> int | None:
        """The smallest policy version among the samples (None when unversioned or empty)."""
        if self.policy_version is None or self.batch_size == 0:
            return None
        return int(self.policy_version.min())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every present tensor field (extras under `extras/<name>`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name != "extras" and getattr(self, f.name) is not None}
        out.update({f"extras/{name}": tensor for name, tensor in self.extras.items()})
        return out

    # --- reshaping -------------------------------------------------------------------------------------------
    def _map(self, fn) -> "Experience":
        updates = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                   if f.name != "extras" and getattr(self, f.name) is not None}
        return replace(self, **updates, extras={k: fn(v) for k, v in self.extras.items()})

    def select(self, indices: torch.Tensor | Sequence[int] | slice) -> "Experience":
        """The samples at `indices` (a slice, or a list/tensor of row indices)."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long)
        return self._map(lambda tensor: tensor[indices])

    def to(self, device: torch.device | str) -> "Experience":
        return self._map(lambda tensor: tensor.to(device))

    def split(self, num_chunks: int) -> list["Experience"]:
        """`num_chunks` contiguous chunks whose sizes differ by at most one (the first ones are larger)."""
        return self.split_sizes([len(part) for part in split_evenly(range(self.batch_size), num_chunks)])

    def split_sizes(self, sizes: Sequence[int]) -> list["Experience"]:
        """Contiguous chunks of the given sizes (which must add up to the batch size; zeros are allowed)."""
        if sum(sizes) != self.batch_size or any(size < 0 for size in sizes):
            raise ValueError(f"chunk sizes {list(sizes)} must be >= 0 and add up to the batch size "
                             f"{self.batch_size}")
        chunks, start = [], 0
        for size in sizes:
            chunks.append(self.select(slice(start, start + size)))
            start += size
        return chunks

    def minibatches(self, size: int, shuffle_seed: int | None = None) -> list["Experience"]:
        """Chunks of `size` samples (the last may be smaller), in order, or shuffled with `shuffle_seed`."""
        if size < 1:
            raise ValueError(f"mini-batch size must be >= 1 (got {size})")
        if shuffle_seed is None:
            return [self.select(slice(start, start + size)) for start in range(0, self.batch_size, size)]
        order = torch.randperm(self.batch_size, generator=torch.Generator().manual_seed(shuffle_seed))
        return [self.select(order[start:start + size]) for start in range(0, self.batch_size, size)]

    @staticmethod
    def concat(chunks: Iterable["Experience"], pad_token_id: int = 0) -> "Experience":
        """Stack chunks along the batch, padding to the widest prompt and response.

        Prompt columns are padded on the left, response columns on the right, so the "last response_len columns
        are the response" layout holds. Sequences pad with `pad_token_id`; masks and float tensors with 0.
        """
        chunks = list(chunks)
        if not chunks:
            raise ValueError("Experience.concat needs at least one chunk")
        prompt_len = max(chunk.prompt_len for chunk in chunks)
        response_len = max(chunk.response_len for chunk in chunks)
        present = {name: getattr(chunks[0], name) is not None for name in _tensor_field_names()}
        for chunk in chunks[1:]:
            mismatch = [name for name in present if present[name] != (getattr(chunk, name) is not None)]
            if mismatch or set(chunk.extras) != set(chunks[0].extras):
                raise ValueError(f"cannot concat experiences with different fields: {mismatch or 'extras'} "
                                 f"present in some chunks only")

        merged = {}
        for name in _tensor_field_names():
            if not present[name]:
                continue
            parts = [getattr(chunk, name) for chunk in chunks]
            if name in SEQUENCE_FIELDS:
                pad = pad_token_id if name == "sequences" else 0
                parts = [_pad_sequence(part, chunk.prompt_len, prompt_len, response_len, pad)
                         for part, chunk in zip(parts, chunks)]
            elif name in RESPONSE_FIELDS:
                parts = [_pad_right(part, response_len, 0) for part in parts]
            merged[name] = torch.cat(parts, dim=0)
        extras = {}
        for name in chunks[0].extras:
            parts = [chunk.extras[name] for chunk in chunks]
            if parts[0].dim() == 2:
                width = max(part.shape[1] for part in parts)
                parts = [_pad_right(part, width, 0) for part in parts]
            extras[name] = torch.cat(parts, dim=0)
        return Experience(**merged, extras=extras)


def _tensor_field_names() -> list[str]:
    return [f.name for f in fields(Experience) if f.name != "extras"]


def _pad_right(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    missing = width - tensor.shape[1]
    return tensor if missing == 0 else F.pad(tensor, (0, missing), value=value)


def _pad_sequence(tensor: torch.Tensor, own_prompt_len: int, prompt_len: int, response_len: int,
                  value) -> torch.Tensor:
    """Left-pad the prompt part to `prompt_len` and right-pad the response part to `response_len`."""
    own_response_len = tensor.shape[1] - own_prompt_len
    return F.pad(tensor, (prompt_len - own_prompt_len, response_len - own_response_len), value=value)
