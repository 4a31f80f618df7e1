"""Data for the RL tests: bundled arithmetic prompts, and preference pairs for a 'number-only' reward model.

Both go through `rlhf-ray prepare` (in-process), as a user's data would.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

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
    from rlhf_ray.data.synthetic import make_problems, prompt_rows, write_jsonl

    source = write_jsonl(prompt_rows(make_problems(count, seed=seed)), out.with_suffix(".jsonl"))
    return _prepare("prompt", source, tokenizer_dir, out)


def prepare_ptx(tokenizer_dir, out: Path, count: int = 256, seed: int = 7) -> Path:
    from rlhf_ray.data.synthetic import make_problems, ptx_rows, write_jsonl

    source = write_jsonl(ptx_rows(make_problems(count, seed=seed)), out.with_suffix(".jsonl"))
    return _prepare("ptx", source, tokenizer_dir, out)


def number_preference_rows(count: int, seed: int = 0, length: int = 4) -> list[dict]:
    """Pairs of random short responses where the chosen one has more number tokens than the rejected one: a
    reward model trained on them scores 'how much of the answer is a number', on responses that look like a
    randomly initialised policy's."""
    from rlhf_ray.data.synthetic import make_problems
    from rlhf_ray.models.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    texts = {i: tokenizer.decode([i]) for i in range(3, len(tokenizer))}
    digits = [i for i, t in texts.items() if t.strip() and re.fullmatch(r"\s*\d+\s*", t)]
    others = [i for i, t in texts.items() if t.strip() and i not in set(digits) and "\ufffd" not in t]
    rng = random.Random(seed)

    def response(number_tokens: int) -> str:
        ids = [rng.choice(digits) for _ in range(number_tokens)] + [rng.choice(others)
                                                                    for _ in range(length - number_tokens)]
        rng.shuffle(ids)
        return tokenizer.decode(ids).strip() or "x"

    rows = []
    for problem in make_problems(count, seed=seed + 11):
        chosen = rng.randint(1, length)
        rejected = rng.randint(0, chosen - 1)
        rows.append({"context": [{"from": "human", "content": problem.question}],
                     "chosen": [{"from": "assistant", "content": response(chosen)}],
                     "rejected": [{"from": "assistant", "content": response(rejected)}]})
    return rows


def prepare_number_preferences(tokenizer_dir, out: Path, count: int = 512) -> Path:
    from rlhf_ray.data.synthetic import write_jsonl

    source = write_jsonl(number_preference_rows(count), out.with_suffix(".jsonl"))
    return _prepare("preference", source, tokenizer_dir, out)
