"""Tokenize normalised records into the prepared-row column contract, with label / loss masks from rendering.

How labels are found: the conversation template renders each record and returns the character span of every
assistant turn (content + end marker, e.g. 'Paris.<|im_end|>'). The whole text is tokenized once with
offset mapping; a token is labeled when its last character lies inside an assistant span. Tokenizing the whole
text keeps the ids identical to how the same text tokenizes at generation time; where a token would cross the
edge of a span (plain-text markers), the text is cut there and the pieces tokenized apart, so that labels always
decode to exactly the assistant turns (see encode_with_boundaries).

Length policy per --type (the seed's, made explicit; every case is counted in summary.json):

    sft         too long: whole trailing turns are removed until it fits ('turns_removed_to_fit'); when even the
                first assistant turn does not fit, it is cut at max_length ('response_cut_at_max_length'), and
                when no assistant token is left before max_length the row is dropped
                ('no_response_within_max_length')
    preference  dropped when chosen or rejected is longer than max_length ('longer_than_max_length')
    prompt      dropped when longer than max_length ('prompt_longer_than_max_length')
    ptx         cut at max_length ('cut_at_max_length'); dropped when the source fills it ('source_fills_max_length')
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from rlhf_ray.data.encoder import TokenEncoder, as_encoder
from rlhf_ray.data.template import ConversationTemplate

IGNORE_INDEX = -100


@dataclass
class TokenizedBatch:
    """Rows in the column contract plus what happened to the records that did not come out unchanged."""

    rows: list[dict]
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)

    def keep(self, row: dict, record: dict) -> None:
        """Keep a row; count what conversion ("note") and the length policy ("cut") took from its record, so that
        summary.json's truncated counts cover kept rows only."""
        self.rows.append(row)
        for key in ("note", "cut"):
            if record.get(key):
                self.truncated[record[key]] += 1


def _straddled(offsets: np.ndarray, boundaries: list[int]) -> list[int]:
    """The boundaries that fall strictly inside one token."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    return [b for b in boundaries if np.any((starts < b) & (ends > b))]


def encode_with_boundaries(tokenizer: TokenEncoder, texts: list[str], boundaries: list[list[int]]
                           ) -> tuple[list[list[int]], list[np.ndarray]]:
    """Tokenize each text whole, except that no token may cross one of its boundaries (char positions).

    Whole-text tokenization is what the same text gives at generation time, so it is kept wherever it already
    breaks at the boundaries — always, for templates whose markers are special tokens (ChatML, Llama-3). Where a
    token crosses a boundary (plain-text markers: '[/INST]' + '[image]' merges to '][' in SentencePiece), that
    text is cut at the crossed boundaries and the pieces are tokenized separately, as the prompt and the
    generated response would be. Returns ids and (seq, 2) offsets into the original text.
    """
    ids_list, offsets_list = tokenizer.encode(texts)
    repairs = {i: cuts for i, (offsets, marks) in enumerate(zip(offsets_list, boundaries))
               if (cuts := _straddled(offsets, marks))}
    if not repairs:
        return ids_list, offsets_list
    pieces, owners = [], []
    for i, cuts in repairs.items():
        edges = [0, *sorted(set(cuts)), len(texts[i])]
        for a, b in zip(edges, edges[1:]):
            pieces.append(texts[i][a:b])
            owners.append((i, a))
    piece_ids, piece_offsets = tokenizer.encode(pieces)
    for i in repairs:
        ids_list[i], offsets_list[i] = [], []
    for (i, start), ids, offsets in zip(owners, piece_ids, piece_offsets):
        ids_list[i] = ids_list[i] + list(ids)
        offsets_list[i].append(offsets + start)
    for i in repairs:
        offsets_list[i] = np.concatenate(offsets_list[i]) if offsets_list[i] else np.zeros((0, 2), np.int64)
    return ids_list, offsets_list


def token_mask(offsets: np.ndarray, text_length: int, spans: list[tuple[int, int]]) -> np.ndarray:
    """(seq,) bool: True for tokens whose last character lies in one of the char spans [start, end)."""
    char_in_span = np.zeros(text_length + 1, dtype=bool)
    for start, end in spans:
        char_in_span[start:end] = True
    starts, ends = offsets[:, 0], offsets[:, 1]
    return (ends > starts) & char_in_span[np.maximum(ends - 1, 0)]


def _tokens_before(offsets: np.ndarray, char_position: int) -> int:
    """How many tokens start before char_position (the token index where that character's token begins)."""
    return int(np.searchsorted(offsets[:, 0], char_position, side="left"))


def tokenize_sft(records: list[dict], tokenizer: TokenEncoder, template: ConversationTemplate, max_length: int | None
                 ) -> TokenizedBatch:
    """Conversation records -> {input_ids, attention_mask, labels}; labels are -100 outside assistant spans."""
    out = TokenizedBatch([])
    rendered = [template.render(r["messages"]) for r in records]
    ids_list, offsets_list = encode_with_boundaries(tokenizer, [text for text, _ in rendered],
                                                    [[x for s, e, _ in spans for x in (s, e)] for _, spans in rendered])
    line_tail = len(template.assistant_line_end) - len(template.end_of_assistant)
    for record, (text, spans), ids, offsets in zip(records, rendered, ids_list, offsets_list):
        mask = token_mask(offsets, len(text), [(s, e) for s, e, _ in spans])
        if max_length and len(ids) > max_length:
            turn_ends = [_tokens_before(offsets, end + line_tail) for _, end, _ in spans]
            fitting = [t for t in turn_ends if t <= max_length]
            if fitting:
                cut, reason = max(fitting), "turns_removed_to_fit"
            else:
                labeled = np.flatnonzero(mask)
                if not len(labeled) or labeled[0] >= max_length:
                    out.dropped["no_response_within_max_length"] += 1
                    continue
                cut, reason = max_length, "response_cut_at_max_length"
            ids, mask = ids[:cut], mask[:cut]
            record = {**record, "cut": reason}
        if not mask.any():
            out.dropped["no_labeled_tokens"] += 1
            continue
        labels = np.where(mask, np.asarray(ids, dtype=np.int64), IGNORE_INDEX)
        out.keep({"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": labels.tolist()}, record)
    return out


def tokenize_preference(records: list[dict], tokenizer: TokenEncoder, template: ConversationTemplate,
                        max_length: int | None) -> TokenizedBatch:
    """Preference records -> chosen/rejected input_ids and loss masks (1 on the response after the context)."""
    out = TokenizedBatch([])
    texts, span_sets = [], []
    for record in records:
        first_response = len(record["context"])
        for side in ("chosen", "rejected"):
            text, spans = template.render(record["context"] + record[side])
            texts.append(text)
            span_sets.append([(s, e) for s, e, index in spans if index >= first_response])
    ids_list, offsets_list = encode_with_boundaries(tokenizer, texts, [[x for s, e in spans for x in (s, e)]
                                                                       for spans in span_sets])
    for i in range(len(records)):
        sides = {}
        for j, side in enumerate(("chosen", "rejected")):
            k = 2 * i + j
            mask = token_mask(offsets_list[k], len(texts[k]), span_sets[k])
            sides[side] = (ids_list[k], mask)
        if max_length and any(len(ids) > max_length for ids, _ in sides.values()):
            out.dropped["longer_than_max_length"] += 1
            continue
        if not all(mask.any() for _, mask in sides.values()):
            out.dropped["no_labeled_tokens"] += 1
            continue
        row = {}
        for side, (ids, mask) in sides.items():
            row[f"{side}_input_ids"] = list(ids)
            row[f"{side}_loss_mask"] = mask.astype(np.int64).tolist()
        out.keep(row, records[i])
    return out


def tokenize_prompt(records: list[dict], tokenizer: TokenEncoder, template: ConversationTemplate, max_length: int | None
                    ) -> TokenizedBatch:
    """Conversation records ending with a human turn -> {input_ids (with the generation prompt), gt_answer}."""
    out = TokenizedBatch([])
    texts = [template.render(r["messages"], add_generation_prompt=True)[0] for r in records]
    ids_list, _ = tokenizer.encode(texts)
    for record, ids in zip(records, ids_list):
        if max_length and len(ids) > max_length:
            out.dropped["prompt_longer_than_max_length"] += 1
            continue
        out.keep({"input_ids": list(ids), "gt_answer": record.get("gt_answer")}, record)
    return out


def tokenize_ptx(records: list[dict], tokenizer: TokenEncoder, template: ConversationTemplate | None,
                 max_length: int | None) -> TokenizedBatch:
    """{source, target} -> [bos] + tokens(source + target) + [eos]; labels on the target and eos.

    No chat template: ptx rows are plain pretraining text, as in the seed.
    """
    out = TokenizedBatch([])
    texts = [r["source"] + r["target"] for r in records]
    ids_list, offsets_list = encode_with_boundaries(tokenizer, texts, [[len(r["source"])] for r in records])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for record, text, ids, offsets in zip(records, texts, ids_list, offsets_list):
        mask = token_mask(offsets, len(text), [(len(record["source"]), len(text))])
        ids = bos + list(ids) + eos
        mask = np.concatenate([np.zeros(len(bos), bool), mask, np.ones(len(eos), bool)])
        if max_length and len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            if not mask.any():
                out.dropped["source_fills_max_length"] += 1
                continue
            record = {**record, "cut": "cut_at_max_length"}
        labels = np.where(mask, np.asarray(ids, dtype=np.int64), IGNORE_INDEX)
        out.keep({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels.tolist()}, record)
    return out


TOKENIZERS = {"sft": tokenize_sft, "preference": tokenize_preference, "prompt": tokenize_prompt, "ptx": tokenize_ptx}


def tokenize_records(kind: str, records: list[dict], tokenizer, template, max_length: int | None) -> TokenizedBatch:
    """Dispatch on --type; see the module doc for the length policy of each.

    `tokenizer` is a HF tokenizer or a TokenEncoder (what workers receive).
    """
    return TOKENIZERS[kind](records, as_encoder(tokenizer), template, max_length)
