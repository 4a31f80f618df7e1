"""Text rewards scored chunk by chunk (pipelines/rl/chunk_rewards.py) equal one call on the whole batch, whatever
order the chunks arrive in; and the generator group hands its chunks over as they finish (real local Ray)."""

from __future__ import annotations

import random

import pytest

from rlhf_ray.pipelines.rl.chunk_rewards import ChunkRewards
from rlhf_ray.rewards.base import RewardBatch
from rlhf_ray.rewards.math_checkers import ArithmeticReward
from rlhf_ray.rollout.types import PromptRollout, Sample


def _rollouts(prompts: int, samples: int, seed: int = 0) -> tuple[list[PromptRollout], list[dict]]:
    rng = random.Random(seed)
    rollouts, rows = [], []
    for index in range(prompts):
        answer = rng.randrange(-9, 10)
        texts = [rng.choice([str(answer), f" {answer} ", f"it is {answer}", str(answer + 1), "no idea"])
                 for _ in range(samples)]
        rollouts.append(PromptRollout(index, [1, index], False, [Sample([3], t, [-0.5], "stop") for t in texts], 0, 0))
        rows.append({"question": f"q{index}", "gt_answer": str(answer)})
    return rollouts, rows


def _texts(rollouts, rows) -> RewardBatch:
    return RewardBatch([rows[r.prompt_index]["question"] for r in rollouts for _ in r.samples],
                       [s.text for r in rollouts for s in r.samples],
                       [rows[r.prompt_index]["gt_answer"] for r in rollouts for _ in r.samples])


def test_chunks_in_any_order_equal_the_whole_batch():
    rollouts, rows = _rollouts(prompts=11, samples=4)
    source = ArithmeticReward()
    texts = _texts(rollouts, rows)
    whole = source.score(texts.prompts, texts.responses, texts.gt_answers)
    chunks = [rollouts[0:3], rollouts[3:4], rollouts[4:9], rollouts[9:11]]
    pending = ChunkRewards(source, lambda done: _texts(done, rows))
    for chunk in (chunks[2], chunks[0], chunks[3], chunks[1]):         # finished out of order
        pending.submit(chunk)
    combined = pending.result(rollouts)
    assert combined.rewards == whole.rewards and len(set(whole.rewards)) == 2
    assert vars(pending.texts) == vars(texts)                          # the batch's texts, in row order too
    assert combined.metrics.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        assert combined.metrics[key] == pytest.approx(value, abs=1e-12), key


def test_a_prompt_never_scored_or_scored_twice_is_caught():
    rollouts, rows = _rollouts(prompts=4, samples=2)
    pending = ChunkRewards(ArithmeticReward(), lambda done: _texts(done, rows))
    pending.submit(rollouts[:3])
    with pytest.raises(AssertionError, match=r"prompts \[3\] were never scored"):
        pending.result(rollouts)
    pending.submit(rollouts[2:])
    with pytest.raises(AssertionError, match="prompt 2 scored twice"):
        pending.result(rollouts)


@pytest.mark.ray
def test_generator_group_hands_over_each_chunk_as_it_finishes(ray_cluster, tiny_model_dir):
    from rlhf_ray.rollout.config import GeneratorSection
    from rlhf_ray.workers.generator_group import GeneratorGroup

    section = GeneratorSection(backend="hf", num_engines=1, cpus_per_engine=0.5, max_prompt_len=16,
                               max_new_tokens=6, n_samples_per_prompt=2, dispatch_chunk_size=2,
                               max_inflight_per_engine=1)
    group = GeneratorGroup(section, str(tiny_model_dir), name="chunk-handover")
    try:
        handed: list[list[int]] = []
        result = group.generate([[5, 6, 7 + i] for i in range(7)],
                                on_chunk=lambda done: handed.append([r.prompt_index for r in done]))
        # one engine taking one chunk at a time: each chunk is handed over before the next is dispatched
        assert handed == [[0, 1], [2, 3], [4, 5], [6]]
        assert [r.prompt_index for r in result] == list(range(7))
    finally:
        group.shutdown()
