"""Label and loss masks from rendering, and the per-type length policy; checked by decoding what is labeled."""

import numpy as np
import pytest
from conftest import shared_path
from data_helpers import TEMPLATES, cached_tokenizer, labeled_segments

from rlhf_ray.data.formats import convert_row, iter_rows
from rlhf_ray.data.template import ASSISTANT, HUMAN, SYSTEM, load_template
from rlhf_ray.data.template_derive import derive_template
from rlhf_ray.data.tokenize import IGNORE_INDEX, token_mask, tokenize_records
from rlhf_ray.fixtures.tiny import TOKENIZER_DIR

CONVO = [(HUMAN, "What is 2 + 2?"), (ASSISTANT, "It is 4."), (HUMAN, "And 3 + 3?"), (ASSISTANT, "That is 6!")]


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return tokenizer, derive_template(tokenizer, None, None)


def test_token_mask_uses_each_tokens_last_character():
    offsets = np.array([[0, 3], [3, 6], [6, 6], [6, 10]])  # the zero-width token is never labeled
    assert token_mask(offsets, 10, [(4, 8)]).tolist() == [False, True, False, False]
    assert token_mask(offsets, 10, [(0, 10)]).tolist() == [True, True, False, True]


def test_sft_labels_decode_to_exactly_the_assistant_turns(tiny):
    tokenizer, template = tiny
    batch = tokenize_records("sft", [{"messages": CONVO}], tokenizer, template, max_length=None)
    row = batch.rows[0]
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
    mask = [label != IGNORE_INDEX for label in row["labels"]]
    assert labeled_segments(tokenizer, row["input_ids"], mask) == ["It is 4.<|im_end|>", "That is 6!<|im_end|>"]
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(row["labels"], row["input_ids"]))
    # whole-text tokenization: identical to tokenizing the rendered conversation in one go
    assert row["input_ids"] == tokenizer(template.render(CONVO)[0], add_special_tokens=False)["input_ids"]


def test_sft_length_policy_counts_every_case(tiny):
    tokenizer, template = tiny
    full = tokenize_records("sft", [{"messages": CONVO}], tokenizer, template, None).rows[0]
    first_turn = tokenize_records("sft", [{"messages": CONVO[:2]}], tokenizer, template, None).rows[0]
    prompt_len = len(tokenizer(template.render(CONVO[:1], add_generation_prompt=True)[0],
                               add_special_tokens=False)["input_ids"])
    records = [{"messages": CONVO}] * 3
    # fits the first exchange only: the second is removed whole (its trailing newline included)
    batch = tokenize_records("sft", records[:1], tokenizer, template, len(first_turn["input_ids"]) + 2)
    assert batch.truncated == {"turns_removed_to_fit": 1}
    assert batch.rows[0]["input_ids"] == first_turn["input_ids"]
    # not even the first response fits: cut inside it, still labeled
    batch = tokenize_records("sft", records[:1], tokenizer, template, prompt_len + 2)
    assert batch.truncated == {"response_cut_at_max_length": 1}
    assert len(batch.rows[0]["input_ids"]) == prompt_len + 2
    assert sum(label != IGNORE_INDEX for label in batch.rows[0]["labels"]) == 2
    # no assistant token before max_length: dropped with its reason
    batch = tokenize_records("sft", records[:1], tokenizer, template, prompt_len)
    assert batch.rows == [] and batch.dropped == {"no_response_within_max_length": 1}
    assert len(full["input_ids"]) > len(first_turn["input_ids"])


def test_preference_loss_mask_covers_only_the_response(tiny):
    tokenizer, template = tiny
    record = {"context": CONVO[:3], "chosen": [(ASSISTANT, "Six.")], "rejected": [(ASSISTANT, "Seven, I think.")]}
    batch = tokenize_records("preference", [record], tokenizer, template, None)
    row = batch.rows[0]
    assert labeled_segments(tokenizer, row["chosen_input_ids"], row["chosen_loss_mask"]) == ["Six.<|im_end|>"]
    assert labeled_segments(tokenizer, row["rejected_input_ids"], row["rejected_loss_mask"]) == \
        ["Seven, I think.<|im_end|>"]
    limit = len(row["chosen_input_ids"])  # chosen fits, rejected does not: the pair is dropped
    batch = tokenize_records("preference", [record], tokenizer, template, limit)
    assert batch.rows == [] and batch.dropped == {"longer_than_max_length": 1}


def test_prompt_ends_with_the_generation_prompt_and_keeps_the_label(tiny):
    tokenizer, template = tiny
    batch = tokenize_records("prompt", [{"messages": [(SYSTEM, "Be brief."), (HUMAN, "2+2?")], "gt_answer": "4"}],
                             tokenizer, template, None)
    row = batch.rows[0]
    assert tokenizer.decode(row["input_ids"], skip_special_tokens=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert row["gt_answer"] == "4"
    batch = tokenize_records("prompt", [{"messages": [(HUMAN, "2+2?")], "gt_answer": None}], tokenizer, template, 8)
    assert batch.dropped == {"prompt_longer_than_max_length": 1}


def test_ptx_labels_the_target_and_cuts_long_rows(tiny):
    tokenizer, _ = tiny
    record = {"source": "The capital of France", "target": " is Paris."}
    row = tokenize_records("ptx", [record], tokenizer, None, None).rows[0]
    mask = [label != IGNORE_INDEX for label in row["labels"]]
    assert labeled_segments(tokenizer, row["input_ids"], mask) == [" is Paris.<|im_end|>"]
    batch = tokenize_records("ptx", [record], tokenizer, None, len(row["input_ids"]) - 1)
    assert batch.truncated == {"cut_at_max_length": 1} and not batch.rows[0]["input_ids"][-1] == tokenizer.eos_token_id
    batch = tokenize_records("ptx", [{"source": "x " * 40, "target": " y"}], tokenizer, None, 10)
    assert batch.dropped == {"source_fills_max_length": 1}


# ---------------------------------------------------------------- real tokenizers and data from ../shared

REAL = {"qwen3": "qwen3.json", "qwen3-no-think": "qwen3-no-think.json", "mistral-v1-sp": "mistral-v1-sp.json"}


@pytest.mark.parametrize("name", list(REAL))
def test_real_tokenizers_label_exactly_the_responses_of_hh_rlhf(name):
    tokenizer_dir = shared_path("tokenizers", name.replace("-no-think", ""))
    data = shared_path("data", "hh-rlhf", "harmless-base-1500.jsonl.gz")
    tokenizer = cached_tokenizer(str(tokenizer_dir))
    template = load_template(TEMPLATES / REAL[name], tokenizer, write_back=False)
    records = [r for r, _ in (convert_row("hh_rlhf", row, w, "sft") for w, row in iter_rows(data, max_rows=60)) if r]
    batch = tokenize_records("sft", records, tokenizer, template, None)
    assert len(batch.rows) == len(records)
    end = template.end_of_assistant
    for record, row in zip(records, batch.rows):
        mask = [label != IGNORE_INDEX for label in row["labels"]]
        expected = [content + end for role, content in record["messages"] if role == ASSISTANT]
        got = labeled_segments(tokenizer, row["input_ids"], mask)
        if name == "mistral-v1-sp":  # SentencePiece drops the word-start marker's space when decoding alone
            got, expected = [g.strip() for g in got], [e.strip() for e in expected]
        assert got == expected


def test_no_token_crosses_a_span_edge(tiny):
    from rlhf_ray.data.encoder import TokenEncoder
    from rlhf_ray.data.tokenize import encode_with_boundaries

    tokenizer, _ = tiny
    encoder = TokenEncoder(tokenizer)
    text = "hi there, friend"
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    cut = 5  # inside 'Ġthe' (3..7)
    assert any(a < cut < b for a, b in whole["offset_mapping"])
    (ids,), (offsets,) = encode_with_boundaries(encoder, [text], [[cut]])
    assert not any(a < cut < b for a, b in offsets.tolist())
    assert tokenizer.decode(ids) == text
    assert offsets[-1, 1] == len(text)
    # text already breaking at the edges keeps its whole-text tokens
    (same,), _ = encode_with_boundaries(encoder, [text], [[2, 8]])
    assert same == whole["input_ids"]


@pytest.mark.parametrize("name", ["tiny", "qwen3", "mistral-v1-sp"])
def test_encoder_gives_the_ids_of_the_hf_tokenizer(name):
    import pickle

    from rlhf_ray.data.encoder import TokenEncoder

    directory = TOKENIZER_DIR if name == "tiny" else shared_path("tokenizers", name)
    tokenizer = cached_tokenizer(str(directory))
    texts = ["<s>[INST] Héllo  wörld [/INST]Sure!</s>", "<|im_start|>user\n2+2?<|im_end|>\n", " leading space",
             "emoji 🤖 and\ttabs\n\nnewlines", ""]
    encoder = pickle.loads(pickle.dumps(TokenEncoder(tokenizer)))
    ids, offsets = encoder.encode(texts)
    expected = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == expected["input_ids"]
    assert [o.tolist() for o in offsets] == [[list(p) for p in o] for o in expected["offset_mapping"]]
    assert encoder.decode(ids[0]) == tokenizer.decode(ids[0], skip_special_tokens=False)
