"""Read input files (JSON array or JSONL, optionally .gz) and convert rows to normalised records.

Formats (`--format`, or `auto`: detected from the first row's keys, and printed):

    seed       the seed's formats, by --type:
                 sft, prompt   {"messages": [{"from": "human"|"assistant", "content": ...}, ...], "label"?: ...}
                 preference    {"context": [...], "chosen": [...], "rejected": [...]}
                 ptx           {"source": ..., "target": ...}
    hh_rlhf    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}  -> preference, sft, prompt
    gsm8k      {"question": ..., "answer": "... #### 72"}                      -> prompt (+gt_answer), sft, ptx
    sharegpt   {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]} -> sft, prompt

Normalised records (plain dicts, cheap to pickle to tokenization workers):

    conversation  {"messages": [(role, content), ...], "gt_answer": str | None}   roles: system, human, assistant
    preference    {"context": [...], "chosen": [...], "rejected": [...]}
    ptx           {"source": str, "target": str}

Malformed input (bad JSON, missing keys, wrong types, unknown roles, empty content, turns out of order in the
seed format) raises InputError naming the file, line and field. Quirks of public data sets that a user cannot fix
(an empty hh-rlhf response, two assistant turns in a row) and pairs with nothing to learn (chosen equal to
rejected, a side ending on a human turn) drop the row with a named reason instead; every drop is counted in
summary.json. A file that cannot be read or decoded names the line where that starts.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from rlhf_ray.data.template import ASSISTANT, HUMAN, SYSTEM

TYPES = ("sft", "preference", "prompt", "ptx")
FORMATS = ("auto", "seed", "hh_rlhf", "gsm8k", "sharegpt")
SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "assistant": ASSISTANT, "gpt": ASSISTANT, "system": SYSTEM}


class InputError(ValueError):
    """Bad user input: names the file, the line (or array item) and the field."""

    def __init__(self, where: str, field: str | None, problem: str):
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {f'field {field!r}: ' if field else ''}{problem}")


# ---------------------------------------------------------------- files


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, and the .json/.jsonl(.gz) files inside directories (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise ValueError(f"--input {item}: the directory holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"--input {item}: no such file or directory")
    return files


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _numbered_lines(path: Path, handle) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line); a file that cannot be read or decoded past some line names that line."""
    number = 0
    while True:
        try:
            raw = handle.readline()
        except (OSError, EOFError, zlib.error) as exc:   # a .gz cut short (partial download) or corrupted
            raise InputError(f"{path}: line {number + 1}", None, f"cannot read the file from here on ({exc}); it is "
                             f"truncated or corrupt (`gzip -t {path}` checks a .gz file): download or write it "
                             f"again") from None
        if not raw:
            return
        number += 1
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: line {number}", None, f"not valid UTF-8 (byte {exc.start + 1} of the line is "
                             f"{raw[exc.start:exc.start + 1]!r}); save the file as UTF-8") from None


def iter_rows(path: Path, max_rows: int | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) with where = 'FILE: line N' (JSONL) or 'FILE: item N' (JSON array), N from 1."""
    with _open_binary(path) as handle:
        lines = _numbered_lines(path, handle)
        for first_number, first in lines:
            if first.strip():
                break
        else:
            return                                        # empty or whitespace only: no rows
        if first.lstrip().startswith("["):
            try:
                rows = json.loads(first + "".join(line for _, line in lines))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {exc.lineno + first_number - 1}", None, f"not valid JSON ({exc.msg})"
                                 ) from None
            for index, row in enumerate(rows[:max_rows] if max_rows else rows, start=1):
                yield f"{path}: item {index}", row
            return
        count = 0
        for number, line in itertools.chain([(first_number, first)], lines):
            if not line.strip():
                continue
            if max_rows is not None and count >= max_rows:
                return
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {number}", None, f"not valid JSON ({exc.msg} at column {exc.colno})"
                                 ) from None
            count += 1
            yield f"{path}: line {number}", row


# ---------------------------------------------------------------- detection


def detect_format(row: Any, where: str, kind: str) -> str:
    """Guess the format of a row from its keys (auto mode)."""
    if not isinstance(row, dict):
        raise InputError(where, None, f"expected a JSON object per row, got {type(row).__name__}")
    keys = set(row)
    if "messages" in keys or {"context", "chosen", "rejected"} <= keys or {"source", "target"} <= keys:
        return "seed"
    if {"chosen", "rejected"} <= keys and isinstance(row["chosen"], str):
        return "hh_rlhf"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "conversations" in keys:
        return "sharegpt"
    raise InputError(where, None, f"cannot tell the format from the keys {sorted(keys)}; expected messages / "
                                  f"context+chosen+rejected / source+target (seed), chosen+rejected text (hh_rlhf), "
                                  f"question+answer (gsm8k) or conversations (sharegpt); or pass --format")


# ---------------------------------------------------------------- field checks


def _get(row: Any, key: str, where: str, types: type | tuple = str, field: str | None = None) -> Any:
    if not isinstance(row, dict):
        raise InputError(where, field, f"expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise InputError(where, field or key, f"missing key {key!r} (the row has {sorted(row)})")
    value = row[key]
    if not isinstance(value, types):
        expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise InputError(where, field or key, f"expected {expected}, got {type(value).__name__} {value!r:.60}")
    return value


def parse_messages(value: Any, where: str, field: str, role_key: str = "from", content_key: str = "content"
                   ) -> list[tuple[str, str]]:
    """A list of {"from", "content"} dicts (also {"role", ...} or {..., "value"}) -> [(role, content)]."""
    if not isinstance(value, list) or not value:
        raise InputError(where, field, f"expected a non-empty list of messages, got {value!r:.60}")
    messages = []
    for i, item in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise InputError(where, at, f"expected an object with {role_key!r} and {content_key!r}, got {item!r:.60}")
        rkey = role_key if role_key in item else ("role" if "role" in item else role_key)
        ckey = content_key if content_key in item else ("value" if "value" in item else content_key)
        role = _get(item, rkey, where, str, f"{at}.{rkey}")
        content = _get(item, ckey, where, str, f"{at}.{ckey}")
        if role.lower() not in ROLE_ALIASES:
            raise InputError(where, f"{at}.{rkey}", f"unknown role {role!r}; expected human or assistant (also "
                                                    f"user, gpt), or system as the first message")
        if not content.strip():
            raise InputError(where, f"{at}.{ckey}", "empty content")
        messages.append((ROLE_ALIASES[role.lower()], content))
    return messages


def alternation_problem(messages: list[tuple[str, str]], field: str, offset: int = 0) -> str | None:
    """None when roles go (system) human assistant human ...; else which message breaks the order."""
    expected = HUMAN
    for i, (role, _) in enumerate(messages):
        if role == SYSTEM and i + offset == 0:
            continue
        if role != expected:
            return f"{field}[{i}] is {role}, expected {expected} (turns alternate human/assistant, starting with human)"
        expected = ASSISTANT if expected == HUMAN else HUMAN
    return None


def _label(row: dict, where: str) -> str | None:
    for key in ("gt_answer", "label"):
        if key in row and row[key] is not None:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise InputError(where, key, f"expected a string or number, got {type(value).__name__}")
            return str(value)
    return None


# ---------------------------------------------------------------- converters: row -> (record, note) | (None, reason)


Converted = tuple[dict | None, str | None]  # (record, truncation reason) or (None, drop reason)


def _conversation_record(messages, kind: str, gt_answer: str | None) -> Converted:
    """SFT keeps conversations ending with the assistant; prompts end with the human turn."""
    note = None
    if kind == "sft":
        if messages[-1][0] == HUMAN:
            messages, note = messages[:-1], "trailing_human_turn_removed"
        if not any(role == ASSISTANT for role, _ in messages):
            return None, "no_assistant_turn"
    else:
        if messages[-1][0] == ASSISTANT:
            messages, note = messages[:-1], "trailing_assistant_turn_removed"
        if not messages or messages[-1][0] != HUMAN:
            return None, "no_human_turn"
    return {"messages": messages, "gt_answer": gt_answer}, note


def _preference_record(context, chosen, rejected) -> Converted:
    if chosen == rejected:
        return None, "chosen_equals_rejected"        # no preference to learn; the loss would only add noise
    return {"context": context, "chosen": chosen, "rejected": rejected}, None


def convert_seed(row: Any, where: str, kind: str) -> Converted:
    if kind in ("sft", "prompt"):
        messages = parse_messages(_get(row, "messages", where, list), where, "messages")
        problem = alternation_problem(messages, "messages")
        if problem:
            raise InputError(where, None, problem)
        return _conversation_record(messages, kind, _label(row, where) if kind == "prompt" else None)
    if kind == "preference":
        context = parse_messages(_get(row, "context", where, list), where, "context")
        sides = {}
        for side in ("chosen", "rejected"):
            sides[side] = parse_messages(_get(row, side, where, list), where, side)
            problem = alternation_problem(context + sides[side], "context+" + side)
            if problem:
                raise InputError(where, None, problem)
            if sides[side][-1][0] != ASSISTANT:
                return None, f"{side}_ends_on_human_turn"     # nothing of the model's to prefer or reject
        return _preference_record(context, sides["chosen"], sides["rejected"])
    source = _get(row, "source", where, str)
    target = _get(row, "target", where, str)
    if not target.strip():
        raise InputError(where, "target", "empty content")
    return {"source": source, "target": target}, None


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_text(text: str) -> list[tuple[str, str]] | str:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [(human, 'a'), (assistant, 'b')], or a drop reason."""
    parts = HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip():
        return "hh_rlhf_unparseable"
    messages = [(HUMAN if role == "Human" else ASSISTANT, content.strip())
                for role, content in zip(parts[1::2], parts[2::2])]
    if not messages:
        return "hh_rlhf_unparseable"
    if any(not content for _, content in messages):
        return "empty_turn"
    if alternation_problem(messages, "turns"):
        return "roles_not_alternating"
    return messages


def convert_hh_rlhf(row: Any, where: str, kind: str) -> Converted:
    if kind == "ptx":
        raise ValueError("--format hh_rlhf cannot make --type ptx; it makes preference, sft and prompt")
    sides = {}
    for side in ("chosen", "rejected") if kind == "preference" else ("chosen",):
        parsed = parse_hh_text(_get(row, side, where, str))
        if isinstance(parsed, str):
            return None, parsed
        if parsed[-1][0] != ASSISTANT:
            return None, "no_final_response"
        sides[side] = parsed
    chosen = sides["chosen"]
    if kind == "preference":
        rejected = sides["rejected"]
        if chosen[:-1] != rejected[:-1]:
            return None, "context_mismatch"
        return _preference_record(chosen[:-1], chosen[-1:], rejected[-1:])
    return _conversation_record(chosen, kind, None)


GSM8K_CALC = re.compile(r"<<[^<>]*>>")


def convert_gsm8k(row: Any, where: str, kind: str) -> Converted:
    if kind == "preference":
        raise ValueError("--format gsm8k cannot make --type preference; it makes prompt, sft and ptx")
    question = _get(row, "question", where, str)
    answer = _get(row, "answer", where, str)
    if not question.strip():
        raise InputError(where, "question", "empty content")
    if "####" not in answer:
        raise InputError(where, "answer", "does not end with '#### <number>' (the GSM8K final-answer line)")
    label = answer.rsplit("####", 1)[1].strip()
    if not label:
        raise InputError(where, "answer", "nothing follows '####'")
    # The <<48/2=24>> calculator annotations are tool calls in the original data, not text a model should write.
    solution = GSM8K_CALC.sub("", answer).strip()
    if kind == "ptx":
        return {"source": question.strip() + "\n", "target": solution}, None
    messages = [(HUMAN, question.strip())] + ([(ASSISTANT, solution)] if kind == "sft" else [])
    return {"messages": messages, "gt_answer": label if kind == "prompt" else None}, None


def convert_sharegpt(row: Any, where: str, kind: str) -> Converted:
    if kind not in ("sft", "prompt"):
        raise ValueError(f"--format sharegpt cannot make --type {kind}; it makes sft and prompt")
    turns = _get(row, "conversations", where, list)
    try:
        messages = parse_messages(turns, where, "conversations", role_key="from", content_key="value")
    except InputError as exc:
        if exc.problem == "empty content":
            return None, "empty_turn"
        raise
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0][0] != SYSTEM:
        messages = [(SYSTEM, system)] + messages
    if alternation_problem(messages, "conversations"):
        return None, "roles_not_alternating"
    return _conversation_record(messages, kind, _label(row, where) if kind == "prompt" else None)


CONVERTERS: dict[str, Callable[[Any, str, str], Converted]] = {
    "seed": convert_seed, "hh_rlhf": convert_hh_rlhf, "gsm8k": convert_gsm8k, "sharegpt": convert_sharegpt,
}
MAKES = {"seed": TYPES, "hh_rlhf": ("preference", "sft", "prompt"), "gsm8k": ("prompt", "sft", "ptx"),
         "sharegpt": ("sft", "prompt")}


def check_format_makes(fmt: str, kind: str, where: str) -> None:
    if kind not in MAKES[fmt]:
        raise ValueError(f"{where}: --format {fmt} cannot make --type {kind}; it makes {', '.join(MAKES[fmt])}")


def convert_row(fmt: str, row: Any, where: str, kind: str) -> Converted:
    if not isinstance(row, dict):
        raise InputError(where, None, f"expected a JSON object per row, got {type(row).__name__}")
    return CONVERTERS[fmt](row, where, kind)
