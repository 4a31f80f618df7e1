"""load_tokenizer builds what AutoTokenizer builds, on the bundled tokenizer and on real ones, without AutoTokenizer's
imports where tokenizer_config.json names the class."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from rlhf_ray.data.tokenizer_loader import load_tokenizer
from rlhf_ray.fixtures.tiny import TOKENIZER_DIR

from conftest import shared_path

SAMPLE = "Question: what is 12 + 30?\nAnswer: 42. Héllo, wörld! <|im_end|>\n  spaces\tand tabs"


def _same(directory) -> None:
    ours, auto = load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    assert type(ours) is type(auto)
    assert ours(SAMPLE)["input_ids"] == auto(SAMPLE)["input_ids"]
    assert ours(SAMPLE, add_special_tokens=False)["input_ids"] == auto(SAMPLE, add_special_tokens=False)["input_ids"]
    ids = auto(SAMPLE)["input_ids"]
    assert ours.decode(ids) == auto.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template",
                      "model_max_length", "padding_side"):
        assert getattr(ours, attribute) == getattr(auto, attribute), attribute
    assert ours.all_special_ids == auto.all_special_ids
    if auto.chat_template:
        chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
        assert ours.apply_chat_template(chat, tokenize=False) == auto.apply_chat_template(chat, tokenize=False)


def test_the_bundled_tokenizer_is_the_one_autotokenizer_builds():
    _same(TOKENIZER_DIR)


@pytest.mark.parametrize("name", ["qwen3", "mistral-v1-sp"])
def test_real_tokenizers_are_the_ones_autotokenizer_builds(name):
    _same(shared_path("tokenizers", name))


def test_a_directory_naming_no_class_goes_through_autotokenizer(tmp_path):
    for item in TOKENIZER_DIR.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    _same(tmp_path)


def test_the_named_class_loads_without_autotokenizers_imports():
    code = ("import sys; from rlhf_ray.data.tokenizer_loader import load_tokenizer; "
            f"load_tokenizer({str(TOKENIZER_DIR)!r}); "
            "print(sorted(m for m in sys.modules if m.endswith('modeling_auto') or m.startswith('torch._dynamo')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
