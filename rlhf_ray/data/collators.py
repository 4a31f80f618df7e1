"""Batch collators for prepared rows: pad lists of token ids into LongTensors. Pure torch, no Ray.

Each collator is a callable `collator(rows) -> dict`, where `rows` is a list of dicts as `load_prepared` yields them
(lists of ints, numpy arrays or tensors all work). Which side is padded follows how the batch is consumed:

    SFTCollator         right-padded  (training: loss on labels, pad positions ignored with -100)
    PreferenceCollator  right-padded  (chosen and rejected padded to ONE common length, so a trainer can
                                       torch.cat them into a single forward pass)
    PromptCollator      left-padded   (generation: every prompt ends at the last column, new tokens append)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100


def _as_list(value: Any, what: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy arrays, pyarrow scalars
        return list(value.tolist())
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"column {what!r} must be a list of token ids, got {type(value).__name__}")


def _pad(sequences: Sequence[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    """Stack sequences into a (batch, length) LongTensor, padding with `value` on the right (or left)."""
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not seq:
            continue
        ids = torch.as_tensor(seq, dtype=torch.long)
        if left:
            out[i, length - len(seq):] = ids
        else:
            out[i, :len(seq)] = ids
    return out


def _mask(lengths: Sequence[int], length: int, left: bool = False) -> torch.Tensor:
    """(batch, length) LongTensor with 1 on the real tokens of each row."""
    positions = torch.arange(length).unsqueeze(0)
    lens = torch.as_tensor(list(lengths), dtype=torch.long).unsqueeze(1)
    mask = positions >= (length - lens) if left else positions < lens
    return mask.long()


class SFTCollator:
    """Rows {input_ids, attention_mask, labels} (sft or ptx) -> right-padded LongTensors (batch, seq).

    Returns input_ids (padded with pad_token_id), attention_mask (0 on padding) and labels (-100 on padding, so the
    token-mean loss never sees them). Rows longer than max_length are cut on the right.
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        if pad_token_id is None:
            raise ValueError("SFTCollator needs a pad_token_id (the tokenizer has none: set tokenizer.pad_token)")
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, labels, masks = [], [], []
        for row in rows:
            row_ids = _as_list(row["input_ids"], "input_ids")[: self.max_length]
            row_labels = _as_list(row["labels"], "labels")[: self.max_length]
            if len(row_labels) != len(row_ids):
                raise ValueError(f"labels has {len(row_labels)} entries but input_ids has {len(row_ids)}")
            row_mask = (_as_list(row["attention_mask"], "attention_mask")[: self.max_length]
                        if "attention_mask" in row else [1] * len(row_ids))
            ids.append(row_ids)
            labels.append(row_labels)
            masks.append(row_mask)
        length = max((len(x) for x in ids), default=0)
        return {
            "input_ids": _pad(ids, self.pad_token_id, length),
            "attention_mask": _pad(masks, 0, length),
            "labels": _pad(labels, IGNORE_INDEX, length),
        }


class PreferenceCollator:
    """Rows {chosen_input_ids, chosen_loss_mask, rejected_input_ids, rejected_loss_mask} -> right-padded tensors.

    Returns chosen_input_ids, chosen_attention_mask, chosen_loss_mask and the same three for rejected, each
    (batch, seq) with one seq for both sides (the longest of either), so `torch.cat([chosen, rejected])` works.
    loss_mask is 1 on the response tokens (incl. the end marker) that the preference loss reads, 0 elsewhere.
    """

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("PreferenceCollator needs a pad_token_id (the tokenizer has none: "
                             "set tokenizer.pad_token)")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        sides: dict[str, tuple[list, list]] = {}
        for side in ("chosen", "rejected"):
            ids = [_as_list(row[f"{side}_input_ids"], f"{side}_input_ids") for row in rows]
            loss = [_as_list(row[f"{side}_loss_mask"], f"{side}_loss_mask") for row in rows]
            for a, b in zip(ids, loss):
                if len(a) != len(b):
                    raise ValueError(f"{side}_loss_mask has {len(b)} entries but {side}_input_ids has {len(a)}")
            sides[side] = (ids, loss)
        length = max((len(x) for ids, _ in sides.values() for x in ids), default=0)
        batch = {}
        for side, (ids, loss) in sides.items():
            batch[f"{side}_input_ids"] = _pad(ids, self.pad_token_id, length)
            batch[f"{side}_attention_mask"] = _mask([len(x) for x in ids], length)
            batch[f"{side}_loss_mask"] = _pad(loss, 0, length)
        return batch


class PromptCollator:
    """Rows {input_ids, gt_answer?} -> LEFT-padded input_ids and attention_mask (batch, prompt_len).

    Also returns prompt_ids (the unpadded id lists, what vLLM takes) and gt_answer (list of str or None, the label
    a verifiable reward checks).
    """

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("PromptCollator needs a pad_token_id (the tokenizer has none: set tokenizer.pad_token)")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        prompt_ids = [_as_list(row["input_ids"], "input_ids") for row in rows]
        length = max((len(x) for x in prompt_ids), default=0)
        return {
            "input_ids": _pad(prompt_ids, self.pad_token_id, length, left=True),
            "attention_mask": _mask([len(x) for x in prompt_ids], length, left=True),
            "prompt_ids": prompt_ids,
            "gt_answer": [row.get("gt_answer") for row in rows],
        }
