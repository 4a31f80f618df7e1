"""Prepared arrow data for the sft / rm / dpo / trainer tests: bundled synthetic rows run through the real
`rlhf-ray prepare` with the bundled tiny tokenizer. Imported by those test modules (not collected itself)."""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf_ray.fixtures import demo_data
from rlhf_ray.fixtures.tiny import TOKENIZER_DIR

TEMPLATE = Path(demo_data.__file__).resolve().parent.parent / "assets" / "templates" / "tiny.json"


def prepare(rows: list[dict], kind: str, out_dir: Path, max_length: int = 128) -> Path:
    """Write rows as JSONL and run `rlhf-ray prepare --type kind` on them; return the output directory."""
    from rlhf_ray.pipelines.prepare import main as prepare_main

    if (out_dir / "summary.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    source = demo_data.write_jsonl(rows, out_dir.with_suffix(".jsonl"))
    template = out_dir.parent / "tiny-template.json"
    if not template.exists():
        shutil.copy(TEMPLATE, template)   # prepare may write derived fields back; never touch the bundled file
    status = prepare_main(["--type", kind, "--input", str(source), "--tokenizer_dir", str(TOKENIZER_DIR),
                           "--conversation_template_config", str(template), "--output", str(out_dir),
                           "--max_length", str(max_length), "--write_jsonl", "false"])
    assert status == 0, f"prepare --type {kind} failed with status {status}"
    return out_dir


def problem_splits(n_train: int, n_eval: int, seed: int) -> tuple[list, list]:
    problems = demo_data.make_problems(n_train + n_eval, seed=seed)
    return problems[:n_train], problems[n_train:]


def sft_data(root: Path, n_train: int = 192, n_eval: int = 64) -> tuple[Path, Path]:
    train, held_back = problem_splits(n_train, n_eval, seed=11)
    return (prepare(demo_data.sft_rows(train), "sft", root / "sft-train"),
            prepare(demo_data.sft_rows(held_back), "sft", root / "sft-eval"))


def verifiable_pairs(root: Path, n_train: int = 512, n_eval: int = 128) -> tuple[Path, Path]:
    """Train and held-back pairs drawn with different seeds (a question may recur; its wrong answer is fresh)."""
    return (prepare(demo_data.verifiable_preference_rows(n_train, seed=1), "preference", root / "pairs-train"),
            prepare(demo_data.verifiable_preference_rows(n_eval, seed=2), "preference", root / "pairs-eval"))
