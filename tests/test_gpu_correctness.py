"""GPU correctness without a GPU: the process group a GPU rank joins, collectives on the engine's device, timeouts on
weight-sync waits, and the prepared GPU check (rlhf_ray/benchmarks/gpu_check.py) running on a CPU machine.

What a CPU cannot run (NCCL, CUDA IPC) is stood in for: init_process_group and all_reduce are recorded with
monkeypatch, and the engine's device is the `meta` device, which no real collective accepts, so a helper that
ignored it would be seen.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rlhf_ray.benchmarks import gpu_check
from rlhf_ray.engines.base import TrainEngine
from rlhf_ray.engines.collectives import GPU_BACKEND, process_group_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_is_the_device_map_on_a_cuda_rank():
    assert process_group_backend(True) == "cpu:gloo,cuda:nccl" == GPU_BACKEND
    assert process_group_backend(False) == "gloo"


def test_setup_distributed_joins_with_the_device_map_and_a_timeout(monkeypatch):
    from rlhf_ray.workers.base import RankedWorker

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    worker = RankedWorker(rank=1, world_size=2)
    assert worker.setup_distributed("10.0.0.1", 29500, timeout_s=42) == GPU_BACKEND
    assert calls == [{"backend": GPU_BACKEND, "rank": 1, "world_size": 2,
                      "timeout": datetime.timedelta(seconds=42)}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker.setup_distributed("10.0.0.1", 29500) == "gloo"


class _Reduced(Exception):
    pass


def _record_all_reduce(monkeypatch) -> list[torch.device]:
    """Pretend a process group exists; record each all_reduce's tensor device, then stop the caller (a meta
    tensor has no values to read back)."""
    devices: list[torch.device] = []

    def all_reduce(tensor, op=None, group=None):
        devices.append(tensor.device)
        raise _Reduced

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return devices


def test_metric_and_unit_reductions_run_on_the_engine_device(monkeypatch):
    from rlhf_ray.workers.trainer import TrainerWorker

    devices = _record_all_reduce(monkeypatch)
    engine = SimpleNamespace(device=torch.device("meta"), world_size=2)
    with pytest.raises(_Reduced):
        TrainEngine.reduce_metrics(engine, {"loss": 1.0})
    worker = SimpleNamespace(world_size=2, engine=engine, parallel_cfg=SimpleNamespace(tp=1))
    with pytest.raises(_Reduced):
        TrainerWorker._global_sum(worker, 3.0)
    assert devices == [torch.device("meta")] * 2


def test_all_reduce_sums_over_two_gloo_ranks():
    """The gpu check's own launcher (torch.multiprocessing, no Ray) on CPU: two ranks on plain gloo."""
    result = gpu_check.run_ranks("collectives", 2, timeout_s=120)
    assert result == {"detail": "sums [3.0, 2.0]", "backend": "gloo"}


def test_weight_sync_broadcast_raises_after_its_timeout_when_a_member_is_missing():
    from rlhf_ray.rollout.collective import join_broadcast_group
    from rlhf_ray.utils import free_port

    port, groups = free_port(), {}

    def join(rank):
        groups[rank] = join_broadcast_group("gloo", "127.0.0.1", port, rank, 2, "timeout-test", timeout_s=2)

    member = threading.Thread(target=join, args=(1,))
    member.start()
    join(0)
    member.join()
    assert groups[0].timeout == datetime.timedelta(seconds=2)
    try:
        with pytest.raises(RuntimeError):
            groups[0].broadcast(torch.zeros(4, dtype=torch.uint8))     # rank 1 never calls
    finally:
        for group in groups.values():
            group.close()


def test_cuda_ipc_channel_waits_for_acks_with_the_sync_timeout(monkeypatch):
    from rlhf_ray.rollout import weight_sync_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(weight_sync_gpu, "ipc_handle_to_bytes", lambda flat: b"handle")
    waits = []
    monkeypatch.setattr(weight_sync_gpu.ray, "get", lambda refs, timeout=None: waits.append((refs, timeout)))
    receiver = SimpleNamespace(load_ipc_weight_bucket=SimpleNamespace(remote=lambda metadata, handle: "ack"))
    channel = weight_sync_gpu.CudaIpcChannel()
    channel.connect([receiver], [1], "ipc-test", timeout_s=17.0)
    assert channel.send_bucket([], torch.zeros(1)) == ["ack"]
    assert waits == [(["ack"], 17.0)]


def test_gpu_check_on_cpu_reports_every_row_skipped():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    run = subprocess.run(["bash", "launch/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    rows = lines[lines.index(next(line for line in lines if line.startswith("row "))) + 1:-1]
    assert len(rows) == len(gpu_check.build_rows(0, True, "", 1.0)) and all(row.endswith("skipped: no CUDA") for row in rows), run.stdout
    assert lines[-1] == "gpu check: no failures"


def test_frozen_models_row_runs_on_cpu_with_the_dpo_colocated_reference(tiny_model_dir):
    """The row a GPU machine runs, here on the CPU: the frozen rank's model and DPO's colocated reference sit on the
    rank's device, take the collator's CPU batches and score as the untrained policy does."""
    report = gpu_check.check_frozen_models(str(tiny_model_dir))
    assert report.startswith("on cpu;") and "DPO colocated reference gap" in report, report


def test_gpu_check_imports_neither_ray_nor_vllm():
    """Everything the GPU rows import, with ray and vllm made unimportable."""
    code = ("import sys; sys.modules['ray'] = sys.modules['vllm'] = None\n"
            "from rlhf_ray.benchmarks import gpu_check\n"
            "from rlhf_ray.engines.registry import _load_backends; _load_backends()\n"
            "import rlhf_ray.fixtures.tiny, rlhf_ray.models.loading, rlhf_ray.config.sections\n"
            "sys.exit(gpu_check.main([]))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("tp, backend", [(1, None), (2, "mp")])
def test_tensor_parallel_vllm_engine_runs_its_own_workers_on_gpu(monkeypatch, tp, backend):
    """Inside a Ray placement group vLLM would pick its Ray executor for TP > 1 and wait for GPUs the generator
    actor already holds; a GPU engine asks for worker processes instead (vllm.LLM recorded, not started)."""
    import vllm

    from rlhf_ray.rollout.backends import vllm_backend
    from rlhf_ray.rollout.config import GeneratorSection

    calls = []

    class FakeLLM:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def get_tokenizer(self):
            return None

    monkeypatch.setattr(vllm_backend, "on_cpu", lambda: False)
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(vllm_backend.os, "environ", dict(os.environ))       # the engine's env vars stay here
    vllm_backend.VLLMBackend(GeneratorSection(tensor_parallel_size=tp), "/nonexistent/model", None, 0)
    assert calls[0].get("distributed_executor_backend") == backend
    assert calls[0]["tensor_parallel_size"] == tp


def test_nccl_weight_group_device_gets_an_index(monkeypatch):
    """The hf backend asks for torch.device('cuda'); torch.cuda.set_device refuses a device without an index."""
    from rlhf_ray.rollout.collective import indexed_cuda_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert indexed_cuda_device(torch.device("cuda")) == torch.device("cuda", 3) == indexed_cuda_device(None)
    assert indexed_cuda_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="CUDA device"):
        indexed_cuda_device("cpu")


def test_bf16_on_a_gpu_without_bfloat16_names_the_flag_and_the_fix(monkeypatch):
    from rlhf_ray.engines.precision import autocast_context

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ValueError, match=r"^--mixed_precision bf16: Tesla V100 has no bfloat16 support; use "
                                         r"--mixed_precision fp16"):
        autocast_context("bf16", torch.device("cuda", 0))
    with autocast_context("bf16", torch.device("cpu")):              # CPU autocast is untouched
        assert torch.is_autocast_enabled("cpu")
