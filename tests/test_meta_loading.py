"""Meta-device start-up of the sharded engines: each rank builds the model without weights and reads only its own
shard from the checkpoint, with exactly the weights, buffers, tie and fresh parameters of the full build.

The two-rank test runs in two spawned processes (gloo), not Ray, to stay fast.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
from engines_harness import make_engine
from safetensors.torch import load_file

from rlhf_ray.fixtures.tiny import build_tiny_model
from rlhf_ray.models import meta_loading
from rlhf_ray.models.lora import hf_name


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("meta") / "tiny-tied", flavour="debug", tied=True, seed=3)


def _local(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def _refuse_from_pretrained(*args, **kwargs):
    raise AssertionError("the meta path called from_pretrained: the full model was built on this rank")


@pytest.mark.parametrize("extra", [pytest.param({}, id="causal"), pytest.param({"lora_rank": 4}, id="lora"),
                                   pytest.param({"value": True, "lora_rank": 4}, id="value-lora")])
def test_meta_build_equals_the_full_build(tied_dir, monkeypatch, extra):
    """One process, fsdp layout: the meta build gives bit-identical parameters (checkpoint, LoRA adapters, fresh
    value head), buffers (rotary inv_freq) and config, keeps lm_head tied, and never calls from_pretrained."""
    full = make_engine(tied_dir, "fsdp", meta_init=False, **extra).unwrap()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", _refuse_from_pretrained)
    meta = make_engine(tied_dir, "fsdp", meta_init=True, **extra).unwrap()
    monkeypatch.undo()
    full_params, meta_params = dict(full.named_parameters()), dict(meta.named_parameters())
    assert full_params.keys() == meta_params.keys()
    for name, param in full_params.items():
        assert torch.equal(param, meta_params[name]), name
        assert param.requires_grad == meta_params[name].requires_grad, name
    full_buffers, meta_buffers = dict(full.named_buffers()), dict(meta.named_buffers())
    assert full_buffers.keys() == meta_buffers.keys() and full_buffers
    assert all(torch.equal(b, meta_buffers[n]) for n, b in full_buffers.items())
    assert full.config.to_dict() == meta.config.to_dict()
    if not extra.get("value"):
        assert meta.lm_head.weight is meta.model.embed_tokens.weight
        assert full.generation_config.to_dict() == meta.generation_config.to_dict()


def test_a_checkpoint_transformers_converts_falls_back_to_the_full_build(tmp_path, caplog):
    """Fused MoE experts (transformers renames and stacks them on load): no meta build, a note, the same model."""
    model_dir = build_tiny_model(tmp_path / "moe", flavour="debug", family="qwen2_moe")
    with caplog.at_level("INFO", logger=meta_loading.__name__):
        meta = make_engine(model_dir, "fsdp", meta_init=True).unwrap()
    assert "loading the full model on this rank" in caplog.text
    full = make_engine(model_dir, "fsdp", meta_init=False).unwrap()
    assert all(torch.equal(p, dict(meta.named_parameters())[n]) for n, p in full.named_parameters())


def _rank_main(rank: int, port: int, model_dir: str, queue) -> None:
    """One of two ranks: build fsdp and tp engines on the meta path, recording what is read from the checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    read = meta_loading.CheckpointReader.read
    elements: list[int] = []

    def counting_read(self, name, region):
        piece = read(self, name, region)
        elements.append(piece.numel())
        return piece

    meta_loading.CheckpointReader.read = counting_read
    checkpoint = load_file(os.path.join(model_dir, "model.safetensors"))
    report = {}
    for plugin, tp in (("fsdp", 1), ("tp", 2)):
        elements.clear()
        model = make_engine(model_dir, plugin, meta_init=True, world=2, tp=tp).unwrap()
        params = dict(model.named_parameters())
        gathered = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p) for name, p in params.items()}
        report[plugin] = {
            "wrong": [n for n, full in gathered.items() if not torch.equal(full, checkpoint[hf_name(n)].float())],
            "read": sum(elements), "local": sum(_local(p).numel() for p in params.values()),
            "model": sum(p.numel() for p in params.values()),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight}
    queue.put((rank, report))
    dist.destroy_process_group()


def test_two_ranks_read_only_their_shards(tied_dir):
    """fsdp and tp over two ranks: the gathered weights are the checkpoint's, each rank reads exactly its local
    elements from the file (FSDP2: half the model; TP: half of each block plus the replicated embeddings/norms)."""
    from rlhf_ray.utils import free_port

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(rank, port, str(tied_dir), queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    reports = dict(queue.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    for rank, report in reports.items():
        for plugin, r in report.items():
            assert r["wrong"] == [], (rank, plugin)
            assert r["tied"], (rank, plugin)
            assert r["read"] == r["local"] < r["model"], (rank, plugin, r)     # this rank's own elements, no more
    assert reports[0]["fsdp"]["read"] + reports[1]["fsdp"]["read"] == reports[0]["fsdp"]["model"]  # each once
