"""Every engine that runs on CPU trains a tiny Llama on 2 ranks (Ray actors in a WorkerGroup, gloo) with the same
loss trajectory as one process on the same data; sharded checkpoints resume exactly and re-shard; exports load in
plain transformers / peft.

Tolerances: fp32 runs agree to rtol 1e-5 (measured: ~1e-7; only the order of floating-point reductions differs);
bf16/fp16 runs are compared with a single process in the same precision to atol 5e-3 (FSDP2 casts parameters to
the low dtype before compute, a single process autocasts per op, so the roundings differ).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from engines_harness import EngineWorker, make_data, make_engine, run_steps

from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.workers.group import WorkerGroup

pytestmark = pytest.mark.ray

DATA = make_data()
_REFERENCE: dict[tuple, list[float]] = {}


def reference_losses(model_dir, precision="fp32", lora_rank=0, value=False) -> list[float]:
    """Single-process (no process group) losses for the same data, cached per setting."""
    key = (precision, lora_rank, value)
    if key not in _REFERENCE:
        engine = make_engine(model_dir, "ddp", precision=precision, lora_rank=lora_rank, value=value)
        _REFERENCE[key] = run_steps(engine, DATA, range(DATA.shape[0]), value=value)
    return _REFERENCE[key]


def _worker_env() -> dict[str, str]:
    """Workers see tests/ (for the harness) plus the driver's own PYTHONPATH, so that an optional extra installed
    with `pip install --target DIR` and PYTHONPATH=DIR (e.g. colossalai) is importable on the ranks too."""
    from conftest import REPO_ROOT

    paths = [str(REPO_ROOT), str(REPO_ROOT / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    return {"PYTHONPATH": ":".join(paths)}


@pytest.fixture(scope="module")
def pair(ray_cluster):
    group = WorkerGroup(EngineWorker, GroupSpec(num_workers=2, cpus_per_worker=0.5, env_vars=_worker_env()),
                        name="engines-2")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def quad(ray_cluster):
    group = WorkerGroup(EngineWorker, GroupSpec(num_workers=4, cpus_per_worker=0.5, tp_size=2), name="engines-4")
    yield group
    group.shutdown()


def train_on(group, model_dir, plugin, **kwargs) -> list[float]:
    group.call_all("build", str(model_dir), plugin, **kwargs)
    losses = group.call_all("train_steps", DATA, 0, DATA.shape[0])
    assert all(rank_losses == losses[0] for rank_losses in losses), "ranks disagree on the reduced loss"
    return losses[0]


NO_COLOSSALAI = pytest.mark.skipif(importlib.util.find_spec("colossalai") is None,
                                   reason="colossalai is an optional extra, not installed")

CPU_LAYOUTS = [
    pytest.param("ddp", {}, id="ddp"),
    pytest.param("fsdp", {}, id="fsdp"),
    pytest.param("fsdp_cpu", {}, id="fsdp_cpu"),
    pytest.param("tp", {"tp": 2}, id="tp"),
    pytest.param("fsdp", {"tp": 2}, id="fsdp-tp2"),
    pytest.param("3d", {"tp": 2}, id="3d"),
    pytest.param("colossal_ddp", {}, id="colossal_ddp", marks=NO_COLOSSALAI),
]


@pytest.mark.parametrize("plugin, extra", CPU_LAYOUTS)
def test_two_ranks_match_single_process(pair, tiny_model_dir, plugin, extra):
    losses = train_on(pair, tiny_model_dir, plugin, **extra)
    expected = reference_losses(tiny_model_dir)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0], "the loss should fall on repeated-pattern data"


@pytest.mark.parametrize("plugin, extra, precision", [
    pytest.param("ddp", {}, "bf16", id="ddp-bf16"),
    pytest.param("fsdp", {}, "bf16", id="fsdp-bf16"),
    pytest.param("fsdp", {}, "fp16", id="fsdp-fp16"),
    pytest.param("tp", {"tp": 2}, "bf16", id="tp-bf16"),
])
def test_mixed_precision_two_ranks(pair, tiny_model_dir, plugin, extra, precision):
    losses = train_on(pair, tiny_model_dir, plugin, precision=precision, **extra)
    torch.testing.assert_close(losses, reference_losses(tiny_model_dir, precision), rtol=0, atol=5e-3)


def test_lora_fsdp_matches_single_process(pair, tiny_model_dir):
    losses = train_on(pair, tiny_model_dir, "fsdp", lora_rank=4)
    torch.testing.assert_close(losses, reference_losses(tiny_model_dir, lora_rank=4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("plugin, extra", [pytest.param("ddp", {}, id="ddp"), pytest.param("tp", {"tp": 2}, id="tp")])
def test_value_model_matches_single_process(pair, tiny_model_dir, plugin, extra):
    losses = train_on(pair, tiny_model_dir, plugin, value=True, **extra)
    expected = reference_losses(tiny_model_dir, value=True)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


def test_fsdp_with_gradient_checkpointing_matches_single_process(pair, tiny_model_dir):
    losses = train_on(pair, tiny_model_dir, "fsdp", grad_checkpoint=True)
    torch.testing.assert_close(losses, reference_losses(tiny_model_dir), rtol=1e-5, atol=1e-6)


def test_tp_refuses_lora(pair, tiny_model_dir):
    messages = pair.call_all("build_error", str(tiny_model_dir), "tp", tp=2, lora_rank=4)
    assert all("--tp > 1 with --lora_rank" in m for m in messages)


def test_2d_mesh_dp2_tp2_matches_single_process(quad, tiny_model_dir):
    for plugin in ("fsdp", "ddp"):          # FSDP2 across TP groups; replicated data parallelism across TP groups
        losses = train_on(quad, tiny_model_dir, plugin, tp=2)
        torch.testing.assert_close(losses, reference_losses(tiny_model_dir), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("plugin, extra", [pytest.param("fsdp", {}, id="fsdp"),
                                           pytest.param("tp", {"tp": 2}, id="tp"),
                                           pytest.param("colossal_ddp", {}, id="colossal_ddp", marks=NO_COLOSSALAI)])
def test_resume_continues_the_uninterrupted_run(pair, tiny_model_dir, tmp_path, plugin, extra):
    checkpoint = tmp_path / "step_3"
    pair.call_all("build", str(tiny_model_dir), plugin, **extra)
    pair.call_all("train_steps", DATA, 0, 3)
    pair.call_all("save", str(checkpoint), {"step": 3, "epoch": 0, "sample": 24})
    draws_after_save = pair.call_all("draws")
    uninterrupted = pair.call_all("train_steps", DATA, 3, 5)[0]

    pair.call_all("build", str(tiny_model_dir), plugin, **extra)      # a fresh engine: new weights, new optimizer
    assert pair.call_all("load", str(checkpoint)) == [{"step": 3, "epoch": 0, "sample": 24}] * 2
    assert pair.call_all("draws") == draws_after_save                   # torch, numpy and python RNGs per rank
    resumed = pair.call_all("train_steps", DATA, 3, 5)[0]
    assert resumed == uninterrupted                                     # bitwise: same ops on the same state

    # Re-sharding: the 2-rank checkpoint resumes in one process (no process group) to the same trajectory.
    single = make_engine(tiny_model_dir, "ddp")
    assert single.load_checkpoint(checkpoint)["step"] == 3
    torch.testing.assert_close(run_steps(single, DATA, range(3, 5)), uninterrupted, rtol=1e-5, atol=1e-6)


def test_fsdp_export_loads_in_transformers(pair, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pair.call_all("build", str(tiny_model_dir), "fsdp")
    pair.call_all("train_steps", DATA, 0, 2)
    gathered = pair.call_all("full_weights")
    torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)
    pair.call_all("save_hf", str(tmp_path / "hf"))

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    state = loaded.state_dict()
    assert set(gathered[0]) == set(state)
    for name, tensor in gathered[0].items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)

    single = make_engine(tiny_model_dir, "ddp")
    run_steps(single, DATA, range(2))
    ids = DATA[0, 0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, single.unwrap()(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_exports_merged_and_as_adapter(pair, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single = make_engine(tiny_model_dir, "ddp", lora_rank=4)
    run_steps(single, DATA, range(2))
    ids = DATA[0, 0]
    with torch.no_grad():
        expected = single.unwrap()(ids).logits

    pair.call_all("build", str(tiny_model_dir), "fsdp", lora_rank=4)
    pair.call_all("train_steps", DATA, 0, 2)
    pair.call_all("save_hf", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)

    pair.call_all("build", str(tiny_model_dir), "fsdp", lora_rank=4, merge_lora=False)
    pair.call_all("train_steps", DATA, 0, 2)
    pair.call_all("save_hf", str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, expected, rtol=1e-4, atol=1e-4)
