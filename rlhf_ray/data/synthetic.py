"""Bundled demo data: small arithmetic tasks in the seed's input formats, generated deterministically.

Nothing is downloaded: `make demo` and the tests write these files and run every stage on them. Each problem has a
verifiable answer, so the same generator gives SFT conversations, preference pairs (true answer vs a perturbed
one), RL prompts with a label for rule rewards, and ptx (pretraining) rows.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

SYSTEM_HINT = "Answer with the number only."


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int


def make_problems(n: int, seed: int = 0, max_operand: int = 20) -> list[Problem]:
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        answer = a + b if op == "+" else a - b
        problems.append(Problem(f"What is {a} {op} {b}?", answer))
    return problems


def _perturb(answer: int, rng: random.Random) -> int:
    delta = rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return answer + delta


def sft_rows(problems: list[Problem]) -> list[dict]:
    return [{"messages": [{"from": "human", "content": p.question}, {"from": "assistant", "content": str(p.answer)}]}
            for p in problems]


def preference_rows(problems: list[Problem], seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 1)
    return [{"context": [{"from": "human", "content": p.question}],
             "chosen": [{"from": "assistant", "content": str(p.answer)}],
             "rejected": [{"from": "assistant", "content": str(_perturb(p.answer, rng))}]}
            for p in problems]


def verifiable_preference_rows(n: int, seed: int = 0, max_operand: int = 5) -> list[dict]:
    """Pairs judged by consistency, which a tiny model can learn by copying rather than by doing arithmetic.

    Both responses show the same worked line ("3 + 5 = 8."); the chosen one ends with that result ("The answer is
    8."), the rejected one with a different number drawn uniformly from the same range ("The answer is 11."). A
    reward model only has to check that the final number repeats the one after "=" (a GSM8K-like "the final answer
    matches the work" check). Sums of operands in 0..max_operand (up to 20) keep every number one token of the
    bundled tokenizer (" 0" .. " 40"), so the two numbers sit at a fixed distance in every row. The default range
    (sums 0..10) lets the tiny 'debug' model learn the check in ~150 steps; wider ranges need more steps.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        answer = a + b
        wrong = rng.choice([x for x in range(0, 2 * max_operand + 1) if x != answer])
        work = f"{a} + {b} = {answer}."
        rows.append({"context": [{"from": "human", "content": f"What is {a} + {b}?"}],
                     "chosen": [{"from": "assistant", "content": f"{work} The answer is {answer}."}],
                     "rejected": [{"from": "assistant", "content": f"{work} The answer is {wrong}."}]})
    return rows


def prompt_rows(problems: list[Problem]) -> list[dict]:
    return [{"messages": [{"from": "human", "content": p.question}], "label": str(p.answer)} for p in problems]


def ptx_rows(problems: list[Problem]) -> list[dict]:
    return [{"source": p.question, "target": f" {p.answer}"} for p in problems]


def number_preference_rows(count: int, seed: int = 0, length: int = 4) -> list[dict]:
    """Pairs of random short responses where the chosen one has more number tokens than the rejected one: a
    reward model trained on them scores 'how much of the answer is a number', on responses that look like a
    randomly initialised policy's."""
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


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def write_demo_data(out_dir: str | Path, n: int = 512, seed: int = 0) -> dict[str, Path]:
    """Write sft/preference/prompt/ptx JSONL files (disjoint problem sets per stage) and return their paths."""
    out_dir = Path(out_dir)
    problems = make_problems(4 * n, seed=seed)
    chunks = [problems[i * n:(i + 1) * n] for i in range(4)]
    return {
        "sft": write_jsonl(sft_rows(chunks[0]), out_dir / "sft.jsonl"),
        "preference": write_jsonl(preference_rows(chunks[1], seed), out_dir / "preference.jsonl"),
        "prompt": write_jsonl(prompt_rows(chunks[2]), out_dir / "prompt.jsonl"),
        "ptx": write_jsonl(ptx_rows(chunks[3]), out_dir / "ptx.jsonl"),
    }
