"""GPU weight-sync transports (CUDA IPC handles, NCCL broadcast group). Skipped without CUDA.

Not run on this project's CPU machines: these tests are the check to run on a GPU node before trusting
weight_sync_gpu.py. They use the real transports between real processes (no mocks), without vLLM. The peer is a
plain subprocess that exchanges files with the test (no multiprocessing fd passing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-only weight-sync channels)")
REPO = Path(__file__).resolve().parent.parent


def _tensors(device):
    torch.manual_seed(0)
    return [("w", torch.randn(64, 32, device=device)), ("b", torch.randn(32, device=device).to(torch.bfloat16))]


_IPC_CHILD = """
import json, sys, torch
from rlhf_ray.rollout.receiver import ipc_bytes_to_tensor
from rlhf_ray.rollout.weight_buckets import unpack_bucket
handle_path, metadata, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
torch.cuda.set_device(0)
flat = ipc_bytes_to_tensor(open(handle_path, "rb").read(), 0).clone()
torch.save({n: t.cpu() for n, t in unpack_bucket(metadata, flat)}, out)
"""


def test_cuda_ipc_bucket_roundtrip(tmp_path):
    from rlhf_ray.rollout.receiver import ipc_handle_to_bytes
    from rlhf_ray.rollout.weight_buckets import pack_bucket

    tensors = _tensors("cuda:0")
    metadata, flat = pack_bucket(tensors)
    torch.cuda.synchronize()
    handle = tmp_path / "handle.bin"
    handle.write_bytes(ipc_handle_to_bytes(flat))
    out = tmp_path / "out.pt"
    child = subprocess.run([sys.executable, "-c", _IPC_CHILD, str(handle), json.dumps(metadata), str(out)],
                           cwd=str(REPO), timeout=300)
    assert child.returncode == 0
    received = torch.load(out)
    assert all(torch.equal(t.cpu(), received[n]) for n, t in tensors)


_NCCL_CHILD = """
import json, sys, torch
from rlhf_ray.rollout.receiver import WeightReceiver
port, metadata, out = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
receiver = WeightReceiver()
receiver.join("nccl", "127.0.0.1", port, 1, 2, "gpu-unit", 120, torch.device("cuda", 1))
torch.save({n: t.cpu() for n, t in receiver.receive(metadata, torch.device("cuda", 1))}, out)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL broadcast needs two GPUs")
def test_nccl_broadcast_group_moves_a_bucket(tmp_path):
    from rlhf_ray.rollout.collective import join_broadcast_group
    from rlhf_ray.rollout.weight_buckets import pack_bucket
    from rlhf_ray.utils import free_port

    tensors = _tensors("cuda:0")
    metadata, flat = pack_bucket(tensors)
    port = free_port()
    out = tmp_path / "out.pt"
    child = subprocess.Popen([sys.executable, "-c", _NCCL_CHILD, str(port), json.dumps(metadata), str(out)],
                             cwd=str(REPO))
    group = join_broadcast_group("nccl", "127.0.0.1", port, 0, 2, "gpu-unit", 120, torch.device("cuda", 0))
    group.broadcast(flat)
    assert child.wait(timeout=300) == 0
    received = torch.load(out)
    assert all(torch.equal(t.cpu(), received[n]) for n, t in tensors)
