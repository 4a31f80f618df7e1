"""Trainer -> generator weight sync: the sender, its channels, and the mixin a trainer worker inherits.

Data flow of one sync (version v), driven by GeneratorGroup.sync_weights_from(trainer_group, v):

    trainer ranks (all)    for (name, tensor) in weights_for_sync():        # engine.iter_weights(): gathers shards
    trainer rank 0           bucket <- next ~bucket_bytes of tensors          (others just drain the iterator)
                             flat <- pack_bucket(bucket)                      one (nbytes,) uint8 buffer
                             channel.send_bucket(meta, flat) ────────► every generator engine:
                                object_store: ray.put(flat) once, each engine loads from shared memory
                                gloo / nccl:  broadcast from rank 0 of a stand-alone group (collective.py)
                                cuda_ipc:     a handle to rank 0's GPU buffer (engine on the same GPU)
                           engines: begin_weight_update(v) ... buckets ... finish_weight_update(v)
                                    (vLLM layerwise reload; prefix cache reset; version stamped)

At most `max_buckets_in_flight` buckets exist at once on the sender (packing bucket k+1 overlaps the engines
loading bucket k), so a sync never holds the whole model twice.

Channel choice ('auto'): object_store on CPU clusters (on par with gloo in rlhf_ray/benchmarks/bench_weight_sync.py, and it
needs no process group, so a restarted engine needs no re-join), cuda_ipc when every engine shares rank 0's GPU,
nccl otherwise. The GPU channels live in weight_sync_gpu.py.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Iterable, Iterator, Sequence

import ray
import torch

from rlhf_ray.rollout.collective import BroadcastGroup, join_broadcast_group
from rlhf_ray.rollout.weight_buckets import iter_buckets, pack_bucket

CHANNELS = ("object_store", "gloo", "nccl", "cuda_ipc")


class WeightChannel(ABC):
    """Moves packed buckets from the sending process to every receiver (generator actor handles)."""

    kind: str = ""
    #: where pack_bucket puts the flat buffer
    device: torch.device = torch.device("cpu")
    #: the longest wait for any receiver's answer (join, bucket ack, begin/finish of an update)
    timeout_s: float = 300.0

    def __init__(self) -> None:
        self.receivers: list[Any] = []

    def connect(self, receivers: Sequence[Any], ranks_per_engine: Sequence[int], group_id: str,
                timeout_s: float) -> None:
        """Remember the receivers; broadcast channels also form their group here."""
        self.receivers = list(receivers)
        self.timeout_s = timeout_s

    def wait(self, refs: list[ray.ObjectRef], what: str) -> list[Any]:
        """The receivers' answers, or a TimeoutError naming `what` after timeout_s (a hung engine never hangs the
        trainer)."""
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"weight sync ({self.kind}): no answer to {what} from the generator engines within "
                               f"{self.timeout_s:.0f}s; raise the generator's weight-sync timeout or check the "
                               f"engines") from None

    @abstractmethod
    def send_bucket(self, metadata: list[list], flat: torch.Tensor) -> list[ray.ObjectRef]:
        """Start moving one bucket; returns one ack ref per receiver (resolves once it has loaded the bucket)."""

    def close(self) -> None:
        pass


class ObjectStoreChannel(WeightChannel):
    """ray.put the flat buffer once; every engine reads it (zero-copy from shared memory on the same node)."""

    kind = "object_store"

    def send_bucket(self, metadata: list[list], flat: torch.Tensor) -> list[ray.ObjectRef]:
        ref = ray.put(flat.cpu().numpy())
        return [receiver.load_weight_bucket.remote(metadata, ref) for receiver in self.receivers]


class BroadcastChannel(WeightChannel):
    """A stand-alone process group of rank 0 (this process) plus every engine rank; one broadcast per bucket."""

    kind = "gloo"

    def __init__(self) -> None:
        super().__init__()
        self.group: BroadcastGroup | None = None

    def connect(self, receivers: Sequence[Any], ranks_per_engine: Sequence[int], group_id: str,
                timeout_s: float) -> None:
        from rlhf_ray.utils import free_port

        self.close()
        super().connect(receivers, ranks_per_engine, group_id, timeout_s)
        host, port = ray.util.get_node_ip_address(), free_port()
        world_size = 1 + sum(ranks_per_engine)
        offsets = [1 + sum(ranks_per_engine[:i]) for i in range(len(receivers))]
        joins = [receiver.join_weight_group.remote(self.kind, host, port, offset, world_size, group_id, timeout_s)
                 for receiver, offset in zip(self.receivers, offsets)]
        self.group = join_broadcast_group(self.kind, host, port, 0, world_size, group_id, timeout_s,
                                          self._device_for_group())
        self.wait(joins, "joining the broadcast group")

    def _device_for_group(self) -> torch.device | None:
        return None

    def send_bucket(self, metadata: list[list], flat: torch.Tensor) -> list[ray.ObjectRef]:
        if self.group is None:
            raise RuntimeError(f"{self.kind} weight channel used before connect()")
        acks = [receiver.receive_weight_bucket.remote(metadata) for receiver in self.receivers]
        self.group.broadcast(flat, src=0)
        return acks

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def build_channel(kind: str) -> WeightChannel:
    if kind == "object_store":
        return ObjectStoreChannel()
    if kind == "gloo":
        return BroadcastChannel()
    if kind in ("nccl", "cuda_ipc"):
        from rlhf_ray.rollout import weight_sync_gpu   # GPU-only code, imported only when asked for

        return weight_sync_gpu.NcclBroadcastChannel() if kind == "nccl" else weight_sync_gpu.CudaIpcChannel()
    raise ValueError(f"unknown weight_sync_channel {kind!r}; choose one of {list(CHANNELS)} or 'auto'")


def resolve_channel(requested: str, sender: dict, receivers: Sequence[dict]) -> str:
    """'auto' -> a concrete channel from where things run (dicts with node_id and gpu_ids)."""
    if requested != "auto":
        if requested not in CHANNELS:
            raise ValueError(f"unknown weight_sync_channel {requested!r}; choose one of {list(CHANNELS)} or 'auto'")
        return requested
    if not sender.get("gpu_ids") or not all(r.get("gpu_ids") for r in receivers):
        return "object_store"
    colocated = all(r["node_id"] == sender["node_id"] and set(r["gpu_ids"]) == set(sender["gpu_ids"])
                    for r in receivers)
    return "cuda_ipc" if colocated else "nccl"


class WeightSender:
    """Streams an iterator of (hf_name, tensor) to connected generator engines, bucket by bucket."""

    def __init__(self, channel: WeightChannel, bucket_bytes: int, max_buckets_in_flight: int = 2) -> None:
        if max_buckets_in_flight < 1:
            raise ValueError(f"max_buckets_in_flight must be >= 1 (got {max_buckets_in_flight})")
        self.channel = channel
        self.bucket_bytes = int(bucket_bytes)
        self.max_buckets_in_flight = max_buckets_in_flight

    def send(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> dict[str, float]:
        """One update session on every receiver; returns `weight_sync/...` metrics."""
        receivers = self.channel.receivers
        if not receivers:
            raise RuntimeError("weight sync has no receivers: connect the channel to the generator engines first")
        start = time.perf_counter()
        wait = self.channel.wait
        wait([receiver.begin_weight_update.remote(version) for receiver in receivers], "begin_weight_update")
        window: deque[list[ray.ObjectRef]] = deque()
        total_bytes = tensors = buckets = 0
        for bucket in iter_buckets(weights, self.bucket_bytes):
            metadata, flat = pack_bucket(bucket, device=self.channel.device)
            tensors += len(bucket)
            del bucket                              # the trainer's tensors may go; the bucket lives on in flat
            total_bytes += flat.numel()
            buckets += 1
            window.append(self.channel.send_bucket(metadata, flat))
            del flat
            while len(window) >= self.max_buckets_in_flight:
                wait(window.popleft(), f"bucket {buckets - len(window)}")
        while window:
            wait(window.popleft(), "the last buckets")
        wait([receiver.finish_weight_update.remote(version) for receiver in receivers], "finish_weight_update")
        seconds = time.perf_counter() - start
        return {"weight_sync/bytes": float(total_bytes), "weight_sync/tensors": float(tensors),
                "weight_sync/buckets": float(buckets), "weight_sync/seconds": seconds,
                "weight_sync/bytes_per_s": total_bytes / max(seconds, 1e-9), "weight_sync/version": float(version)}


class WeightSyncSourceMixin:
    """Mix into a trainer worker (a RankedWorker): it then serves GeneratorGroup.sync_weights_from.

    The subclass implements `weights_for_sync()`, usually `return self.engine.iter_weights()`. Every rank runs it
    (gathering FSDP/TP shards is collective); only rank 0 sends.
    """

    rank: int
    _weight_channel: WeightChannel | None = None
    _weight_sender: WeightSender | None = None

    def weights_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement weights_for_sync()")

    def weight_sync_placement(self) -> dict:
        """Where rank 0 runs, for resolve_channel('auto')."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def connect_weight_receivers(self, kind: str, receivers: Sequence[Any], ranks_per_engine: Sequence[int],
                                 bucket_bytes: int, group_id: str, timeout_s: float = 300.0) -> str:
        if self.rank != 0:
            return kind
        if self._weight_channel is not None:
            self._weight_channel.close()
        self._weight_channel = build_channel(kind)
        self._weight_channel.connect(receivers, ranks_per_engine, group_id, timeout_s)
        self._weight_sender = WeightSender(self._weight_channel, bucket_bytes)
        return kind

    def send_weights(self, version: int) -> dict[str, float]:
        weights = self.weights_for_sync()
        if self.rank != 0:
            for _ in weights:                       # take part in the gathers, send nothing
                pass
            return {}
        if self._weight_sender is None:
            raise RuntimeError("send_weights before connect_weight_receivers")
        return self._weight_sender.send(weights, version)
