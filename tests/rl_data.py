"""Data for the RL tests: bundled arithmetic prompts, and preference pairs for a 'number-only' reward model.

Both go through `rlhf-ray prepare` (in-process), as a user's data would.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.fixtures.demo_data import number_preference_rows

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = str(REPO / "rlhf_ray/assets/templates/tiny.json")
REWARD_FN = f"{REPO / 'rlhf_ray/assets/rewards/number_only.py'}:number_only"


def _prepare(kind: str, source: Path, tokenizer_dir, out: Path) -> Path:
    from rlhf_ray.pipelines import prepare

    assert prepare.main(["--type", kind, "--input", str(source), "--tokenizer_dir", str(tokenizer_dir),
                         "--conversation_template_config", TEMPLATE, "--output", str(out), "--max_length", "64",
                         "--write_jsonl", "false"]) == 0
    return out


def prepare_prompts(tokenizer_dir, out: Path, count: int = 256, seed: int = 5) -> Path:
    from rlhf_ray.fixtures.demo_data import make_problems, prompt_rows, write_jsonl

    source = write_jsonl(prompt_rows(make_problems(count, seed=seed)), out.with_suffix(".jsonl"))
    return _prepare("prompt", source, tokenizer_dir, out)


def prepare_ptx(tokenizer_dir, out: Path, count: int = 256, seed: int = 7) -> Path:
    from rlhf_ray.fixtures.demo_data import make_problems, ptx_rows, write_jsonl

    source = write_jsonl(ptx_rows(make_problems(count, seed=seed)), out.with_suffix(".jsonl"))
    return _prepare("ptx", source, tokenizer_dir, out)


def prepare_number_preferences(tokenizer_dir, out: Path, count: int = 512) -> Path:
    from rlhf_ray.fixtures.demo_data import write_jsonl

    source = write_jsonl(number_preference_rows(count), out.with_suffix(".jsonl"))
    return _prepare("preference", source, tokenizer_dir, out)
