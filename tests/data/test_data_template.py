"""Conversation templates: marker derivation, write-back, rendering spans, clear failures; real tokenizers too."""

import json

import pytest
from conftest import shared_path
from data_helpers import TEMPLATES, cached_tokenizer

from rlhf_ray.data.template import ASSISTANT, HUMAN, SYSTEM, ConversationTemplate, load_template
from rlhf_ray.data.template_derive import TemplateDerivationError, derive_template
from rlhf_ray.fixtures.tiny import TOKENIZER_DIR

CHATML = {
    "human_line_start": "<|im_start|>user\n", "human_line_end": "<|im_end|>\n",
    "assistant_line_start": "<|im_start|>assistant\n", "assistant_line_end": "<|im_end|>\n",
    "end_of_assistant": "<|im_end|>", "conversation_start": "",
    "system_line_start": "<|im_start|>system\n", "system_line_end": "<|im_end|>\n",
}
CONVO = [(HUMAN, "What is 2 + 2?"), (ASSISTANT, "4"), (HUMAN, "And 3 + 3?"), (ASSISTANT, "6")]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _load(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def test_derives_chatml_markers_from_the_tiny_tokenizer(tiny_tokenizer):
    template = derive_template(tiny_tokenizer, None, "Be brief.")
    for name, value in CHATML.items():
        assert getattr(template, name) == value, name
    assert template.stop_ids == (tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    # the system line is the rendered system block, in tokens
    system_block = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert template.end_of_system_line_position == len(tiny_tokenizer(system_block)["input_ids"])


def test_render_matches_the_chat_template_and_spans_cover_assistant_turns(tiny_tokenizer):
    template = derive_template(tiny_tokenizer, None, None)
    text, spans = template.render(CONVO)
    chat = [{"role": "user" if role == HUMAN else role, "content": content} for role, content in CONVO]
    expected = tiny_tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == expected
    assert [text[a:b] for a, b, _ in spans] == ["4<|im_end|>", "6<|im_end|>"]
    assert [index for _, _, index in spans] == [1, 3]
    prompt, _ = template.render(CONVO[:3], add_generation_prompt=True)
    assert prompt.endswith("And 3 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_a_leading_system_message_replaces_the_configured_one(tiny_tokenizer):
    template = derive_template(tiny_tokenizer, None, "Default.")
    text, spans = template.render([(SYSTEM, "Row's own.")] + CONVO[:2])
    assert text.startswith("<|im_start|>system\nRow's own.<|im_end|>\n<|im_start|>user\n")
    assert "Default." not in text
    assert text[spans[0][0]:spans[0][1]] == "4<|im_end|>" and spans[0][2] == 2


def test_first_run_writes_the_derived_markers_back(tiny_tokenizer, tmp_path, capsys):
    path = tmp_path / "template.json"
    path.write_text(json.dumps({"chat_template": None, "system_message": None}))
    template = load_template(path, tiny_tokenizer)
    written = json.loads(path.read_text())
    for name, value in CHATML.items():
        assert written[name] == value
    assert written["stop_ids"] == list(template.stop_ids)
    # a hand edit is used as written on the next run, and the mismatch is reported, not silently fixed
    written["human_line_start"] = "<|im_start|>human\n"
    path.write_text(json.dumps(written))
    capsys.readouterr()
    edited = load_template(path, tiny_tokenizer)
    assert edited.render(CONVO[:1])[0].startswith("<|im_start|>human\n")
    assert "do not reproduce the chat template's rendering" in capsys.readouterr().out


def test_seed_style_token_id_markers_are_accepted(tiny_tokenizer, tmp_path):
    config = dict(CHATML)
    for name in ("human_line_start", "assistant_line_end", "end_of_assistant"):
        config[name] = tiny_tokenizer(config[name], add_special_tokens=False)["input_ids"]
    path = tmp_path / "ids.json"
    path.write_text(json.dumps({"chat_template": None, "system_message": None, **config}))
    template = load_template(path, tiny_tokenizer, write_back=False)
    assert template.human_line_start == CHATML["human_line_start"]
    assert template.end_of_assistant == "<|im_end|>"


def test_template_without_end_marker_fails_with_what_it_found_and_the_fields_to_set(tiny_tokenizer):
    bare = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    with pytest.raises(TemplateDerivationError) as info:
        derive_template(tiny_tokenizer, bare, None, source="cfg.json")
    message = str(info.value)
    assert "cfg.json" in message and "no end marker" in message
    assert "the template rendered: 'user: RlhfRayUserOne" in message
    assert "assistant_line_end" in message and "Set these fields by hand" in message


def test_null_chat_template_without_a_tokenizer_template_says_what_to_write(tmp_path):
    tokenizer = _load(TOKENIZER_DIR)
    tokenizer.chat_template = None
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"chat_template": None, "system_message": None}))
    with pytest.raises(ValueError, match="has no chat template of its own; write one into"):
        load_template(path, tokenizer)


def test_bad_config_file_names_the_field(tiny_tokenizer, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"chat_template": None, "sytem_message": "x"}))
    with pytest.raises(ValueError, match="field 'sytem_message'.*known fields"):
        load_template(path, tiny_tokenizer)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_template(path, tiny_tokenizer)


def test_end_of_assistant_must_start_the_assistant_line_end():
    with pytest.raises(ValueError, match="end_of_assistant"):
        ConversationTemplate(**{**CHATML, "end_of_assistant": "</s>"})


# ---------------------------------------------------------------- real tokenizers from ../shared


def test_qwen3_think_block_is_noted_and_not_rendered(capsys):
    tokenizer = cached_tokenizer(str(shared_path("tokenizers", "qwen3")))
    template = derive_template(tokenizer, None, None, source="qwen3.json")
    assert template.assistant_line_start == "<|im_start|>assistant\n"
    assert any("<think>" in note for note in template.notes)
    assert "final assistant turn differently" in capsys.readouterr().out
    text, spans = template.render(CONVO)
    assert "<think>" not in text
    assert [text[a:b] for a, b, _ in spans] == ["4<|im_end|>", "6<|im_end|>"]


def test_qwen3_no_think_config_matches_the_non_thinking_generation_prompt(capsys):
    tokenizer = cached_tokenizer(str(shared_path("tokenizers", "qwen3")))
    template = load_template(TEMPLATES / "qwen3-no-think.json", tokenizer, write_back=False)
    prompt = template.render(CONVO[:1], add_generation_prompt=True)[0]
    expected = tokenizer.apply_chat_template([{"role": "user", "content": CONVO[0][1]}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    assert prompt == expected
    assert "do not reproduce" not in capsys.readouterr().out


def test_mistral_needs_a_user_template_and_shipped_config_works():
    tokenizer = cached_tokenizer(str(shared_path("tokenizers", "mistral-v1-sp")))
    with pytest.raises(ValueError, match="has no chat template of its own"):
        derive_template(tokenizer, None, None)
    config = json.loads((TEMPLATES / "mistral-v1-sp.json").read_text())
    template = derive_template(tokenizer, config["chat_template"], None)
    assert (template.conversation_start, template.human_line_start, template.human_line_end) == \
        ("<s>", "[INST] ", " [/INST]")
    assert not template.supports_system
    with pytest.raises(TemplateDerivationError, match="set system_message to null"):
        derive_template(tokenizer, config["chat_template"], "You are helpful.")
    text, _ = template.render([(SYSTEM, "Be kind.")] + CONVO[:2])
    assert text == "<s>[INST] Be kind.\n\nWhat is 2 + 2? [/INST]4</s>"


def test_shipped_template_configs_are_complete():
    for path in TEMPLATES.glob("*.json"):
        config = json.loads(path.read_text())
        for name in CHATML:
            assert name in config, f"{path.name} lacks {name}"
