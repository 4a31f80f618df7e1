"""Curves of one or more runs, drawn from their metrics.jsonl into PNGs (matplotlib, Agg backend).

    rlhf-ray plot .demo/logs/grpo                          -> .demo/logs/grpo/plots/{curves,timing}.png
    rlhf-ray plot runs/a runs/b --out compare/             several runs overlaid, one line per run

curves.png: one panel per metric family the runs logged (reward, KL, losses, response length, ...), x = step.
timing.png: per run, the time of each step split by phase (`timing/<phase>`), as a stacked area chart.
Every job with a --log_dir draws its own at the end (PlotSink in tracker.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (panel title, metrics drawn in it); a panel appears when any run logged one of its metrics.
PANELS = (("reward", ("reward/mean",)), ("KL", ("reward/kl", "policy/approx_kl")),
          ("policy loss", ("loss/policy",)), ("value loss", ("loss/value",)), ("loss", ("loss/train", "loss/eval")),
          ("response length", ("rollout/response_len_mean",)), ("accuracy", ("rm/acc", "dpo/acc", "eval/acc")),
          ("clip fraction", ("policy/clip_frac",)), ("grad norm", ("grad_norm", "policy/grad_norm")),
          ("learning rate", ("lr", "policy/lr")), ("tokens/s", ("perf/tokens_per_s", "perf/rollout_tokens_per_s")))
# Timings that are not a phase of the step (one-off costs), left out of the stacked chart.
NOT_A_PHASE = {"timing/episode", "timing/startup", "timing/save", "timing/export", "timing/resume", "timing/eval"}


def metrics_file(run: str | Path) -> Path:
    """RUN_DIR/metrics.jsonl, or the file itself; ValueError naming the path when there is none."""
    path = Path(run)
    found = path / "metrics.jsonl" if path.is_dir() else path
    if not found.is_file():
        raise ValueError(f"{run}: no metrics.jsonl there; give a job's --log_dir (or the metrics.jsonl inside it)")
    return found


def read_rows(run: str | Path) -> list[dict]:
    with metrics_file(run).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over the rows that logged it (None, a NaN in the JSONL, is skipped)."""
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _labels(runs: list[str | Path]) -> list[str]:
    names = [Path(run).resolve().name if Path(run).is_dir() else Path(run).resolve().parent.name for run in runs]
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


def draw_curves(runs: dict[str, list[dict]]):
    """A Figure with one panel per metric family present, one line per (run, metric); None when no run logged
    any of them. `runs`: label -> its metrics rows."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(title, keys) for title, keys in PANELS if any(k in row for rows in runs.values() for row in rows
                                                             for k in keys)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for label, rows in runs.items():
            for key in keys:
                steps, values = series(rows, key)
                if steps:
                    name = label if len(keys) == 1 else key if len(runs) == 1 else f"{label} {key}"
                    ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    _fix_margins(fig, left=0.75, right=0.2, hspace=0.55, wspace=0.3)
    return fig


def draw_timing(runs: dict[str, list[dict]]):
    """A Figure with one panel per run: seconds per step stacked by phase; None when no run logged a phase."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    stacks = {}
    for label, rows in runs.items():
        # In the order the step runs them (the order they were logged in).
        phases = list(dict.fromkeys(k for row in rows for k in row if k.startswith("timing/") and k not in NOT_A_PHASE))
        timed = [row for row in rows if any(row.get(p) is not None for p in phases)]
        if timed:
            stacks[label] = ([row["step"] for row in timed], phases,
                             [[row.get(p) or 0.0 for row in timed] for p in phases])
    if not stacks:
        return None
    fig, axes = plt.subplots(len(stacks), 1, figsize=(8, 3 * len(stacks)), squeeze=False)
    for ax, (label, (steps, phases, values)) in zip(axes.flat, stacks.items()):
        ax.stackplot(steps, values, labels=[p.split("/", 1)[1] for p in phases])
        ax.set_title(f"{label}: step time by phase")
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _fix_margins(fig, left=0.75, right=1.6, hspace=0.6, wspace=0.2)
    return fig


def _fix_margins(fig, left: float, right: float, hspace: float, wspace: float) -> None:
    """Margins in inches (titles, tick labels, a legend beside the axes), spacing as a fraction of a panel. Not
    tight_layout: measuring every label costs ~0.5 s of CPU, at the end of every job."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=0.55 / height, top=1 - 0.35 / height,
                        hspace=hspace, wspace=wspace)


def plot_runs(runs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Draw curves.png and timing.png for these runs into out_dir; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")        # files only: no display needed, none opened
    import matplotlib.pyplot as plt
    data = {label: read_rows(run) for label, run in zip(_labels(runs), runs)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("curves.png", draw_curves), ("timing.png", draw_timing)):
        fig = draw(data)
        if fig is not None:
            fig.savefig(out / name, dpi=80)
            plt.close(fig)
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-ray plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a job's --log_dir (holding metrics.jsonl)")
    parser.add_argument("--out", default=None,
                        help="where the PNGs go (default: RUN_DIR/plots for one run, ./plots for several)")
    args = parser.parse_args(argv)
    try:
        out = args.out or (metrics_file(args.runs[0]).parent / "plots" if len(args.runs) == 1 else Path("plots"))
        written = plot_runs(args.runs, out)
    except ValueError as exc:
        parser.error(str(exc))
    for path in written:
        print(f"plot -> {path}")
    return 0 if written else 1
