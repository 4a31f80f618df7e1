"""Write prepared rows: arrow shards, JSONL previews with decoded text, and an atomic output directory.

    <output>/arrow/part-00000      Dataset.save_to_disk of one shard (datasets.load_from_disk opens it)
    <output>/jsonl/part-00000.jsonl  the same rows, each with its decoded text first, for reading by eye
    <output>/summary.json          written last

Everything is written into a temporary sibling directory that is renamed to <output> at the end, so a crash never
leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from rlhf_ray.data.encoder import TokenEncoder
from rlhf_ray.data.tokenize import IGNORE_INDEX


def features_for(kind: str):
    """Arrow schema per --type (int32 ids, int8 masks): the column contract in loading.COLUMNS."""
    from datasets import Features, Sequence, Value

    ids, flags = Sequence(Value("int32")), Sequence(Value("int8"))
    if kind in ("sft", "ptx"):
        return Features({"input_ids": ids, "attention_mask": flags, "labels": ids})
    if kind == "preference":
        return Features({"chosen_input_ids": ids, "chosen_loss_mask": flags,
                         "rejected_input_ids": ids, "rejected_loss_mask": flags})
    if kind == "prompt":
        return Features({"input_ids": ids, "gt_answer": Value("string")})
    raise ValueError(f"unknown type {kind!r}")


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def _segments(encoder: TokenEncoder, ids: list[int], mask) -> list[str]:
    """Decoded runs of consecutive masked tokens (each assistant turn, as the loss sees it)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [encoder.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def preview_row(kind: str, row: dict, encoder: TokenEncoder) -> dict:
    """The row with decoded text first: what the model reads and, per turn, what the loss is on."""
    decode = encoder.decode
    if kind in ("sft", "ptx"):
        mask = [label != IGNORE_INDEX for label in row["labels"]]
        shown = {"text": decode(row["input_ids"]), "labeled": _segments(encoder, row["input_ids"], mask)}
    elif kind == "preference":
        shown = {}
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_input_ids"]
            shown[f"{side}_text"] = decode(ids)
            shown[f"{side}_labeled"] = _segments(encoder, ids, row[f"{side}_loss_mask"])
    else:
        shown = {"text": decode(row["input_ids"])}
    return {**shown, **row}


def write_shard(out_dir: Path, index: int, kind: str, rows: list[dict], encoder: TokenEncoder, write_jsonl: bool
                ) -> None:
    """One arrow shard (and its JSONL preview) from rows in the column contract."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per shard is noise; prepare shows its own
    features = features_for(kind)
    columns = {name: [row[name] for row in rows] for name in features}
    Dataset.from_dict(columns, features=features).save_to_disk(str(out_dir / "arrow" / shard_name(index)))
    if write_jsonl:
        jsonl_dir = out_dir / "jsonl"
        jsonl_dir.mkdir(parents=True, exist_ok=True)
        with (jsonl_dir / f"{shard_name(index)}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(preview_row(kind, row, encoder), ensure_ascii=False) + "\n")


def is_prepare_output(path: Path) -> bool:
    """True when `path` holds the summary.json that `rlhf-ray prepare` writes last (its output, complete)."""
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"type", "input_rows", "kept"} <= set(summary)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to replace an existing, non-empty output unless asked to, and with --overwrite anything but an
    earlier prepare output (before any work is done)."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if not overwrite:
        raise ValueError(f"--output {output} already exists; pass --overwrite to replace it, or choose another "
                         f"directory")
    if not output.is_dir() or not is_prepare_output(output):
        raise ValueError(f"--output {output} exists and is not the output of an earlier `rlhf-ray prepare` (no "
                         f"summary.json of one), so --overwrite will not delete it; choose a new or empty directory")


@contextmanager
def atomic_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; on success it replaces `output` in one rename.

    On any exception the temporary directory is removed and `output` is left as it was.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_output(output, overwrite)
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_summary(out_dir: Path, summary: dict) -> Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return path
