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
import threading
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


# The numbers a practitioner watches, in the order shown: (metric, label). The console shows these unless
# --verbose; every metric still reaches metrics.jsonl, TensorBoard and wandb.
HEADLINE = (("loss/train", "loss"), ("loss/eval", "eval_loss"), ("rm/acc", "acc"), ("eval/acc", "eval_acc"),
            ("dpo/acc", "acc"), ("dpo/reward_margin", "margin"), ("reward/mean", "reward"), ("reward/kl", "kl"),
            ("loss/policy", "pg_loss"), ("policy/clip_frac", "clip"), ("loss/value", "vf_loss"),
            ("rollout/response_len_mean", "len"), ("lr", "lr"), ("grad_norm", "grad_norm"),
            ("perf/tokens_per_s", "tok/s"), ("perf/rollout_tokens_per_s", "gen_tok/s"))
# Phases of an RL episode shown as its time split; the rest of `timing/episode` is shown as "other".
EPISODE_PHASES = (("generate", "gen"), ("score", "score"), ("update", "update"), ("weight_sync", "sync"))


def _short(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"      # 10060, not 1.006e+04


def compact_line(metrics: Metrics) -> str:
    """The headline numbers of one log step, e.g. `reward=0.12  kl=0.003 ... | 2.1s: gen 0.9 score 0.3 ...`;
    empty when the step carries none of them (a line of timings only)."""
    parts = [f"{label}={_short(metrics[key])}" for key, label in HEADLINE if key in metrics]
    total = metrics.get("timing/episode")
    if parts and total is not None:
        phases = [(label, metrics[f"timing/{name}"]) for name, label in EPISODE_PHASES if f"timing/{name}" in metrics]
        phases.append(("other", max(total - sum(seconds for _, seconds in phases), 0.0)))
        parts.append(f"| {total:.2f}s: " + " ".join(f"{label} {seconds:.2f}" for label, seconds in phases))
    return "  ".join(parts)


class ConsoleSink:
    """One line per logged step: the headline numbers (compact_line), or every metric when verbose. Prints
    through tqdm so progress bars stay intact."""

    def __init__(self, prefix: str = "", verbose: bool = False):
        self.prefix = prefix
        self.verbose = verbose

    def log(self, metrics: Metrics, step: int) -> None:
        body = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()) if self.verbose else compact_line(metrics)
        if body:
            from tqdm import tqdm

            tqdm.write(f"{self.prefix}step {step}: {body}")

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON object per step: {"step": n, "time": t, metrics...}; sampled responses go to
    samples.jsonl beside it, one object per sample: {"step", "prompt", "response", "reward", "length"}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)

    def log(self, metrics: Metrics, step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: (None if math.isnan(v) else v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")

    def log_samples(self, samples: list[dict], step: int) -> None:
        with (self.path.parent / "samples.jsonl").open("a") as handle:
            handle.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: Metrics, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_samples(self, samples: list[dict], step: int) -> None:
        self.writer.add_text("samples", samples_markdown(samples), step)

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

    def log_samples(self, samples: list[dict], step: int) -> None:
        columns = list(samples[0])
        self.run.log({"samples": self._wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])},
                     step=step)

    def close(self) -> None:
        self.run.finish()


class PlotSink:
    """Draws the run's curves (plots.py) into <log_dir>/plots when the job ends; logs nothing while it runs.
    close() draws on a thread, so that a job can tear its actors and Ray down meanwhile (~1 s each); wait() joins."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self._drawing: threading.Thread | None = None

    def log(self, metrics: Metrics, step: int) -> None:
        pass

    def close(self) -> None:
        self._drawing = threading.Thread(target=self._draw, name="draw-plots")
        self._drawing.start()

    def wait(self) -> None:
        if self._drawing is not None:
            self._drawing.join()

    def _draw(self) -> None:
        from rlhf_ray.telemetry.plots import plot_runs

        try:
            plot_runs([self.log_dir], self.log_dir / "plots")
        except Exception as exc:    # noqa: BLE001 - the job's results are written; a failed picture must not fail it
            print(f"note: could not draw the plots of {self.log_dir}: {exc!r} (rlhf-ray plot retries)", flush=True)


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

    def log_samples(self, samples: list[dict], step: int) -> None:
        """A few sampled responses, each {"prompt", "response", "reward", "length"}, to the sinks that keep text."""
        if samples:
            for sink in self.sinks:
                if hasattr(sink, "log_samples"):
                    sink.log_samples(samples, step)

    def close(self, wait: bool = True) -> None:
        """Close every sink; wait=False leaves what a sink finishes in the background (the plots) to wait()."""
        for sink in self.sinks:
            sink.close()
        if wait:
            self.wait()

    def wait(self) -> None:
        for sink in self.sinks:
            if hasattr(sink, "wait"):
                sink.wait()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_tracker(logging, run_name: str, config: dict | None = None, console: bool = True) -> Tracker:
    """Build the sinks a LoggingSection asks for."""
    sinks: list[Sink] = []
    if console:
        sinks.append(ConsoleSink(prefix=f"[{run_name}] ", verbose=logging.verbose))
    if logging.log_dir:
        log_dir = Path(logging.log_dir)
        sinks.append(JsonlSink(log_dir / "metrics.jsonl"))
        if logging.tensorboard:
            sinks.append(TensorBoardSink(log_dir / "tensorboard"))
        sinks.append(PlotSink(log_dir))
    if logging.use_wandb:
        os.environ.setdefault("WANDB_SILENT", "true")
        sinks.append(WandbSink(logging.wandb_project, run_name, config, logging.log_dir))
    return Tracker(sinks)


def samples_markdown(samples: list[dict]) -> str:
    """A markdown table of sampled responses (TensorBoard renders text summaries as markdown)."""
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    columns = list(samples[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(sample[c]) for c in columns) + " |" for sample in samples]
    return "\n".join(lines)


def read_jsonl_metrics(path: str | Path) -> list[dict]:
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]
