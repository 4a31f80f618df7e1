"""Checkpoint files: atomic directories, RNG state, no pickles anywhere, HF export sharding."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rlhf_ray.checkpoint.atomic import (atomic_directory, is_complete, latest_checkpoint, require_complete,
                                        step_directory)
from rlhf_ray.checkpoint.hf_export import write_hf_directory
from rlhf_ray.checkpoint.rng import load_rng, save_rng


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("v2-partial")
            raise RuntimeError("killed mid-save")
    assert (target / "weights").read_text() == "v1" and is_complete(target)
    with atomic_directory(target) as tmp:                       # the stale temp dir is cleared and replaced
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for step in (2, 10):
        with atomic_directory(step_directory(tmp_path, step)):
            pass
    (tmp_path / "step_30").mkdir()                              # a save that never finished
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        require_complete(tmp_path / "step_30")
    with pytest.raises(ValueError, match="no such directory"):
        require_complete(tmp_path / "step_99")


def test_rng_state_round_trips_per_rank(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_rng(tmp_path, rank=1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    assert load_rng(tmp_path, rank=1)
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1].tolist() == expected[1].tolist() and got[2] == expected[2]
    assert not load_rng(tmp_path, rank=0)                       # another world size: warned, not crashed


def test_engine_checkpoint_holds_no_pickles(tiny_model_dir, tmp_path):
    from engines_harness import make_data, make_engine, run_steps

    engine = make_engine(tiny_model_dir)
    run_steps(engine, make_data(), range(1))
    engine.save_checkpoint(tmp_path / "ckpt", {"step": 1, "data_position": [0, 8]})
    files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert suffixes <= {".safetensors", ".json", ""}, suffixes
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:   # parses the header; no code runs
                assert list(handle.keys())
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.name == "COMPLETE"
    with pytest.raises(TypeError):
        engine.save_checkpoint(tmp_path / "bad", {"not json": object()})
    assert not (tmp_path / "bad").exists()


def test_hf_export_shards_large_models_with_an_index(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    write_hf_directory(tmp_path / "hf", model.state_dict().items(), config=model.config, dtype=torch.bfloat16,
                       max_shard_bytes=100_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name].float(), tensor.to(torch.bfloat16).float())
