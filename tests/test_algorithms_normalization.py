"""Running reward normalisation (algorithms/normalization.py): batches combine to the statistics of all values
together, and the scores come out standardised by them."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algorithms.normalization import RunningMoments
from rlhf_ray.config.base import parse_config
from rlhf_ray.pipelines.rl.config import GRPOConfig


def test_running_moments_equal_those_of_all_batches_together():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=generator, dtype=torch.float64) * scale + shift
               for n, scale, shift in ((5, 1.0, 0.0), (1, 1.0, 3.0), (17, 4.0, -2.0), (0, 1.0, 0.0), (8, 0.5, 10.0))]
    moments, seen = RunningMoments(), []
    for batch in batches:
        normalized = moments.update_and_normalize(batch.float())
        seen.append(batch.float().double())             # what the moments saw
        everything = torch.cat(seen)
        assert moments.count == everything.numel()
        assert moments.mean == pytest.approx(everything.mean().item(), abs=1e-9)
        assert moments.std == pytest.approx(everything.std(unbiased=False).item(), abs=1e-9)
        expected = (batch - everything.mean()) / (everything.std(unbiased=False) + moments.eps)
        assert normalized.dtype == torch.float32
        assert torch.allclose(normalized.double(), expected, atol=1e-5)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    probe = torch.tensor([1.0, -2.0])
    assert torch.equal(restored.normalize(probe), moments.normalize(probe))


def test_first_batch_of_equal_scores_normalises_to_zero_and_flag_parses():
    assert torch.equal(RunningMoments().update_and_normalize(torch.full((4,), 0.7)), torch.zeros(4))
    assert RunningMoments().std == 1.0                      # nothing seen: the identity scale
    assert parse_config(GRPOConfig, ["--reward_normalization"], "rlhf-ray grpo").algorithm.reward_normalization
    assert not parse_config(GRPOConfig, [], "rlhf-ray grpo").algorithm.reward_normalization
