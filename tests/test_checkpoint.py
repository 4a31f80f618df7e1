"""Checkpoint files: atomic directories, RNG state, no pickles anywhere, HF export sharding."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rlhf_ray.checkpoint.atomic import (atomic_directory, is_complete, latest_checkpoint, require_complete,
                                        rotate_checkpoints, step_directory, verify_checkpoint)
from rlhf_ray.checkpoint.layout import resolve_checkpoint_path
from rlhf_ray.config.base import ConfigError
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]      # the failed write left nothing behind
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
    assert verify_checkpoint(tmp_path / "ckpt") is None         # the manifest covers every rank's files
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


def _write_step(save_dir, step, payload=b"weights"):
    with atomic_directory(step_directory(save_dir, step)) as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "shard.safetensors").write_bytes(payload * 100)
        (tmp / "state.json").write_text(json.dumps({"step": step}))


def test_a_corrupted_or_truncated_file_is_detected_and_skipped(tmp_path, capsys):
    for step in (1, 2, 3):
        _write_step(tmp_path, step)
    shard = tmp_path / "step_3" / "model" / "shard.safetensors"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF                                            # bit rot: same size, other bytes
    shard.write_bytes(bytes(data))
    assert "does not match its sha256" in verify_checkpoint(tmp_path / "step_3")
    assert verify_checkpoint(tmp_path / "step_3", checksums=False) is None
    (tmp_path / "step_2" / "state.json").write_text("{")         # truncated
    assert "state.json has 1 bytes" in verify_checkpoint(tmp_path / "step_2")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1"
    out = capsys.readouterr().out
    assert f"skipping checkpoint {tmp_path / 'step_3'}" in out and f"skipping checkpoint {tmp_path / 'step_2'}" in out
    assert resolve_checkpoint_path(str(tmp_path)) == tmp_path / "step_1"
    with pytest.raises(ConfigError, match="step_3: model/shard.safetensors does not match its sha256"):
        resolve_checkpoint_path(str(tmp_path / "step_3"))
    with pytest.raises(ValueError, match="state.json has 1 bytes"):
        require_complete(tmp_path / "step_2")
    (tmp_path / "step_1" / "MANIFEST.json").unlink()
    assert "no readable MANIFEST.json" in verify_checkpoint(tmp_path / "step_1")
    with pytest.raises(ConfigError, match="neither a complete checkpoint"):
        resolve_checkpoint_path(str(tmp_path))


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 10, 3):
        _write_step(tmp_path, step)
    (tmp_path / "step_20").mkdir()                              # unfinished: neither counted nor deleted
    assert rotate_checkpoints(tmp_path, 0) == [] and rotate_checkpoints(tmp_path, None) == []
    assert rotate_checkpoints(tmp_path, 2) == [tmp_path / "step_2", tmp_path / "step_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_20", "step_3"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"


_KILLED_MID_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from safetensors.torch import save_file
    import rlhf_ray.engines.base as base
    from engines_harness import make_data, make_engine, run_steps

    model_dir, save_dir = sys.argv[1], Path(sys.argv[2])
    engine, data = make_engine(model_dir), make_data()
    run_steps(engine, data, range(1))
    engine.save_checkpoint(save_dir / "step_1", {"step": 1})
    save_file({k: v.clone() for k, v in engine.model.state_dict().items()}, str(save_dir.parent / "step1.safetensors"))
    run_steps(engine, data, range(1, 2))

    def stalled_save_rng(directory, rank):           # model and optimizer shards are written; the kill lands here
        (save_dir.parent / "writing").write_text("now")
        time.sleep(120)
    base.save_rng = stalled_save_rng
    engine.save_checkpoint(save_dir / "step_2", {"step": 2})
""")


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_to_resume_from(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from engines_harness import make_engine

    save_dir = tmp_path / "ckpts"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_MID_SAVE, str(tiny_model_dir), str(save_dir)], env=env)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "writing").exists():
            assert proc.poll() is None, "the saving process ended before the save began"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = save_dir / ".step_2.tmp"
    assert (partial / "model").is_dir() and not (save_dir / "step_2").exists()     # killed with shards on disk
    assert resolve_checkpoint_path(str(save_dir)) == save_dir / "step_1"
    engine = make_engine(tiny_model_dir)
    assert engine.load_checkpoint(save_dir / "step_1") == {"step": 1}
    expected = load_file(str(tmp_path / "step1.safetensors"))
    for name, tensor in engine.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    engine.save_checkpoint(save_dir / "step_2", {"step": 2})    # the next save clears the partial one
    assert latest_checkpoint(save_dir) == save_dir / "step_2" and not partial.exists()


_TWO_RANK_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch.distributed as dist
    from rlhf_ray.checkpoint.atomic import atomic_directory
    from rlhf_ray.engines.collectives import all_reduce_sums

    rank, port, target, fail_at = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    agree = lambda ok: all_reduce_sums([0.0 if ok else 1.0], "cpu")[0] == 0.0
    start = time.monotonic()
    try:
        with atomic_directory(target, is_writer=rank == 0, agree=agree) as tmp:
            if fail_at == f"write{rank}":
                raise OSError(f"rank {rank}: no space left on device")
            (tmp / f"part{rank}").write_text("x")
        print("RESULT ok", flush=True)
    except OSError as exc:
        print(f"RESULT {type(exc).__name__}: {exc} after {time.monotonic() - start:.1f}s", flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("fail_at", ["none", "prepare", "write0", "write1"])
def test_a_rank_that_fails_its_part_of_a_save_releases_the_others(tmp_path, fail_at):
    """Two gloo ranks (plain processes): whichever rank fails a phase, both leave within seconds (no barrier
    waits for the collective timeout), the failing rank with its own error, the other with PeerWriteError; the
    target never holds a half-written checkpoint."""
    from rlhf_ray.utils import free_port

    target = tmp_path / "ckpt"
    if fail_at == "prepare":                     # the writer cannot create the directory: its parent is a file
        (tmp_path / "file").write_text("")
        target = tmp_path / "file" / "ckpt"
    script = tmp_path / "writer.py"
    script.write_text(_TWO_RANK_WRITER)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port, str(target), fail_at],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        results.append(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    if fail_at == "none":
        assert results == ["ok", "ok"] and sorted(p.name for p in target.iterdir()) == ["COMPLETE", "MANIFEST.json",
                                                                                       "part0", "part1"]
        return
    failing = 1 if fail_at == "write1" else 0
    assert "PeerWriteError" not in results[failing] and "Error" in results[failing], results
    assert results[1 - failing].startswith("PeerWriteError") and "another rank failed" in results[1 - failing]
    assert all(float(r.rsplit(" after ", 1)[1].rstrip("s")) < 30 for r in results), results
    assert not target.exists() and not target.with_name(".ckpt.tmp").exists()
