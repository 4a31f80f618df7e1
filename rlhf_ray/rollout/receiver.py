"""Receiver-side helpers shared by both backends: join the broadcast group, receive one bucket, rebuild an IPC bucket.

The vLLM backend runs these inside vLLM's worker process(es) (through the worker extension); the transformers
backend runs them in the generator actor itself. Either way a bucket arrives as (metadata rows, flat uint8 buffer)
and leaves as a list of (hf_name, tensor view) ready for a loader.
"""

from __future__ import annotations

import pickle
from typing import Sequence

import torch

from rlhf_ray.rollout.collective import BroadcastGroup, join_broadcast_group
from rlhf_ray.rollout.weight_buckets import bucket_nbytes, unpack_bucket


class WeightReceiver:
    """One receiving process's membership in the weight-sync broadcast group (at most one at a time)."""

    def __init__(self) -> None:
        self.group: BroadcastGroup | None = None

    @property
    def group_id(self) -> str | None:
        return self.group.group_id if self.group is not None else None

    def join(self, kind: str, host: str, port: int, rank: int, world_size: int, group_id: str,
             timeout_s: float, device: torch.device | None = None) -> int:
        self.leave()
        self.group = join_broadcast_group(kind, host, port, rank, world_size, group_id, timeout_s, device)
        return rank

    def leave(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def receive(self, metadata: Sequence[Sequence],
                device: torch.device | str = "cpu") -> list[tuple[str, torch.Tensor]]:
        """Block in the broadcast for one bucket; return views into a freshly allocated buffer."""
        if self.group is None:
            raise RuntimeError("receive_weight_bucket before join_weight_group: this engine is not in the weight-sync "
                               "group (it may have restarted); reconnect the trainer to the generator group")
        flat = torch.empty(bucket_nbytes(metadata), dtype=torch.uint8, device=device)
        self.group.broadcast(flat, src=0)
        return unpack_bucket(metadata, flat)


def ipc_handle_to_bytes(flat: torch.Tensor) -> bytes:  # pragma: no cover - needs a GPU
    """Sender side of the CUDA IPC channel: a picklable handle to `flat`'s GPU memory (no copy).

    The bytes are produced by our own trainer process and consumed by our own generator process; they never come
    from a file or a user.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    return pickle.dumps(reduce_tensor(flat))


def ipc_bytes_to_tensor(handle: bytes, device_index: int) -> torch.Tensor:  # pragma: no cover - needs a GPU
    """Receiver side: map the sender's GPU buffer into this process on `device_index` (same physical GPU).

    torch's rebuild arguments carry the sender's device index; processes that see the GPU under another index
    (different CUDA_VISIBLE_DEVICES) must substitute their own, which is argument 6 of rebuild_cuda_tensor.
    """
    rebuild, args = pickle.loads(handle)  # noqa: S301 - bytes from our own trainer actor, see ipc_handle_to_bytes
    args = list(args)
    args[6] = device_index
    return rebuild(*args)
