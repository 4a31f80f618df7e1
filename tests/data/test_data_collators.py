"""Collators: padding side, pad values, masks, and the shapes trainers rely on."""

import numpy as np
import pytest
import torch

from rlhf_ray.data.collators import IGNORE_INDEX, PreferenceCollator, PromptCollator, SFTCollator


def test_sft_collator_right_pads_with_ignored_labels():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": np.array([8]), "attention_mask": [1], "labels": torch.tensor([8])},
    ]
    batch = SFTCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_sft_collator_cuts_at_max_length_and_checks_lengths():
    rows = [{"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 1], "labels": [1, 2, 3, 4]}]
    assert SFTCollator(pad_token_id=0, max_length=2)(rows)["input_ids"].tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="labels has 1 entries but input_ids has 2"):
        SFTCollator(pad_token_id=0)([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [1]}])
    with pytest.raises(ValueError, match="pad_token_id"):
        SFTCollator(pad_token_id=None)


def test_preference_collator_pads_both_sides_to_one_length():
    rows = [
        {"chosen_input_ids": [1, 2, 3], "chosen_loss_mask": [0, 1, 1],
         "rejected_input_ids": [1, 4], "rejected_loss_mask": [0, 1]},
        {"chosen_input_ids": [1, 5], "chosen_loss_mask": [0, 1],
         "rejected_input_ids": [1, 6, 7, 8], "rejected_loss_mask": [0, 1, 1, 1]},
    ]
    batch = PreferenceCollator(pad_token_id=9)(rows)
    for key, value in batch.items():
        assert value.shape == (2, 4), key
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 3, 9], [1, 5, 9, 9]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["chosen_loss_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]
    assert batch["rejected_loss_mask"].tolist() == [[0, 1, 0, 0], [0, 1, 1, 1]]
    # one length, so chosen and rejected can share a forward pass
    assert torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).shape == (4, 4)


def test_prompt_collator_left_pads_and_keeps_unpadded_ids():
    rows = [{"input_ids": [3, 4, 5], "gt_answer": "12"}, {"input_ids": [6], "gt_answer": None}, {"input_ids": [7, 8]}]
    batch = PromptCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [0, 0, 6], [0, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch["prompt_ids"] == [[3, 4, 5], [6], [7, 8]]
    assert batch["gt_answer"] == ["12", None, None]
