"""Input readers and converters: seed formats, hh-rlhf, GSM8K, ShareGPT, and errors that name file/line/field."""

import gzip
import json

import pytest
from conftest import shared_path

from rlhf_ray.data.formats import (
    ASSISTANT,
    HUMAN,
    SYSTEM,
    InputError,
    check_format_makes,
    convert_row,
    detect_format,
    expand_inputs,
    iter_rows,
    parse_hh_text,
)

W = "in.jsonl: line 3"


def _msg(role, content):
    return {"from": role, "content": content}


def test_reads_jsonl_json_arrays_and_gzip(tmp_path):
    rows = [{"a": 1}, {"a": 2}, {"a": 3}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "y.json").write_text(json.dumps(rows, indent=2))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows))
    for name in ("x.jsonl", "y.json", "z.jsonl.gz"):
        assert [row for _, row in iter_rows(tmp_path / name)] == rows
    assert [where for where, _ in iter_rows(tmp_path / "x.jsonl", max_rows=2)] == \
        [f"{tmp_path / 'x.jsonl'}: line 1", f"{tmp_path / 'x.jsonl'}: line 2"]
    assert [where.rsplit(": ", 1)[1] for where, _ in iter_rows(tmp_path / "y.json")] == ["item 1", "item 2", "item 3"]
    assert expand_inputs([str(tmp_path)]) == [tmp_path / "x.jsonl", tmp_path / "y.json", tmp_path / "z.jsonl.gz"]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n{"messages": [\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: not valid JSON"):
        list(iter_rows(path))
    with pytest.raises(ValueError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.jsonl")])


@pytest.mark.parametrize("row, field, problem", [
    ({"messages": [_msg("human", "hi"), _msg("bot", "yo")]}, "messages[1].from", "unknown role 'bot'"),
    ({"messages": [_msg("human", "  ")]}, "messages[0].content", "empty content"),
    ({"messages": [{"from": "human", "content": 7}]}, "messages[0].content", "expected str, got int"),
    ({"messages": [{"content": "hi"}]}, "messages[0].from", "missing key 'from'"),
    ({"messages": "hi"}, "messages", "expected list, got str"),
    ({"text": "hi"}, "messages", "missing key 'messages'"),
])
def test_seed_rows_with_errors_name_the_field(row, field, problem):
    with pytest.raises(InputError) as info:
        convert_row("seed", row, W, "sft")
    assert info.value.field == field
    assert problem in str(info.value) and str(info.value).startswith(W)


def test_seed_turn_order_is_checked():
    row = {"messages": [_msg("human", "a"), _msg("human", "b"), _msg("assistant", "c")]}
    with pytest.raises(InputError, match=r"messages\[1\] is human, expected assistant"):
        convert_row("seed", row, W, "sft")


def test_seed_sft_and_prompt_trim_the_trailing_turn():
    row = {"messages": [_msg("system", "s"), _msg("human", "q"), _msg("assistant", "a"), _msg("human", "q2")],
           "label": 12}
    record, note = convert_row("seed", row, W, "sft")
    assert record["messages"] == [(SYSTEM, "s"), (HUMAN, "q"), (ASSISTANT, "a")]
    assert note == "trailing_human_turn_removed"
    record, note = convert_row("seed", {"messages": row["messages"][:3], "gt_answer": "7"}, W, "prompt")
    assert record == {"messages": [(SYSTEM, "s"), (HUMAN, "q")], "gt_answer": "7"}
    assert note == "trailing_assistant_turn_removed"
    assert convert_row("seed", row, W, "prompt")[0]["gt_answer"] == "12"
    assert convert_row("seed", {"messages": [_msg("human", "q")]}, W, "sft") == (None, "no_assistant_turn")


def test_seed_preference_and_ptx():
    row = {"context": [_msg("human", "q")], "chosen": [_msg("assistant", "good")],
           "rejected": [_msg("assistant", "bad")]}
    record, _ = convert_row("seed", row, W, "preference")
    assert record == {"context": [(HUMAN, "q")], "chosen": [(ASSISTANT, "good")], "rejected": [(ASSISTANT, "bad")]}
    with pytest.raises(InputError, match=r"context\+chosen\[1\] is human"):
        convert_row("seed", {**row, "chosen": [_msg("human", "x")]}, W, "preference")
    assert convert_row("seed", {"source": "a", "target": " b"}, W, "ptx")[0] == {"source": "a", "target": " b"}
    with pytest.raises(InputError, match="field 'target': empty content"):
        convert_row("seed", {"source": "a", "target": ""}, W, "ptx")


def test_hh_rlhf_text_is_split_into_turns_and_quirks_are_drop_reasons():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you."
    assert parse_hh_text(text) == [(HUMAN, "Hi there"), (ASSISTANT, "Hello!"), (HUMAN, "Bye"), (ASSISTANT, "See you.")]
    row = {"chosen": text, "rejected": text.replace("See you.", "Whatever.")}
    record, _ = convert_row("hh_rlhf", row, W, "preference")
    assert record["context"][-1] == (HUMAN, "Bye")
    assert record["chosen"] == [(ASSISTANT, "See you.")] and record["rejected"] == [(ASSISTANT, "Whatever.")]
    assert convert_row("hh_rlhf", row, W, "prompt")[0]["messages"][-1] == (HUMAN, "Bye")
    assert convert_row("hh_rlhf", row, W, "sft")[0]["messages"][-1] == (ASSISTANT, "See you.")
    assert convert_row("hh_rlhf", {**row, "chosen": text[:-8]}, W, "preference") == (None, "empty_turn")
    assert convert_row("hh_rlhf", {**row, "rejected": "\n\nHuman: Other\n\nAssistant: x"}, W, "preference") == \
        (None, "context_mismatch")
    doubled = text.replace("\n\nHuman: Bye", "\n\nAssistant: more")
    assert convert_row("hh_rlhf", {"chosen": doubled, "rejected": doubled}, W, "preference") == \
        (None, "roles_not_alternating")
    with pytest.raises(InputError, match="field 'rejected': expected str"):
        convert_row("hh_rlhf", {"chosen": text, "rejected": None}, W, "preference")


def test_gsm8k_makes_prompts_with_labels_and_sft_pairs():
    row = {"question": "Natalia sold 48 clips...", "answer": "She sold 48/2 = <<48/2=24>>24 in May.\n#### 72"}
    record, _ = convert_row("gsm8k", row, W, "prompt")
    assert record == {"messages": [(HUMAN, "Natalia sold 48 clips...")], "gt_answer": "72"}
    record, _ = convert_row("gsm8k", row, W, "sft")
    assert record["messages"][1] == (ASSISTANT, "She sold 48/2 = 24 in May.\n#### 72")
    with pytest.raises(InputError, match="field 'answer': does not end with '#### <number>'"):
        convert_row("gsm8k", {"question": "q", "answer": "72"}, W, "prompt")


def test_sharegpt_roles_and_system():
    row = {"system": "Be nice.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    record, _ = convert_row("sharegpt", row, W, "sft")
    assert record["messages"] == [(SYSTEM, "Be nice."), (HUMAN, "hi"), (ASSISTANT, "yo")]
    broken = {"conversations": [{"from": "gpt", "value": "yo"}, {"from": "human", "value": "hi"}]}
    assert convert_row("sharegpt", broken, W, "sft") == (None, "roles_not_alternating")


def test_format_detection_and_type_support():
    assert detect_format({"messages": []}, W, "sft") == "seed"
    assert detect_format({"chosen": "\n\nHuman: a", "rejected": "b"}, W, "preference") == "hh_rlhf"
    assert detect_format({"question": "q", "answer": "a"}, W, "prompt") == "gsm8k"
    assert detect_format({"conversations": []}, W, "sft") == "sharegpt"
    with pytest.raises(InputError, match=r"cannot tell the format from the keys \['foo'\].*--format"):
        detect_format({"foo": 1}, W, "sft")
    with pytest.raises(ValueError, match="--format gsm8k cannot make --type preference; it makes prompt, sft, ptx"):
        check_format_makes("gsm8k", "preference", "f.jsonl")


def test_real_hh_rlhf_and_gsm8k_files_convert():
    hh = shared_path("data", "hh-rlhf", "harmless-base-1500.jsonl.gz")
    results = [convert_row("hh_rlhf", row, where, "preference") for where, row in iter_rows(hh, max_rows=300)]
    kept = [record for record, _ in results if record]
    assert len(kept) >= 290
    assert all(r["context"][-1][0] == HUMAN and r["chosen"][0][0] == ASSISTANT for r in kept)
    gsm = shared_path("data", "gsm8k", "train.jsonl")
    labels = [convert_row("gsm8k", row, where, "prompt")[0]["gt_answer"] for where, row in iter_rows(gsm, max_rows=50)]
    assert labels[0] == "72" and all(label.replace(",", "").lstrip("-").isdigit() for label in labels)
