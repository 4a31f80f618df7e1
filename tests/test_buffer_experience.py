"""Experience container: validation, split / select / concat (with padding of ragged widths). No Ray."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.buffer.experience import Experience
from rlhf_ray.utils import split_evenly


def make_experience(sample_ids, prompt_len: int = 3, response_len: int = 4, version: int | None = 0,
                    pad_token_id: int = 0) -> Experience:
    """Rows whose every token encodes its sample id, so padding and order are visible."""
    ids = torch.as_tensor(sample_ids, dtype=torch.int64)
    batch = ids.shape[0]
    sequences = (ids[:, None] * 100 + torch.arange(1, prompt_len + response_len + 1)[None, :])
    response = ids[:, None].double() + torch.arange(response_len)[None, :] / 10
    return Experience(
        sequences=sequences, attention_mask=torch.ones_like(sequences),
        response_mask=torch.ones(batch, response_len), old_logprobs=-response, advantages=response,
        scores=ids.double(), policy_version=version, group_ids=ids // 4, extras={"sample_id": ids})


def test_split_sizes_differ_by_at_most_one_and_roundtrip():
    experience = make_experience(range(11))
    chunks = experience.split(3)
    assert [len(c) for c in chunks] == [4, 4, 3] == [len(part) for part in split_evenly(range(11), 3)]
    joined = Experience.concat(chunks)
    for name, tensor in experience.tensors().items():
        assert torch.equal(joined.tensors()[name], tensor), name
    assert [len(c) for c in experience.minibatches(4)] == [4, 4, 3]
    shuffled = [c.extras["sample_id"].tolist() for c in experience.minibatches(4, shuffle_seed=0)]
    assert [len(ids) for ids in shuffled] == [4, 4, 3]
    assert sorted(sum(shuffled, [])) == list(range(11)) and sum(shuffled, []) != list(range(11))
    assert experience.select([5, 1]).extras["sample_id"].tolist() == [5, 1]
    assert experience.policy_version.tolist() == [0] * 11 and experience.oldest_version() == 0


def test_concat_pads_prompt_left_and_response_right():
    short = make_experience([1], prompt_len=2, response_len=3, version=4)
    long = make_experience([2], prompt_len=4, response_len=5, version=2)
    joined = Experience.concat([short, long], pad_token_id=9)
    assert joined.prompt_len == 4 and joined.response_len == 5
    # Row 0: two pad tokens on the left of its prompt, its 3 response tokens, two pads on the right.
    assert joined.sequences[0].tolist() == [9, 9, 101, 102, 103, 104, 105, 9, 9]
    assert joined.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]
    assert joined.response_mask[0].tolist() == [1, 1, 1, 0, 0]
    # The response span is still the last response_len columns.
    assert joined.sequences[0, -joined.response_len:].tolist() == [103, 104, 105, 9, 9]
    assert joined.sequences[1].tolist() == list(range(201, 210))
    assert joined.oldest_version() == 2


def test_experience_refuses_inconsistent_shapes():
    good = make_experience([0, 1])
    with pytest.raises(ValueError, match="advantages"):
        Experience(good.sequences, good.attention_mask, good.response_mask, advantages=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="scores"):
        Experience(good.sequences, good.attention_mask, good.response_mask, scores=torch.zeros(3))
    missing = Experience(good.sequences, good.attention_mask, good.response_mask)
    with pytest.raises(ValueError, match="different fields"):
        Experience.concat([good, missing])
    with pytest.raises(ValueError, match="add up"):
        good.split_sizes([1, 2])
