"""A stand-alone broadcast group for weight sync: trainer rank 0 (rank 0 here) plus every generator engine rank.

It never touches torch's default process group: the trainer ranks already have one (their own gloo/NCCL group)
and an in-process vLLM engine has one too (world size 1). Instead each member builds a process group object
directly from a TCPStore that the sender hosts:

    sender:     group = join_broadcast_group("gloo", host, port, rank=0, world_size=1 + engines, group_id="v3")
    receivers:  group = join_broadcast_group("gloo", host, port, rank=1 + i, world_size=..., group_id="v3")
    all:        group.broadcast(flat_uint8_buffer, src=0)

Creation blocks until every member has joined, so the caller starts all joins concurrently (Ray .remote calls).
"""

from __future__ import annotations

import datetime

import torch


class BroadcastGroup:
    """One member's handle: rank, world size, and a blocking broadcast from rank 0."""

    def __init__(self, kind: str, rank: int, world_size: int, group_id: str, process_group, store,
                 timeout: datetime.timedelta = datetime.timedelta(seconds=300)) -> None:
        self.kind = kind
        self.rank = rank
        self.world_size = world_size
        self.group_id = group_id
        self._pg = process_group
        self._store = store            # the TCPStore must outlive the group on the hosting rank
        self.timeout = timeout

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """In place: rank `src` sends `tensor`, every other rank receives into its own `tensor` (same size).

        Waits with the group's timeout and raises when it passes (a member died or never called). With an explicit
        timeout, torch's NCCL work blocks the host until the broadcast has completed, so the sender may free or
        reuse `tensor` as soon as this returns.
        """
        self._pg.broadcast(tensor, src).wait(self.timeout)

    def close(self) -> None:
        shutdown = getattr(self._pg, "shutdown", None) or getattr(self._pg, "abort", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - a peer may already be gone; closing is best effort
                pass
        self._pg = None
        self._store = None


def join_broadcast_group(kind: str, host: str, port: int, rank: int, world_size: int, group_id: str,
                         timeout_s: float = 300.0, device: torch.device | None = None) -> BroadcastGroup:
    """Join (rank 0: host) the group; returns once all world_size members have joined.

    kind 'gloo' works on CPU tensors; 'nccl' on CUDA tensors (GPU clusters; not exercised by the CPU tests).
    """
    import torch.distributed as dist

    if kind not in ("gloo", "nccl"):
        raise ValueError(f"broadcast group kind must be 'gloo' or 'nccl' (got {kind!r})")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), world_size, is_master=(rank == 0), timeout=timeout,
                          wait_for_workers=True)
    prefixed = dist.PrefixStore(f"rlhf-ray-weight-sync/{group_id}", store)
    if kind == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    else:  # pragma: no cover - needs GPUs
        device = indexed_cuda_device(device)
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        # a first collective creates the communicator now rather than inside the first weight bucket
        pg.broadcast(torch.zeros(1, device=device), 0).wait(timeout)
    return BroadcastGroup(kind, rank, world_size, group_id, pg, store, timeout)


def indexed_cuda_device(device: torch.device | str | None) -> torch.device:
    """`device` with its index: cuda:<current> for None or a bare "cuda" (torch.cuda.set_device refuses those)."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        raise ValueError(f"the nccl weight-sync group needs a CUDA device (got {device})")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
