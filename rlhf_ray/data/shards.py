"""Tokenize and write one shard; run shards in this process or in a pool of worker processes (--num_proc).

Each worker receives the settings once (pool initializer; the tokenizer travels as a TokenEncoder, the bare Rust
tokenizer, so workers never import transformers), then for every shard it receives normalised records, tokenizes
them, writes the arrow shard and its JSONL preview itself, and sends back only counts — rows never travel back to
the parent. Workers are started with 'spawn': the parent may hold threads (Ray, arrow, tokenizers) that a fork
would copy in a broken state.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from rlhf_ray.data.encoder import TokenEncoder
from rlhf_ray.data.template import ConversationTemplate
from rlhf_ray.data.tokenize import IGNORE_INDEX, tokenize_records
from rlhf_ray.data.writer import write_shard


@dataclass(frozen=True)
class ShardSettings:
    """Everything a worker needs besides the records (picklable)."""

    kind: str
    encoder: TokenEncoder
    template: ConversationTemplate | None
    max_length: int | None
    out_dir: str
    write_jsonl: bool = True


@dataclass
class ShardResult:
    index: int
    kept: int
    dropped: Counter
    truncated: Counter
    tokens: int          # all tokens in kept rows (both sides for preference)
    max_tokens: int      # longest kept sequence
    labeled_tokens: int  # tokens the loss reads (labels != -100, or loss_mask == 1)


def _row_lengths(kind: str, row: dict) -> tuple[list[int], int]:
    if kind == "preference":
        lengths = [len(row["chosen_input_ids"]), len(row["rejected_input_ids"])]
        return lengths, sum(row["chosen_loss_mask"]) + sum(row["rejected_loss_mask"])
    labeled = sum(1 for x in row["labels"] if x != IGNORE_INDEX) if "labels" in row else 0
    return [len(row["input_ids"])], labeled


def process_shard(index: int, records: list[dict], settings: ShardSettings) -> ShardResult:
    """Tokenize `records`, write shard `index` under settings.out_dir, return its counts."""
    batch = tokenize_records(settings.kind, records, settings.encoder, settings.template, settings.max_length)
    write_shard(Path(settings.out_dir), index, settings.kind, batch.rows, settings.encoder, settings.write_jsonl)
    tokens = max_tokens = labeled = 0
    for row in batch.rows:
        lengths, row_labeled = _row_lengths(settings.kind, row)
        tokens += sum(lengths)
        max_tokens = max(max_tokens, *lengths)
        labeled += row_labeled
    return ShardResult(index, len(batch.rows), batch.dropped, batch.truncated, tokens, max_tokens, labeled)


# ---------------------------------------------------------------- worker processes

_WORKER: dict = {}


def _init_worker(settings: ShardSettings) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["settings"] = settings


def _run_in_worker(index: int, records: list[dict]) -> ShardResult:
    return process_shard(index, records, _WORKER["settings"])


def run_shards(chunks: list[list[dict]], settings: ShardSettings, num_proc: int,
               on_done: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
    """Process every chunk as one shard (index = position); in-process when num_proc == 1."""
    results: list[ShardResult] = []
    if num_proc <= 1 or len(chunks) <= 1:
        for index, chunk in enumerate(chunks):
            results.append(process_shard(index, chunk, settings))
            if on_done:
                on_done(results[-1])
        return results
    context = multiprocessing.get_context("spawn")
    workers = min(num_proc, len(chunks))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(settings,)) as pool:
        for result in _completed(pool.submit(_run_in_worker, i, chunk) for i, chunk in enumerate(chunks)):
            results.append(result)
            if on_done:
                on_done(result)
    return sorted(results, key=lambda r: r.index)


def _completed(futures) -> Iterator[ShardResult]:
    from concurrent.futures import as_completed

    for future in as_completed(list(futures)):
        yield future.result()


def split_chunks(records: list[dict], shard_size: int, num_proc: int) -> list[list[dict]]:
    """Consecutive chunks of at most shard_size records, small enough that every worker gets one."""
    if not records:
        return [[]]
    size = max(1, min(shard_size, -(-len(records) // max(1, num_proc))))
    return [records[i:i + size] for i in range(0, len(records), size)]
