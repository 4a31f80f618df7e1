"""The base of every rank-aware Ray actor: rank, world size, and the torch process group.

A WorkerGroup (group.py) creates these actors, asks rank 0 for a rendezvous address, and then has every rank join
the process group itself; no torchrun is involved.
"""

from __future__ import annotations

import os
from typing import Any

from rlhf_ray.utils import free_port


class RankedWorker:
    """Holds rank/world size; joins a torch.distributed group on request. Subclasses own one engine each."""

    def __init__(self, rank: int, world_size: int, **_: Any) -> None:
        self.rank = rank
        self.world_size = world_size
        os.environ["RANK"] = str(rank)
        os.environ["WORLD_SIZE"] = str(world_size)
        os.environ["LOCAL_RANK"] = "0" if not _gpu_visible() else os.environ.get("LOCAL_RANK", "0")

    # ------------------------------------------------------------ rendezvous
    def rendezvous_address(self) -> tuple[str, int]:
        """Called on rank 0 only: where the other ranks should connect."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup_distributed(self, master_addr: str, master_port: int, backend: str | None = None,
                          timeout_s: float = 1800.0) -> str:
        """Join the default process group: gloo on CPU; with a GPU visible, NCCL for CUDA tensors and gloo for CPU
        ones (engines/collectives.py). timeout_s bounds every collective and barrier on it; torch's own default of
        30 minutes, because ranks wait at a barrier while rank 0 writes a large model's checkpoint or export."""
        import datetime

        import torch
        import torch.distributed as dist

        from rlhf_ray.engines.collectives import process_group_backend

        backend = backend or process_group_backend(torch.cuda.is_available())
        os.environ["MASTER_ADDR"] = master_addr
        os.environ["MASTER_PORT"] = str(master_port)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return backend

    # ------------------------------------------------------------ generic helpers
    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def ping(self) -> int:
        return self.rank

    def peak_rss_mib(self) -> float:
        """This process's resident-memory high-water mark in MiB."""
        from rlhf_ray.utils import peak_rss_mib

        return peak_rss_mib()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _gpu_visible() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
