"""Weight-sync building blocks without Ray: buckets, packing, channel choice, and a real two-process gloo group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf_ray.rollout.weight_buckets import bucket_nbytes, iter_buckets, pack_bucket, unpack_bucket
from rlhf_ray.rollout.weight_sync import resolve_channel
from rlhf_ray.utils import free_port


def named_tensors():
    torch.manual_seed(0)
    return [("a.weight", torch.randn(4, 8)), ("a.bias", torch.randn(8).to(torch.bfloat16)),
            ("b.weight", torch.randn(16, 16)), ("steps", torch.arange(5)), ("mask", torch.tensor([True, False])),
            ("c.weight", torch.randn(3, 3).half())]


def test_buckets_keep_order_and_respect_the_bound():
    tensors = named_tensors()
    buckets = list(iter_buckets(iter(tensors), bucket_bytes=200))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= 200 or len(bucket) == 1              # b.weight (1 KiB) travels alone
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(iter(tensors), 0))


def test_iter_buckets_pulls_lazily():
    pulled = []

    def source():
        for name, tensor in named_tensors():
            pulled.append(name)
            yield name, tensor

    first = next(iter_buckets(source(), bucket_bytes=150))      # a.weight (128 B) + a.bias (16 B) fit, b.weight not
    assert [n for n, _ in first] == ["a.weight", "a.bias"]
    assert pulled == ["a.weight", "a.bias", "b.weight"]          # one tensor of look-ahead, no more


@pytest.mark.parametrize("as_type", ["tensor", "numpy", "bytes"])
def test_pack_unpack_roundtrip_every_dtype(as_type):
    tensors = named_tensors()
    metadata, flat = pack_bucket(tensors)
    assert flat.dtype == torch.uint8 and flat.numel() == bucket_nbytes(metadata)
    buffer = {"tensor": flat, "numpy": flat.numpy(), "bytes": flat.numpy().tobytes()}[as_type]
    for (name, original), (got_name, got) in zip(tensors, unpack_bucket(metadata, buffer)):
        assert got_name == name and got.dtype == original.dtype and torch.equal(got, original)
    with pytest.raises(ValueError, match="truncated"):
        unpack_bucket(metadata, np.zeros(10, dtype=np.uint8))


def test_auto_channel_choice():
    cpu = {"node_id": "n1", "gpu_ids": []}
    assert resolve_channel("auto", cpu, [cpu, cpu]) == "object_store"
    gpu0 = {"node_id": "n1", "gpu_ids": ["0"]}
    assert resolve_channel("auto", gpu0, [gpu0]) == "cuda_ipc"
    assert resolve_channel("auto", gpu0, [gpu0, {"node_id": "n1", "gpu_ids": ["1"]}]) == "nccl"
    assert resolve_channel("gloo", gpu0, [gpu0]) == "gloo"
    with pytest.raises(ValueError, match="unknown weight_sync_channel 'tcp'"):
        resolve_channel("tcp", cpu, [cpu])


_RECEIVER = """
import json, sys, torch
from rlhf_ray.rollout.receiver import WeightReceiver
port, metadata, out = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
receiver = WeightReceiver()
receiver.join("gloo", "127.0.0.1", port, rank=1, world_size=2, group_id="unit", timeout_s=60)
torch.save({name: tensor.clone() for name, tensor in receiver.receive(metadata)}, out)
receiver.leave()
"""


def test_gloo_broadcast_group_moves_a_bucket_between_processes(tmp_path):
    """Rank 0 here, rank 1 in a fresh interpreter (a plain subprocess: no multiprocessing fd passing)."""
    from rlhf_ray.rollout.collective import join_broadcast_group

    tensors = named_tensors()
    metadata, flat = pack_bucket(tensors)
    port = free_port()
    out = tmp_path / "received.pt"
    child = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(port), json.dumps(metadata), str(out)],
                             cwd=str(Path(__file__).resolve().parent.parent))
    group = join_broadcast_group("gloo", "127.0.0.1", port, rank=0, world_size=2, group_id="unit", timeout_s=60)
    group.broadcast(flat)
    assert child.wait(timeout=120) == 0
    group.close()
    received = torch.load(out)
    assert list(received) == [n for n, _ in tensors]
    assert all(torch.equal(received[name], tensor) for name, tensor in tensors)


def test_a_receiver_that_never_answers_times_out_with_a_message(monkeypatch):
    """Every wait of a sync is bounded by the channel's timeout: a hung engine raises, it never hangs the trainer."""
    import ray

    from rlhf_ray.rollout.weight_sync import ObjectStoreChannel, WeightSender

    waits = []

    def never_ready(refs, timeout=None):
        waits.append(timeout)
        raise ray.exceptions.GetTimeoutError("hung")

    monkeypatch.setattr(ray, "get", never_ready)
    hung = SimpleNamespace(begin_weight_update=SimpleNamespace(remote=lambda version: "ref"))
    channel = ObjectStoreChannel()
    channel.connect([hung], [1], "timeout-test", timeout_s=7.0)
    with pytest.raises(TimeoutError, match=r"begin_weight_update .* within 7s"):
        WeightSender(channel, bucket_bytes=1 << 20).send(iter([("w", torch.zeros(2))]), version=1)
    assert waits == [7.0]
