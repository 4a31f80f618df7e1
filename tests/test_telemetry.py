"""Metrics reach every sink: JSONL, TensorBoard event files, offline wandb; non-scalars are refused."""

import time

import pytest

from rlhf_ray.config.sections import LoggingSection
from rlhf_ray.telemetry.timers import Timers
from rlhf_ray.telemetry.tracker import build_tracker, read_jsonl_metrics


def test_jsonl_and_tensorboard(tmp_path):
    logging = LoggingSection(log_dir=str(tmp_path), tensorboard=True)
    with build_tracker(logging, run_name="t", console=False) as tracker:
        tracker.log({"loss/train": 1.5, "perf/tokens_per_s": 10}, step=1)
        tracker.log({"loss/train": 0.5}, step=2)
    rows = read_jsonl_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss/train"] for r in rows] == [1.5, 0.5] and rows[0]["step"] == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [s.value for s in events.Scalars("loss/train")] == [1.5, 0.5]


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logging = LoggingSection(log_dir=str(tmp_path), use_wandb=True, tensorboard=False)
    tracker = build_tracker(logging, run_name="t", config={"a": 1}, console=False)
    tracker.log({"loss/train": 2.0}, step=1)
    tracker.close()
    assert list(tmp_path.rglob("*.wandb")), "offline wandb run file was not written"


def test_non_scalar_metric_is_refused(tmp_path):
    tracker = build_tracker(LoggingSection(), run_name="t", console=False)
    with pytest.raises(TypeError, match="not a scalar"):
        tracker.log({"bad": [1, 2]}, step=0)


def test_timers_accumulate_by_name():
    timers = Timers()
    for _ in range(2):
        with timers("generate"):
            time.sleep(0.05)
    metrics = timers.metrics()
    assert set(metrics) == {"timing/generate"}
    assert 0.1 <= metrics["timing/generate"] < 5.0          # both intervals, summed (a sleep never runs short)
    assert timers.metrics() == {}
