"""Reference log-probs per finished chunk (pipelines/rl/chunk_reference.py): assembled in the batch's row order, the
values of a whole-batch pass, and the controller waits on them instead of starting its own pass."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rlhf_ray.pipelines.rl.chunk_reference import ChunkReference
from rlhf_ray.pipelines.rl.config import GRPOConfig
from rlhf_ray.pipelines.rl.experience import build_experience, scoring_batch
from rlhf_ray.rollout.types import PromptRollout, Sample
from test_rl_efficiency import _cfg, _RecordingGroup, _Reward


def _rollouts() -> list[PromptRollout]:
    """Five prompts of different lengths, responses of different lengths (one empty), two samples each."""
    generator = torch.Generator().manual_seed(3)

    def ids(count):
        return torch.randint(3, 60, (count,), generator=generator).tolist()

    lengths = [(2, 5, 1), (6, 3, 0), (4, 7, 7), (3, 2, 4), (5, 1, 6)]
    return [PromptRollout(index, ids(prompt), False,
                          [Sample(ids(first), "x", [-0.1] * first, "stop"),
                           Sample(ids(second), "y", [-0.2] * second, "length")], policy_version=0, engine_rank=0)
            for index, (prompt, first, second) in enumerate(lengths)]


def _position_scorer(batch: dict) -> list[torch.Tensor]:
    """A stand-in pass whose value at a response token depends only on that token, its predecessor and its
    position in the response: what a reference's log-prob depends on, padding aside."""
    sequences, width = batch["sequences"], int(batch["response_len"])
    prompt_len = sequences.shape[1] - width
    response = sequences[:, prompt_len:].float()
    before = sequences[:, prompt_len - 1:-1].float()
    return [response * 0.01 + before * 0.001 + torch.arange(width).float()]


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values[mask.bool()]


def test_chunks_assemble_into_the_whole_batchs_rows():
    rollouts = _rollouts()
    whole = build_experience(rollouts, pad_token_id=0)
    expected = _position_scorer(scoring_batch(whole))[0]
    reference = ChunkReference(_position_scorer, pad_token_id=0, get=lambda refs: refs)
    for chunk in ([rollouts[3]], [rollouts[0], rollouts[1]], [rollouts[4], rollouts[2]]):   # out of order
        reference.submit(chunk)
    result = reference.result(rollouts, whole.response_len)
    assert result.shape == expected.shape
    assert torch.equal(_masked(result, whole.response_mask), _masked(expected, whole.response_mask))
    assert torch.all(result[~whole.response_mask.bool()] == 0)


def test_a_real_reference_scores_chunks_as_it_scores_the_batch(tiny_model_dir):
    from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
    from rlhf_ray.workers.rl_actor import RLWorker

    reference = RLWorker(0, 1, model=ModelSection(pretrain=str(tiny_model_dir)).model_dump(),
                         train=TrainSection(batch_size=2).model_dump(), parallel=ParallelSection().model_dump(),
                         frozen=True)
    reference.build(1)

    def start(batch):
        return [reference.compute_response_logprobs(batch, temperature=0.7)]

    rollouts = _rollouts()
    whole = build_experience(rollouts, pad_token_id=0)
    expected = start(scoring_batch(whole))[0]
    by_chunks = ChunkReference(start, pad_token_id=0, get=lambda refs: refs)
    by_chunks.submit(rollouts[:2])
    by_chunks.submit(rollouts[2:])
    got = by_chunks.result(rollouts, whole.response_len)
    torch.testing.assert_close(_masked(got, whole.response_mask), _masked(expected, whole.response_mask),
                               rtol=0, atol=1e-5)
    one_chunk = ChunkReference(start, pad_token_id=0, get=lambda refs: refs)   # one engine: the batch itself
    one_chunk.submit(rollouts)
    assert torch.equal(_masked(one_chunk.result(rollouts, whole.response_len), whole.response_mask),
                       _masked(expected, whole.response_mask))


def _controller(tiny_model_dir, monkeypatch, **groups):
    import rlhf_ray.pipelines.rl.controller as controller_module

    monkeypatch.setattr(controller_module.ray, "get", lambda refs: refs)
    tokenizer = SimpleNamespace(decode=lambda ids, **_: "prompt", pad_token_id=0)
    return controller_module.RLController(_cfg(GRPOConfig, tiny_model_dir), "test",
                                          SimpleNamespace(critic=None, **groups), None, tokenizer, _Reward(), None,
                                          None)


def test_the_controller_waits_on_the_chunks_instead_of_starting_a_pass(tiny_model_dir, monkeypatch):
    policy, reference = _RecordingGroup(), _RecordingGroup()
    controller = _controller(tiny_model_dir, monkeypatch, policy=policy, reference=reference,
                             reference_in_policy=False, generator_in_policy=False)
    chunks = controller._chunk_reference()
    chunks.get = lambda refs: refs
    rollouts = _rollouts()
    chunks.submit(rollouts[:3])
    chunks.submit(rollouts[3:])
    assert reference.calls == ["compute_response_logprobs"] * 2                  # one pass per chunk, during generation
    experience = build_experience(rollouts, 0)
    controller.score(experience, rollouts, [{"gt_answer": "7"}] * len(rollouts), chunk_reference=chunks)
    assert reference.calls == ["compute_response_logprobs"] * 2                  # none started at scoring
    assert torch.all(_masked(experience.ref_logprobs, experience.response_mask) == -1.0)


def test_no_chunk_passes_without_a_reference_or_when_the_policy_is_the_engine(tiny_model_dir, monkeypatch):
    policy = _RecordingGroup()
    assert _controller(tiny_model_dir, monkeypatch, policy=policy, reference=None, reference_in_policy=False,
                       generator_in_policy=False)._chunk_reference() is None
    assert _controller(tiny_model_dir, monkeypatch, policy=policy, reference=None, reference_in_policy=True,
                       generator_in_policy=True)._chunk_reference() is None
    inside = _controller(tiny_model_dir, monkeypatch, policy=policy, reference=None, reference_in_policy=True,
                         generator_in_policy=False)._chunk_reference()
    inside.submit(_rollouts()[:1])
    assert policy.calls == ["compute_reference_logprobs"]
