"""Open the output of `rlhf-ray prepare` as one `datasets.Dataset` (load_prepared), or as plain rows read with
pyarrow alone (load_prepared_rows: for a driver that needs only the rows, and not `datasets`' ~0.7 s import).

A prepare output directory looks like

    <dir>/summary.json                 counts (input = kept + dropped), settings, token statistics
    <dir>/arrow/part-00000 ...         shards, each written with Dataset.save_to_disk
    <dir>/jsonl/part-00000.jsonl ...   the same rows with decoded text, for reading by eye

`summary.json` is written last, inside a temporary directory that is renamed into place, so a directory that has
it is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

# The column contract of prepared rows, per --type. Trainers, collators and the rollout code rely on it.
COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("input_ids", "attention_mask", "labels"),
    "preference": ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"),
    "prompt": ("input_ids", "gt_answer"),
    "ptx": ("input_ids", "attention_mask", "labels"),
}
SUMMARY_FILE = "summary.json"


def _as_dirs(path: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(path, (str, Path)):
        return [Path(path)]
    dirs = [Path(p) for p in path]
    if not dirs:
        raise ValueError("load_prepared got an empty list of directories")
    return dirs


def _shard_paths(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        raise ValueError(f"prepared data directory {str(data_dir)!r} does not exist; "
                         f"create it with `rlhf-ray prepare --type ... --output {data_dir}`")
    arrow_dir = data_dir / "arrow"
    if not arrow_dir.is_dir() and data_dir.name == "arrow":
        arrow_dir = data_dir  # the user pointed at <dir>/arrow itself
    shards = sorted(p for p in arrow_dir.glob("part-*") if p.is_dir()) if arrow_dir.is_dir() else []
    if not shards:
        raise ValueError(f"{str(data_dir)!r} holds no arrow shards (expected {arrow_dir}/part-00000 ...); "
                         f"is it the --output of `rlhf-ray prepare`, and did that run finish?")
    return shards


def load_summary(path: str | Path) -> dict:
    """The summary.json of one prepare output directory ({} when absent, e.g. data written by other tools)."""
    path = Path(path)
    if path.name == "arrow":
        path = path.parent
    summary_file = path / SUMMARY_FILE
    if not summary_file.is_file():
        return {}
    return json.loads(summary_file.read_text())


def check_columns(column_names: Iterable[str], kind: str, where: str) -> None:
    """Raise ValueError naming `where`, the missing column and the fix when rows lack the columns of `kind`."""
    if kind not in COLUMNS:
        raise ValueError(f"kind={kind!r} is not a prepared data type; expected one of {sorted(COLUMNS)}")
    present = set(column_names)
    missing = [c for c in COLUMNS[kind] if c not in present]
    if missing:
        raise ValueError(f"{where}: column {missing[0]!r} is missing for {kind} data (it has {sorted(present)}); "
                         f"was it prepared with --type {kind}? Re-run `rlhf-ray prepare --type {kind} ...`")


def _checked_shards(path, kind: str | None) -> Iterable[tuple[Path, dict, Path, Callable[[Iterable[str]], None]]]:
    """(directory, its summary, shard, check of the shard's columns) for every shard of every directory, in order."""
    if kind is not None and kind not in COLUMNS:
        raise ValueError(f"kind={kind!r} is not a prepared data type; expected one of {sorted(COLUMNS)}")
    for data_dir in _as_dirs(path):
        summary = load_summary(data_dir)
        prepared_as = summary.get("type")
        hint = f" (summary.json says --type {prepared_as})" if prepared_as else ""

        def check(columns, where=f"{data_dir}{hint}") -> None:
            if kind is not None:
                check_columns(columns, kind, where)

        for shard in _shard_paths(data_dir):
            yield data_dir, summary, shard, check


def load_prepared(path: str | Path | Iterable[str | Path], kind: str | None = None):
    """Concatenate the arrow shards of one or more prepare output directories into one `datasets.Dataset`.

    Args:
        path: a prepare --output directory, or a list of them (rows keep the order given).
        kind: 'sft' | 'preference' | 'prompt' | 'ptx'; when given, every directory must have that type's columns
            (ValueError naming the directory, the missing column and the fix otherwise).
    Returns:
        a Dataset whose `info.description` holds the JSON of the first directory's summary.json.
    """
    from datasets import concatenate_datasets, load_from_disk

    parts, summaries = [], []
    for _, summary, shard, check in _checked_shards(path, kind):
        summaries.append(summary)
        dataset = load_from_disk(str(shard))
        check(dataset.column_names)
        parts.append(dataset)
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets([p for p in parts if len(p)] or parts[:1])
    if summaries[0]:
        dataset.info.description = json.dumps(summaries[0])
    return dataset


def load_prepared_rows(path: str | Path | Iterable[str | Path], kind: str | None = None) -> list[dict]:
    """The rows of `load_prepared(path, kind)` as dicts, in the same order, with the same checks and messages.

    A shard is what Dataset.save_to_disk wrote: arrow stream files listed in its state.json. One without that list
    (written some other way) is read through `datasets`."""
    import pyarrow as pa

    rows: list[dict] = []
    for _, _, shard, check in _checked_shards(path, kind):
        try:
            files = [entry["filename"] for entry in json.loads((shard / "state.json").read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            from datasets import load_from_disk

            dataset = load_from_disk(str(shard))
            check(dataset.column_names)
            rows.extend(dataset.to_list())
            continue
        tables = [pa.ipc.open_stream(pa.memory_map(str(shard / name))).read_all() for name in files]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        check(table.column_names)
        rows.extend(table.to_pylist())
    return rows
