"""One metrics API, several sinks: console, JSONL, TensorBoard, wandb.

    tracker = build_tracker(logging_section, run_name="sft", config=cfg.to_dict())
    tracker.log({"loss/train": 0.7, "perf/tokens_per_s": 1234.0}, step=10)
    tracker.close()

Metric names are namespaced (`loss/…`, `rollout/…`, `reward/…`, `timing/…`, `perf/…`). Every sink gets the same
dict; a sink that fails to start (wandb missing, say) raises at start-up rather than dropping metrics later.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Protocol

Metrics = dict[str, float]


def _scalar(value: Any) -> float | None:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool):
        return float(value)
    return None


class Sink(Protocol):
    def log(self, metrics: Metrics, step: int) -> None: ...

    def close(self) -> None: ...


class ConsoleSink:
    """One compact line per logged step; prints through tqdm when bars are active so they stay intact."""

    def __init__(self, prefix: str = "", keys: list[str] | None = None):
        self.prefix = prefix
        self.keys = keys

    def log(self, metrics: Metrics, step: int) -> None:
        shown = {k: v for k, v in metrics.items() if self.keys is None or k in self.keys}
        parts = [f"{k}={v:.4g}" for k, v in shown.items()]
        line = f"{self.prefix}step {step}: " + "  ".join(parts)
        try:
            from tqdm import tqdm

            tqdm.write(line)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            print(line, flush=True)

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON object per step: {"step": n, "time": t, metrics...}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)

    def log(self, metrics: Metrics, step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: (None if math.isnan(v) else v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: Metrics, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, run_name: str, config: dict | None, log_dir: str | None):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, name=run_name, config=config or {}, dir=log_dir, reinit="finish_previous")

    def log(self, metrics: Metrics, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Fans metrics out to sinks; drops non-scalar values loudly (TypeError) instead of silently."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self.history: list[tuple[int, Metrics]] = []

    def log(self, metrics: dict[str, Any], step: int) -> Metrics:
        clean: Metrics = {}
        for key, value in metrics.items():
            scalar = _scalar(value)
            if scalar is None:
                raise TypeError(f"metric {key!r} is not a scalar: {type(value).__name__}")
            clean[key] = scalar
        self.history.append((step, clean))
        for sink in self.sinks:
            sink.log(clean, step)
        return clean

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_tracker(logging, run_name: str, config: dict | None = None, console: bool = True) -> Tracker:
    """Build the sinks a LoggingSection asks for."""
    sinks: list[Sink] = []
    if console:
        sinks.append(ConsoleSink(prefix=f"[{run_name}] "))
    if logging.log_dir:
        log_dir = Path(logging.log_dir)
        sinks.append(JsonlSink(log_dir / "metrics.jsonl"))
        if logging.tensorboard:
            sinks.append(TensorBoardSink(log_dir / "tensorboard"))
    if logging.use_wandb:
        os.environ.setdefault("WANDB_SILENT", "true")
        sinks.append(WandbSink(logging.wandb_project, run_name, config, logging.log_dir))
    return Tracker(sinks)


def read_jsonl_metrics(path: str | Path) -> list[dict]:
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]
