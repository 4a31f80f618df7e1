"""`rlhf-ray prepare`: tokenize conversations into arrow shards for sft, preference, prompt or ptx training.

    rlhf-ray prepare --type sft --input data/sft.jsonl --tokenizer_dir MODEL \\
        --conversation_template_config rlhf_ray/assets/templates/tiny.json --output runs/data/sft --max_length 512

Data flow:

    input files (.json / .jsonl / .gz)          read row by row; --format auto detects the format per file
      -> converters (formats.py)                 malformed rows stop the run with file:line:field;
                                                 data-set quirks drop the row with a named reason
      -> chunks of records -> --num_proc workers each renders with the conversation template, tokenizes with
                                                 offsets, masks labels, applies the length policy, writes its shard
      -> <output>/arrow, /jsonl, summary.json    (temporary directory renamed into place at the end)

summary.json accounts for every input row: input_rows == kept + sum(dropped.values()); truncated rows are kept
(and only kept rows are counted as truncated). Input with no rows left writes nothing and fails; --overwrite
replaces only an earlier prepare output; --num_proc is capped at the rows and the CPU cores, with a note.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rlhf_ray.config.base import JobConfig, Section, run_cli

DataType = Literal["sft", "preference", "prompt", "ptx"]
InputFormat = Literal["auto", "seed", "hh_rlhf", "gsm8k", "sharegpt"]


class PrepareSection(Section):
    """What to read, how to cut it, where to write."""

    type: DataType | None = Field(None, description="required: what the rows are for: sft, preference (rm/dpo), "
                                                    "prompt (ppo/grpo), ptx")
    input: list[str] | None = Field(None, description="required: input files (.json array, .jsonl, optionally .gz) "
                                                      "or directories of them")
    output: str | None = Field(None, description="required: output directory (arrow/, jsonl/, summary.json); "
                                                 "written atomically")
    format: InputFormat = Field("auto", description="input format: seed, hh_rlhf, gsm8k, sharegpt; auto detects it "
                                                    "per file from the first row")
    max_length: int | None = Field(4096, ge=8, description="longest sequence in tokens; see docs/prepare.md for "
                                                           "what is cut and what is dropped per type")
    max_rows: int | None = Field(None, ge=1, description="read at most this many rows from each input file")
    num_proc: int = Field(1, ge=1, description="tokenization worker processes")
    shard_size: int = Field(10000, ge=1, description="rows per arrow shard (smaller when needed to feed num_proc)")
    write_jsonl: bool = Field(True, description="also write jsonl/ previews with decoded text")
    overwrite: bool = Field(False, description="replace an existing --output directory")

    @model_validator(mode="after")
    def _required(self):
        for name, example in (("type", "sft"), ("input", "data.jsonl"), ("output", "runs/data/sft")):
            if getattr(self, name) is None:
                raise ValueError(f"--{name} is required (e.g. --{name} {example})")
        return self


class TokenizerSection(Section):
    """Tokenizer and conversation template."""

    tokenizer_dir: str | None = Field(None, description="required: HF tokenizer directory (a model directory works)")
    conversation_template_config: str | None = Field(
        None, description="JSON with chat_template and system_message; the role markers are derived and written "
                          "back. Default: derive from the tokenizer's own template and write nothing")

    @model_validator(mode="after")
    def _required(self):
        if self.tokenizer_dir is None:
            raise ValueError("--tokenizer_dir is required (e.g. --tokenizer_dir rlhf_ray/assets/tiny-tokenizer)")
        return self


class PrepareConfig(JobConfig):
    prepare: PrepareSection
    tokenizer: TokenizerSection

    # the seed's (ColossalChat prepare_dataset.py) names for the same settings
    aliases = {"num_samples_per_datafile": "prepare.max_rows", "data_input_dirs": "prepare.input"}

    @model_validator(mode="before")
    @classmethod
    def _every_section(cls, data):
        # absent sections are validated as empty ones, so a missing flag is named as the flag
        return {"prepare": {}, "tokenizer": {}, **data} if isinstance(data, dict) else data


def load_tokenizer(tokenizer_dir: str):
    from rlhf_ray.data.tokenizer_loader import load_tokenizer as load

    if not Path(tokenizer_dir).is_dir():
        raise ValueError(f"--tokenizer_dir {tokenizer_dir}: no such directory (give a HF tokenizer or model directory)")
    return load(tokenizer_dir)


def resolve_template(config: PrepareConfig, tokenizer):
    """The conversation template (None for ptx, which is plain text)."""
    from rlhf_ray.data.template import load_template
    from rlhf_ray.data.template_derive import derive_template
    from rlhf_ray.pipelines.model_checks import check_chat_template

    if config.prepare.type == "ptx":
        return None
    path = config.tokenizer.conversation_template_config
    if path:
        return load_template(path, tokenizer)
    check_chat_template(tokenizer, config.tokenizer.tokenizer_dir, None)
    return derive_template(tokenizer, None, None, source=f"the chat template of {config.tokenizer.tokenizer_dir}")


def read_records(config: PrepareConfig) -> tuple[list[dict], dict]:
    """Read and convert every input row. Returns (records, accounting) with per-file formats and drop counts."""
    from rlhf_ray.data.formats import check_format_makes, convert_row, detect_format, expand_inputs, iter_rows

    kind = config.prepare.type
    records: list[dict] = []
    dropped, files = Counter(), []
    for path in expand_inputs(config.prepare.input):
        fmt, rows = config.prepare.format, 0
        for where, row in iter_rows(path, config.prepare.max_rows):
            if fmt == "auto":
                fmt = detect_format(row, where, kind)
                print(f"{path}: format {fmt} (detected from the keys of its first row; --format sets it)")
            if rows == 0:
                check_format_makes(fmt, kind, str(path))
            rows += 1
            record, reason = convert_row(fmt, row, where, kind)
            if record is None:
                dropped[reason] += 1
                continue
            if reason:
                record["note"] = reason     # counted as truncated only if tokenization keeps the row
            records.append(record)
        files.append({"path": str(path), "format": fmt, "rows": rows})
    return records, {"files": files, "dropped": dropped}


def prepare_dataset(config: PrepareConfig) -> dict:
    """Run the whole preparation; return the summary that is also written to <output>/summary.json."""
    from rlhf_ray.data.encoder import TokenEncoder
    from rlhf_ray.data.shards import ShardSettings, run_shards, split_chunks
    from rlhf_ray.data.writer import atomic_output, check_output, write_summary
    from rlhf_ray.telemetry.progress import progress

    started = time.perf_counter()
    opts = config.prepare
    output = Path(opts.output)
    check_output(output, opts.overwrite)
    check_inputs_outside(opts.input, output)
    records, accounting = read_records(config)  # first: bad input fails fast, before transformers is imported
    input_rows = sum(f["rows"] for f in accounting["files"])
    dropped, truncated = accounting["dropped"], Counter()
    check_rows_left(input_rows, len(records), dropped, "reading")
    tokenizer = load_tokenizer(config.tokenizer.tokenizer_dir)
    template = resolve_template(config, tokenizer)
    num_proc = clamp_num_proc(opts.num_proc, len(records))

    with atomic_output(output, opts.overwrite) as tmp:
        settings = ShardSettings(opts.type, TokenEncoder(tokenizer), template, opts.max_length, str(tmp),
                                 opts.write_jsonl)
        chunks = split_chunks(records, opts.shard_size, num_proc)
        bar = progress(total=len(records), desc=f"prepare {opts.type}", unit="rows")
        results = run_shards(chunks, settings, num_proc, on_done=lambda r: bar.update(len(chunks[r.index])))
        bar.close()
        kept = sum(r.kept for r in results)
        for r in results:
            dropped.update(r.dropped)
            truncated.update(r.truncated)
        check_rows_left(input_rows, kept, dropped, "tokenization")   # raising here leaves --output as it was
        tokens = sum(r.tokens for r in results)
        seconds = time.perf_counter() - started
        summary = {
            "type": opts.type,
            "input_rows": input_rows,
            "kept": kept,
            "dropped": dict(sorted(dropped.items())),
            "truncated": dict(sorted(truncated.items())),
            "shards": len(results),
            "files": accounting["files"],
            "tokens": {"total": tokens, "max": max((r.max_tokens for r in results), default=0),
                       "mean": round(tokens / max(1, kept * (2 if opts.type == "preference" else 1)), 2),
                       "labeled": sum(r.labeled_tokens for r in results)},
            "max_length": opts.max_length,
            "tokenizer_dir": str(Path(config.tokenizer.tokenizer_dir).resolve()),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "template": template.to_config() if template else None,
            "num_proc": num_proc,
            "seconds": round(seconds, 3),
            "rows_per_second": round(input_rows / seconds, 1) if seconds > 0 else None,
        }
        if input_rows != kept + sum(dropped.values()):  # an internal invariant, never a user error
            raise AssertionError(f"row accounting is off: {input_rows} input != {kept} kept + {dict(dropped)} dropped")
        write_summary(tmp, summary)
    print_summary(summary, output)
    return summary


def check_inputs_outside(inputs: list[str], output: Path) -> None:
    """Replacing --output must never delete an input."""
    out = output.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == out or out in path.parents:
            raise ValueError(f"--output {output} is or contains --input {item}; writing it would replace the "
                             f"input. Choose an --output directory apart from the inputs")


def check_rows_left(input_rows: int, kept: int, dropped: Counter, stage: str) -> None:
    """A dataset with no rows cannot be trained on: say why there are none, and write nothing."""
    if kept:
        return
    if not input_rows:
        raise ValueError("--input holds no rows (the files are empty or whitespace only); nothing was written")
    reasons = ", ".join(f"{reason}: {count}" for reason, count in dropped.most_common())
    raise ValueError(f"all {input_rows} input rows were dropped during {stage} ({reasons}); nothing was written. "
                     f"See docs/prepare.md for each reason (e.g. raise --max_length, or check --type and --format)")


def clamp_num_proc(num_proc: int, rows: int) -> int:
    """No more worker processes than rows or CPU cores (more would only start idle processes and tiny shards)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    used = max(1, min(num_proc, rows, cores))
    if used != num_proc:
        print(f"note: --num_proc {num_proc} is more than the {rows} rows or {cores} CPU cores here; using {used}")
    return used


def print_summary(summary: dict, output: Path) -> None:
    kept, total = summary["kept"], summary["input_rows"]
    n_dropped, n_truncated = sum(summary["dropped"].values()), sum(summary["truncated"].values())
    print(f"prepared {summary['type']}: {total} input rows -> {kept} kept ({n_truncated} of them truncated), "
          f"{n_dropped} dropped, in {summary['seconds']:.1f}s")
    for label, counts in (("dropped", summary["dropped"]), ("truncated", summary["truncated"])):
        for reason, count in counts.items():
            print(f"  {label:<9} {reason:<34} {count}")
    tokens = summary["tokens"]
    print(f"  tokens    mean {tokens['mean']}, max {tokens['max']}, labeled {tokens['labeled']} of {tokens['total']}")
    print(f"  output    {output} ({summary['shards']} shards; summary.json beside them)")


def run(config: PrepareConfig) -> int:
    """User errors (bad input, bad template config) print one message and exit 1, without a traceback."""
    try:
        prepare_dataset(config)
    except ValueError as exc:
        if os.environ.get("RLHF_RAY_DEBUG"):
            raise
        print(f"rlhf-ray prepare: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PrepareConfig, run, argv, prog="rlhf-ray prepare", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
