"""`rlhf-ray prepare` end to end: real tokenizers, real data, arrow output reopened, every input row accounted for."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, shared_path
from data_helpers import TEMPLATES, cached_tokenizer, labeled_segments

from rlhf_ray.data.collators import PreferenceCollator, PromptCollator, SFTCollator
from rlhf_ray.data.formats import convert_row, iter_rows
from rlhf_ray.data.loading import load_prepared, load_summary
from rlhf_ray.fixtures.demo_data import write_demo_data
from rlhf_ray.data.tokenize import IGNORE_INDEX
from rlhf_ray.fixtures.tiny import TOKENIZER_DIR
from rlhf_ray.pipelines.prepare import main

TINY = ["--tokenizer_dir", str(TOKENIZER_DIR), "--conversation_template_config", str(TEMPLATES / "tiny.json")]


def _qwen3():
    tokenizer_dir = shared_path("tokenizers", "qwen3")
    return tokenizer_dir, cached_tokenizer(str(tokenizer_dir))


def _check_accounting(summary: dict, input_rows: int):
    assert summary["input_rows"] == input_rows
    assert summary["kept"] + sum(summary["dropped"].values()) == input_rows
    assert sum(summary["truncated"].values()) <= summary["kept"]


def test_hh_rlhf_preference_and_sft_with_qwen3(tmp_path):
    tokenizer_dir, tokenizer = _qwen3()
    data = shared_path("data", "hh-rlhf", "harmless-base-1500.jsonl.gz")
    rows = [(w, r) for w, r in iter_rows(data, max_rows=250)]
    common = ["--input", str(data), "--tokenizer_dir", str(tokenizer_dir), "--max_rows", "250",
              "--conversation_template_config", str(TEMPLATES / "qwen3.json"), "--max_length", "512"]

    assert main(["--type", "preference", "--output", str(tmp_path / "pref"), *common]) == 0
    summary = load_summary(tmp_path / "pref")
    _check_accounting(summary, 250)
    assert summary["files"][0]["format"] == "hh_rlhf"
    assert summary["dropped"].get("longer_than_max_length", 0) > 0  # some real pairs exceed 512 tokens
    dataset = load_prepared(tmp_path / "pref", kind="preference")
    assert len(dataset) == summary["kept"]
    from datasets import load_from_disk

    assert load_from_disk(str(tmp_path / "pref" / "arrow" / "part-00000")).to_list() == dataset.to_list()
    expected = [rec for rec, _ in (convert_row("hh_rlhf", r, w, "preference") for w, r in rows) if rec]
    by_response = {(rec["chosen"][0][1], rec["rejected"][0][1]) for rec in expected}
    for row in dataset.select(range(0, len(dataset), 7)):
        chosen = labeled_segments(tokenizer, row["chosen_input_ids"], row["chosen_loss_mask"])
        rejected = labeled_segments(tokenizer, row["rejected_input_ids"], row["rejected_loss_mask"])
        assert len(chosen) == len(rejected) == 1
        assert chosen[0].endswith("<|im_end|>") and rejected[0].endswith("<|im_end|>")
        assert (chosen[0][:-10], rejected[0][:-10]) in by_response
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    assert batch["chosen_input_ids"].shape == batch["rejected_loss_mask"].shape

    assert main(["--type", "sft", "--output", str(tmp_path / "sft"), *common]) == 0
    summary = load_summary(tmp_path / "sft")
    _check_accounting(summary, 250)
    dataset = load_prepared(tmp_path / "sft", kind="sft")
    conversations = [rec["messages"] for rec, _ in (convert_row("hh_rlhf", r, w, "sft") for w, r in rows) if rec]
    assistant_turns = {tuple(c + "<|im_end|>" for role, c in m if role == "assistant") for m in conversations}
    for row in dataset.select(range(0, len(dataset), 5)):
        mask = np.asarray(row["labels"]) != IGNORE_INDEX
        segments = tuple(labeled_segments(tokenizer, row["input_ids"], mask))
        # a row cut to fit keeps a prefix of its turns
        assert any(turns[:len(segments)] == segments for turns in assistant_turns), segments
    previews = (tmp_path / "sft" / "jsonl" / "part-00000.jsonl").read_text().splitlines()
    assert len(previews) == len(dataset) and json.loads(previews[0])["labeled"]


def test_gsm8k_prompts_in_parallel_match_a_single_process(tmp_path):
    tokenizer_dir, tokenizer = _qwen3()
    data = shared_path("data", "gsm8k", "train.jsonl")
    common = ["--type", "prompt", "--input", str(data), "--tokenizer_dir", str(tokenizer_dir), "--max_rows", "90",
              "--conversation_template_config", str(TEMPLATES / "qwen3.json"), "--max_length", "256"]
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    assert main([*common, "--output", str(tmp_path / "two"), "--num_proc", "2", "--shard_size", "40"]) == 0
    one, two = load_prepared(tmp_path / "one", kind="prompt"), load_prepared(tmp_path / "two", kind="prompt")
    assert load_summary(tmp_path / "two")["shards"] == 3
    assert one.to_list() == two.to_list()
    raw = [row for _, row in iter_rows(data, max_rows=90)]
    assert [row["gt_answer"] for row in one] == [r["answer"].rsplit("####", 1)[1].strip() for r in raw]
    text = tokenizer.decode(one[0]["input_ids"])
    assert text == f"<|im_start|>user\n{raw[0]['question']}<|im_end|>\n<|im_start|>assistant\n"
    batch = PromptCollator(tokenizer.pad_token_id)([one[i] for i in range(3)])
    assert batch["gt_answer"] == [one[i]["gt_answer"] for i in range(3)]


def test_all_types_on_bundled_data_with_the_tiny_tokenizer(tmp_path):
    files = write_demo_data(tmp_path / "in", n=40)
    for kind, path in files.items():
        out = tmp_path / kind
        assert main(["--type", kind, "--input", str(path), "--output", str(out), "--max_length", "64", *TINY]) == 0
        _check_accounting(load_summary(out), 40)
        dataset = load_prepared(out, kind=kind)
        assert len(dataset) == 40
    sft = load_prepared([tmp_path / "sft", tmp_path / "ptx"], kind="sft")
    assert len(sft) == 80
    batch = SFTCollator(pad_token_id=0)([sft[0], sft[79]])
    assert batch["labels"].shape == batch["input_ids"].shape


def test_truncations_and_drops_are_counted(tmp_path):
    rows = [
        {"messages": [{"from": "human", "content": "hi"}, {"from": "assistant", "content": "hello"}]},
        {"messages": [{"from": "human", "content": "hi"}, {"from": "assistant", "content": "hello"},
                      {"from": "human", "content": "bye"}]},
        {"messages": [{"from": "human", "content": "only a question"}]},
        {"messages": [{"from": "human", "content": "a " * 80}, {"from": "assistant", "content": "ok"}]},
        # its trailing question is removed, then it is dropped as too long: not counted as truncated
        {"messages": [{"from": "human", "content": "a " * 80}, {"from": "assistant", "content": "ok"},
                      {"from": "human", "content": "bye"}]},
    ]
    path = tmp_path / "in.json"
    path.write_text(json.dumps(rows))
    assert main(["--type", "sft", "--input", str(path), "--output", str(tmp_path / "out"), "--max_length", "32",
                 *TINY]) == 0
    summary = load_summary(tmp_path / "out")
    _check_accounting(summary, 5)
    assert summary["kept"] == 2
    assert summary["dropped"] == {"no_assistant_turn": 1, "no_response_within_max_length": 2}
    assert summary["truncated"] == {"trailing_human_turn_removed": 1}


def test_num_proc_is_capped_at_the_rows_with_a_note(tmp_path, capsys):
    files = write_demo_data(tmp_path / "in", n=1)           # one row: one process, no pool started
    assert main(["--type", "sft", "--input", str(files["sft"]), "--output", str(tmp_path / "out"), "--num_proc", "64",
                 *TINY]) == 0
    assert load_summary(tmp_path / "out")["num_proc"] == 1
    assert "note: --num_proc 64 is more than the 1 rows or" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "arrow").iterdir())) == 1


def test_template_config_is_written_back_on_first_run(tmp_path):
    config = tmp_path / "template.json"
    config.write_text(json.dumps({"chat_template": None, "system_message": "Answer briefly."}))
    files = write_demo_data(tmp_path / "in", n=5)
    assert main(["--type", "prompt", "--input", str(files["prompt"]), "--output", str(tmp_path / "out"),
                 "--tokenizer_dir", str(TOKENIZER_DIR), "--conversation_template_config", str(config)]) == 0
    written = json.loads(config.read_text())
    assert written["assistant_line_start"] == "<|im_start|>assistant\n"
    assert written["system_message"] == "Answer briefly."
    first = load_prepared(tmp_path / "out")[0]["input_ids"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).decode(first).startswith(
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")


def test_bad_input_is_one_message_and_a_nonzero_exit_without_output(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"from": "human", "content": "q"}, {"from": "assistant", "content": "a"}]}
    bad = {"messages": [{"from": "human", "content": "q"}, {"from": "robot", "content": "a"}]}
    path.write_text("\n".join(json.dumps(r) for r in (good, good, bad)) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RLHF_RAY_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "prepare", "--type", "sft", "--input", str(path),
                           "--output", str(out), *TINY], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 1
    assert f"{path}: line 3: field 'messages[1].from': unknown role 'robot'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_is_kept_unless_overwrite_and_a_crash_leaves_nothing(tmp_path, monkeypatch, capsys):
    files = write_demo_data(tmp_path / "in", n=6)
    out = tmp_path / "out"
    args = ["--type", "sft", "--input", str(files["sft"]), "--output", str(out), *TINY]
    assert main(args) == 0
    assert main(args) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err

    import rlhf_ray.data.shards as shards

    def crash(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(shards, "write_shard", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        main([*args, "--overwrite"])
    assert load_summary(out)["kept"] == 6  # the earlier complete output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary directory left
    monkeypatch.undo()
    assert main([*args, "--max_rows", "4", "--overwrite"]) == 0       # an earlier prepare output is replaced
    assert load_summary(out)["kept"] == 4


def test_config_errors_exit_2_and_seed_aliases_work(tmp_path, capsys):
    assert main(["--input", "x.jsonl", "--output", "o", *TINY]) == 2
    assert "type" in capsys.readouterr().err
    files = write_demo_data(tmp_path / "in", n=8)
    assert main(["--type", "ptx", "--data_input_dirs", str(tmp_path / "in" / "ptx.jsonl"),
                 "--num_samples_per_datafile", "3", "--output", str(tmp_path / "out"), *TINY]) == 0
    assert load_summary(tmp_path / "out")["input_rows"] == 3
    assert files


def test_load_prepared_errors_name_the_directory_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist; create it with `rlhf-ray prepare"):
        load_prepared(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no arrow shards"):
        load_prepared(tmp_path / "empty")
    files = write_demo_data(tmp_path / "in", n=4)
    assert main(["--type", "prompt", "--input", str(files["prompt"]), "--output", str(tmp_path / "p"), *TINY]) == 0
    with pytest.raises(ValueError, match=r"column 'chosen_input_ids' is missing .*--type preference"):
        load_prepared(tmp_path / "p", kind="preference")
    assert len(load_prepared(Path(tmp_path / "p" / "arrow"))) == 4
