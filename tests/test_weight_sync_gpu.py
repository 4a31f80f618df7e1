"""GPU weight-sync transports (NCCL broadcast group, CUDA IPC handles). Skipped without CUDA.

Not run on this project's CPU machines: these tests are the check to run on a GPU node before trusting
weight_sync_gpu.py. They use the real transports between real processes (no mocks), without vLLM.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-only weight-sync channels)")


def _tensors(device):
    torch.manual_seed(0)
    return [("w", torch.randn(64, 32, device=device)), ("b", torch.randn(32, device=device).to(torch.bfloat16))]


def _ipc_child(handle, metadata, queue):
    from rlhf_ray.rollout.receiver import ipc_bytes_to_tensor
    from rlhf_ray.rollout.weight_buckets import unpack_bucket

    torch.cuda.set_device(0)
    flat = ipc_bytes_to_tensor(handle, 0).clone()
    queue.put([(n, t.cpu()) for n, t in unpack_bucket(metadata, flat)])


def test_cuda_ipc_bucket_roundtrip():
    from rlhf_ray.rollout.receiver import ipc_handle_to_bytes
    from rlhf_ray.rollout.weight_buckets import pack_bucket

    tensors = _tensors("cuda:0")
    metadata, flat = pack_bucket(tensors)
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=(ipc_handle_to_bytes(flat), metadata, queue))
    child.start()
    received = queue.get(timeout=120)
    child.join(timeout=60)
    assert all(torch.equal(a.cpu(), b) for (_, a), (_, b) in zip(tensors, received))


def _nccl_child(port, metadata, queue):
    from rlhf_ray.rollout.receiver import WeightReceiver

    receiver = WeightReceiver()
    receiver.join("nccl", "127.0.0.1", port, 1, 2, "gpu-unit", 120, torch.device("cuda", 1))
    queue.put([(n, t.cpu()) for n, t in receiver.receive(metadata, torch.device("cuda", 1))])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL broadcast needs two GPUs")
def test_nccl_broadcast_group_moves_a_bucket():
    from rlhf_ray.rollout.collective import join_broadcast_group
    from rlhf_ray.rollout.weight_buckets import pack_bucket
    from rlhf_ray.workers.base import free_port

    tensors = _tensors("cuda:0")
    metadata, flat = pack_bucket(tensors)
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_nccl_child, args=(port, metadata, queue))
    child.start()
    group = join_broadcast_group("nccl", "127.0.0.1", port, 0, 2, "gpu-unit", 120, torch.device("cuda", 0))
    group.broadcast(flat)
    received = queue.get(timeout=120)
    child.join(timeout=60)
    assert all(torch.equal(a.cpu(), b) for (_, a), (_, b) in zip(tensors, received))
