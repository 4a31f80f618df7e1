"""GPU weight-sync channels: NCCL broadcast across GPUs, CUDA IPC handles when colocated on one GPU.

UNTESTED HERE: this project's CI and development machines have no GPU. The code follows the same interface and
session protocol as the CPU channels that the tests exercise (weight_sync.py); only the transport differs. Check
it on a GPU node with `pytest tests/test_weight_sync_gpu.py` (skipped without CUDA) before relying on it.

- NcclBroadcastChannel: a stand-alone ProcessGroupNCCL (collective.py, kind 'nccl') of trainer rank 0 plus every
  tensor-parallel rank of every engine; buckets are packed on rank 0's GPU and broadcast into a GPU buffer in
  each vLLM worker.
- CudaIpcChannel: trainer rank 0 and the engines share one physical GPU. Each bucket is packed on that GPU and a
  CUDA IPC handle (bytes) goes through Ray; the engine maps it, copies, and acks, and only then is the bucket
  freed. One bucket in flight. With several engines on several GPUs each colocated with a different trainer rank,
  use nccl (a per-GPU IPC fan-out from every trainer rank is not implemented).
"""

from __future__ import annotations

import ray
import torch

from rlhf_ray.rollout.receiver import ipc_handle_to_bytes
from rlhf_ray.rollout.weight_sync import BroadcastChannel, WeightChannel


class NcclBroadcastChannel(BroadcastChannel):  # pragma: no cover - needs GPUs
    kind = "nccl"

    def __init__(self) -> None:
        super().__init__()
        if not torch.cuda.is_available():
            raise RuntimeError("weight_sync_channel nccl needs a GPU on trainer rank 0; use object_store or gloo")
        self.device = torch.device("cuda", torch.cuda.current_device())

    def _device_for_group(self) -> torch.device | None:
        return self.device


class CudaIpcChannel(WeightChannel):  # pragma: no cover - needs a GPU
    kind = "cuda_ipc"

    def __init__(self) -> None:
        super().__init__()
        if not torch.cuda.is_available():
            raise RuntimeError("weight_sync_channel cuda_ipc needs a GPU shared by trainer rank 0 and the engines")
        self.device = torch.device("cuda", torch.cuda.current_device())

    def send_bucket(self, metadata: list[list], flat: torch.Tensor) -> list[ray.ObjectRef]:
        torch.cuda.synchronize(self.device)           # the packing copies must land before another process reads
        handle = ipc_handle_to_bytes(flat)
        acks = [receiver.load_ipc_weight_bucket.remote(metadata, handle) for receiver in self.receivers]
        # Receivers copied out: flat may be freed by the caller. A receiver that died or hangs raises
        # TimeoutError here instead of holding the trainer (and its GPU buffer) forever.
        self.wait(acks, "a CUDA IPC bucket")
        return acks
