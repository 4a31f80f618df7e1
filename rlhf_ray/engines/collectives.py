"""The default process group's backend, and the one helper through which scalar collectives reach it.

An NCCL group refuses CPU tensors, and a gloo-only group on a GPU rank would send CUDA tensors through host copies.
So a rank that sees a GPU joins with a device map: CUDA tensors (gradients, FSDP/TP shards, the helper below) go
over NCCL, CPU tensors (object collectives, FSDP CPU offload, barriers) over gloo. A CPU rank uses plain gloo.

    backend = process_group_backend(torch.cuda.is_available())   # "cpu:gloo,cuda:nccl" or "gloo"
    units, tokens = all_reduce_sums([units, tokens], engine.device)

Every collective on the default group inherits its timeout (RankedWorker.setup_distributed's timeout_s).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

GPU_BACKEND = "cpu:gloo,cuda:nccl"


def process_group_backend(cuda_visible: bool) -> str:
    """The backend string for init_process_group: the device map on a rank that sees CUDA, gloo otherwise."""
    return GPU_BACKEND if cuda_visible else "gloo"


def all_reduce_sums(values: Sequence[float], device: torch.device | str, group=None) -> list[float]:
    """Each value summed over the ranks of `group` (default: the world) in one float64 all-reduce; the values
    unchanged without a process group.

    The tensor is made on `device`, the engine's device: a CUDA tensor for a GPU engine, which NCCL takes, a CPU
    tensor for a CPU engine. Returns plain floats, in the order given.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.tolist()
