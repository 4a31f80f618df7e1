"""Data preparation throughput: `rlhf-ray prepare` against plain `datasets.map` doing the same tokenization.

    python -m rlhf_ray.benchmarks.bench_prepare            # hh-rlhf preference + GSM8K sft with the real Qwen3 tokenizer
    python -m rlhf_ray.benchmarks.bench_prepare --quick    # 600 GSM8K rows (or synthetic rows with the tiny tokenizer)

Both sides start from the same converted records and a loaded tokenizer, and write arrow (no JSONL previews), so
the difference is the tokenization path (worker start-up included when num_proc > 1): prepare renders with the
conversation template, batch-encodes whole shards through the Rust tokenizer (in --num_proc worker processes),
masks with numpy; the baseline maps one row at a time through the HF tokenizer call (datasets.map, also with
num_proc). Outputs are compared row for row. Uses the real Qwen3 tokenizer
and hh-rlhf / GSM8K from ../shared when present, else the bundled tiny tokenizer and synthetic arithmetic data.
Prints rows/s and the ratio to `datasets.map (num_proc=1)`; writes <--out>/bench_prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(os.environ.get("RLHF_RAY_SHARED", "../shared"))     # beside a checkout, run from its root

from rlhf_ray.benchmarks import add_out_flag, write_report  # noqa: E402
from rlhf_ray.data.encoder import TokenEncoder  # noqa: E402
from rlhf_ray.data.formats import convert_row, iter_rows  # noqa: E402
from rlhf_ray.data.shards import ShardSettings, run_shards, split_chunks  # noqa: E402
from rlhf_ray.data.tokenize import IGNORE_INDEX, token_mask  # noqa: E402


def workloads(quick: bool) -> tuple[str, list[tuple[str, str, list[dict]]]]:
    """(tokenizer_dir, [(name, kind, records)]) from ../shared when present, else bundled data."""
    qwen3, hh, gsm8k = SHARED / "tokenizers" / "qwen3", SHARED / "data" / "hh-rlhf" / "harmless-base-1500.jsonl.gz", \
        SHARED / "data" / "gsm8k" / "train.jsonl"
    if qwen3.is_dir() and hh.is_file() and gsm8k.is_file():
        def convert(path, fmt, kind, limit):
            return [r for r, _ in (convert_row(fmt, row, w, kind) for w, row in iter_rows(path, limit)) if r]
        chosen = [("gsm8k-sft", "sft", convert(gsm8k, "gsm8k", "sft", 600 if quick else None))]
        if not quick:
            chosen.insert(0, ("hh-rlhf-preference", "preference", convert(hh, "hh_rlhf", "preference", None)))
        return str(qwen3), chosen
    from rlhf_ray.fixtures.demo_data import make_problems, sft_rows
    from rlhf_ray.fixtures.tiny import TOKENIZER_DIR

    rows = sft_rows(make_problems(600 if quick else 5000))
    return str(TOKENIZER_DIR), [("synthetic-sft", "sft", [convert_row("seed", r, "row", "sft")[0] for r in rows])]


def baseline_row(record: dict, kind: str, tokenizer, template) -> dict:
    """The plain way: one row, the HF tokenizer call with offsets, the same label rule."""
    def encode(messages, first_labeled):
        text, spans = template.render(messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        import numpy as np

        mask = token_mask(np.asarray(enc["offset_mapping"]).reshape(-1, 2), len(text),
                          [(s, e) for s, e, i in spans if i >= first_labeled])
        return enc["input_ids"], mask

    if kind == "sft":
        ids, mask = encode(record["messages"], 0)
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}
    row = {}
    for side in ("chosen", "rejected"):
        ids, mask = encode(record["context"] + record[side], len(record["context"]))
        row[f"{side}_input_ids"], row[f"{side}_loss_mask"] = ids, mask.astype(int).tolist()
    return row


def run_baseline(records, kind, tokenizer, template, num_proc, out: Path) -> tuple[float, object]:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    from rlhf_ray.data.writer import features_for

    disable_progress_bar()
    started = time.perf_counter()
    source = Dataset.from_list([{"record": json.dumps(r)} for r in records])
    mapped = source.map(lambda x: baseline_row(json.loads(x["record"]), kind, tokenizer, template),
                        remove_columns=["record"], num_proc=num_proc if num_proc > 1 else None,
                        features=features_for(kind))
    mapped.save_to_disk(str(out))
    return time.perf_counter() - started, mapped


def run_prepare(records, kind, tokenizer, template, num_proc, out: Path) -> tuple[float, object]:
    from rlhf_ray.data.loading import load_prepared

    started = time.perf_counter()
    settings = ShardSettings(kind, TokenEncoder(tokenizer), template, None, str(out), write_jsonl=False)
    run_shards(split_chunks(records, 10000, num_proc), settings, num_proc)
    seconds = time.perf_counter() - started
    return seconds, load_prepared(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="600 rows, one workload")
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2], help="worker counts to try")
    add_out_flag(parser)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from rlhf_ray.data.template_derive import derive_template

    tokenizer_dir, chosen = workloads(args.quick)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # loaded once, outside the timings
    template = derive_template(tokenizer, None, None, source="bench")
    results = {"tokenizer": tokenizer_dir, "quick": args.quick, "workloads": {}}
    scratch = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        for name, kind, records in chosen:
            timings, outputs = {}, {}
            for num_proc in args.num_proc:
                for label, fn in ((f"datasets.map (num_proc={num_proc})", run_baseline),
                                  (f"rlhf-ray prepare (num_proc={num_proc})", run_prepare)):
                    out = scratch / f"{name}-{len(timings)}"
                    seconds, dataset = fn(records, kind, tokenizer, template, num_proc, out)
                    timings[label], outputs[label] = seconds, dataset
            base = timings["datasets.map (num_proc=1)"]
            reference = outputs["datasets.map (num_proc=1)"].to_list()
            identical = all(d.to_list() == reference for d in outputs.values())
            entry = {"kind": kind, "rows": len(records), "outputs_identical": identical, "methods": {}}
            print(f"\n{name}: {len(records)} rows ({kind}), outputs identical: {identical}")
            for label, seconds in timings.items():
                entry["methods"][label] = {"seconds": round(seconds, 3), "rows_per_s": round(len(records) / seconds, 1),
                                           "speedup_vs_datasets_map_1": round(base / seconds, 2)}
                print(f"  {label:<34} {len(records) / seconds:9.1f} rows/s   x{base / seconds:5.2f}")
            results["workloads"][name] = entry
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_report(args.out, "bench_prepare.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
