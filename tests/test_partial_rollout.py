"""Partial rollouts across weight syncs (rollout/partial.py, GeneratorGroup._generate_partial).

Without Ray: the continuation bookkeeping against a scripted engine (every sample has a target length; each segment
returns the next tokens, stamped with the current policy version), and the hand-over between a generating thread
and a weight sync on a GeneratorGroup whose engine calls are replaced. With Ray and the real vLLM CPU engine: an
async GRPO run with partial rollouts in which samples do cross a sync, and no sample is lost or duplicated.
"""

from __future__ import annotations

import threading

import pytest

from rlhf_ray.config.base import ConfigError, parse_config
from rlhf_ray.pipelines.rl.config import GRPOConfig, check_rl_config
from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.rollout.partial import PartialBatch
from rlhf_ray.rollout.types import PromptRollout, RolloutResult, Sample

PROMPTS = [[11, 12], [21], [31, 32, 33]]
N, MAX_NEW, SEGMENT = 3, 10, 4
# target response length of each sample (prompt-major); > MAX_NEW means truncated at MAX_NEW
TARGETS = [1, 4, 10, 7, 3, 12, 5, 9, 2]


def scripted_segment(prompts: list[list[int]], max_tokens: int, version: int, first: bool) -> list[PromptRollout]:
    """What an engine returns for one segment. A response token is 100 + the sample's slot, so a continuation
    prompt names its slot; in the first segment slot = position. Log-prob of the t-th token: -(slot + t / 100)."""
    out = []
    for position, prompt in enumerate(prompts):
        slot = position if first else prompt[-1] - 100
        done = sum(1 for token in prompt if token >= 100)
        count = min(max_tokens, TARGETS[slot] - done)
        reason = "stop" if done + count == TARGETS[slot] else "length"
        ids = [100 + slot] * count
        logprobs = [-(slot + (done + t) / 100) for t in range(count)]
        out.append(PromptRollout(position, prompt, False, [Sample(ids, f"seg{slot}", logprobs, reason)], version, 0))
    return out


def run_scripted(max_resumes: int, sync_after: set[int]) -> tuple[PartialBatch, list, list]:
    """Generate PROMPTS; a sync (version + 1) is requested after each segment in sync_after and happens at the
    first segment boundary where the batch allows it."""
    batch = PartialBatch(PROMPTS, [False, True, False], N, MAX_NEW, SEGMENT, max_resumes)
    version, waiting, decoded = 0, 0, []
    while batch.unfinished:
        prompts, max_tokens = batch.next_segment()
        batch.absorb(scripted_segment(prompts, max_tokens, version, batch.segments == 0))
        waiting += batch.segments in sync_after
        if waiting and batch.unfinished and batch.may_cross_sync():
            version, waiting = version + 1, 0

    def decode(responses):
        decoded.extend(responses)
        return [f"joined{len(r)}" for r in responses]

    return batch, batch.rollouts(decode), decoded


def test_continuation_keeps_every_sample_once_with_its_tokens_logprobs_and_versions():
    batch, rollouts, decoded = run_scripted(max_resumes=2, sync_after={1, 2})
    assert [r.prompt_index for r in rollouts] == [0, 1, 2] and [r.prompt_ids for r in rollouts] == PROMPTS
    assert [r.truncated for r in rollouts] == [False, True, False]
    samples = [s for r in rollouts for s in r.samples]
    assert len(samples) == len(PROMPTS) * N
    for slot, sample in enumerate(samples):
        length = min(TARGETS[slot], MAX_NEW)
        assert sample.response_ids == [100 + slot] * length               # its own tokens only, none lost
        assert sample.logprobs == pytest.approx([-(slot + t / 100) for t in range(length)])
        assert sample.finish_reason == ("stop" if TARGETS[slot] <= MAX_NEW else "length")
        assert len(sample.token_versions) == length
        assert sample.token_versions == sorted(sample.token_versions)     # versions only move forward
        multi_segment = length > SEGMENT
        assert sample.text == (f"joined{length}" if multi_segment else f"seg{slot}")
    assert sorted(map(len, decoded)) == sorted(min(t, MAX_NEW) for t in TARGETS if min(t, MAX_NEW) > SEGMENT)
    # syncs after segments 1 and 2: tokens 0-3 at version 0, 4-7 at version 1, 8-9 at version 2
    assert samples[2].token_versions == [0] * 4 + [1] * 4 + [2] * 2
    assert batch.segments == 3
    for rollout in rollouts:                                              # a rollout's version: its oldest token
        assert rollout.policy_version == 0
    result = RolloutResult(rollouts, segments=batch.segments, syncs_crossed=2)
    metrics = result.metrics()
    resumed = [s for s in samples if s.token_versions[-1] != s.token_versions[0]]
    assert metrics["rollout/partial_resumed_frac"] == pytest.approx(len(resumed) / len(samples))
    newer = sum(v > 0 for s in samples for v in s.token_versions)
    tokens = sum(len(s.response_ids) for s in samples)
    assert metrics["rollout/partial_newer_token_frac"] == pytest.approx(newer / tokens) and newer > 0


def test_experience_carries_the_version_of_every_token():
    from rlhf_ray.buffer.experience import Experience
    from rlhf_ray.pipelines.rl.experience import build_experience

    _, rollouts, _ = run_scripted(max_resumes=2, sync_after={1, 2})
    experience = build_experience(rollouts, pad_token_id=0)
    versions = experience.extras["token_versions"]
    assert versions.shape == experience.response_mask.shape
    samples = [s for r in rollouts for s in r.samples]
    for row, sample in enumerate(samples):
        assert versions[row, :len(sample.response_ids)].tolist() == sample.token_versions
        assert experience.rollout_logprobs[row, :len(sample.logprobs)].tolist() == pytest.approx(sample.logprobs)
    assert experience.policy_version.tolist() == [0] * len(samples)          # the oldest token's version
    assert Experience.concat([experience.select([0]), experience.select([2])]).extras["token_versions"].shape == (2, 10)


def test_max_resumes_holds_a_sync_until_no_sample_would_exceed_it():
    batch, rollouts, _ = run_scripted(max_resumes=1, sync_after={1, 2})
    samples = [s for r in rollouts for s in r.samples]
    # the first sync crosses after segment 1; the second must wait until the samples that resumed once are done
    assert samples[2].token_versions == [0] * 4 + [1] * 6
    assert max(len(set(s.token_versions)) for s in samples) == 2
    _, rollouts, _ = run_scripted(max_resumes=0, sync_after={1})
    assert {v for r in rollouts for s in r.samples for v in s.token_versions} == {0}


def test_partial_rollout_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="stop strings"):
        GeneratorSection(partial_rollout=True, stop=["\n"])
    with pytest.raises(ValueError, match="segment_tokens"):
        PartialBatch(PROMPTS, [False] * 3, 1, 8, 0, 1)
    (tmp_path / "config.json").write_text("{}")
    argv = ["--pretrain", str(tmp_path), "--prompt_dataset", "x", "--reward_fn", "f.py:f", "--partial_rollout"]
    with pytest.raises(ConfigError, match="--partial_rollout .* add --async_mode"):
        check_rl_config(parse_config(GRPOConfig, argv, "rlhf-ray grpo"), "grpo")
    check_rl_config(parse_config(GRPOConfig, argv + ["--async_mode"], "rlhf-ray grpo"), "grpo")


def test_a_waiting_sync_takes_the_lock_at_the_next_segment_boundary():
    """A GeneratorGroup without Ray: its engine calls are scripted. While the first segment runs, another thread asks
    for a weight sync; generate hands the lock over after that segment, the sync runs, the rest continues under
    version 1."""
    from rlhf_ray.workers.generator_group import GeneratorGroup

    group = GeneratorGroup.__new__(GeneratorGroup)
    group.section = GeneratorSection(partial_rollout=True, partial_rollout_segment_tokens=SEGMENT,
                                     n_samples_per_prompt=N, max_new_tokens=MAX_NEW, max_prompt_len=8)
    group.max_model_len, group._calls, group.policy_version = 64, 0, 0
    group._lock = threading.RLock()
    group._turn = threading.Condition(group._lock)
    group._waiting, group._syncs_waiting = threading.Lock(), 0
    segments, sync_ran = [], threading.Event()

    def sync():
        with group._weight_update_turn():
            group.policy_version += 1
            sync_ran.set()

    def run_chunks(prompts, truncated, params, seed_offset):
        if not segments:                       # the sync is requested while the first segment is generating
            threading.Thread(target=sync).start()
            while not group._syncs_waiting:
                pass
            assert not sync_ran.is_set()       # ... and cannot run before the segment ends
        segments.append(group.policy_version)
        return RolloutResult(scripted_segment(prompts, params["max_new_tokens"], group.policy_version,
                                              len(segments) == 1))

    group._run_chunks = run_chunks
    group._decode = lambda responses: ["x"] * len(responses)
    result = group.generate(PROMPTS)
    assert sync_ran.is_set() and segments == [0, 1, 1] and result.syncs_crossed == 1
    samples = [s for r in result.rollouts for s in r.samples]
    assert samples[2].token_versions == [0] * 4 + [1] * 6
    assert [len(s.response_ids) for s in samples] == [min(t, MAX_NEW) for t in TARGETS]


@pytest.mark.ray
@pytest.mark.vllm
def test_async_grpo_with_partial_rollouts_crosses_syncs_and_keeps_every_sample(ray_cluster, tiny_model_dir,
                                                                                tmp_path):
    """Async GRPO on the tiny model with up to 64-token responses generated in 4-token segments: while episode e
    trains, episode e + 1 is being generated, so the sync after e's update lands between two of its segments
    (measured: episodes 2 and 3 each crossed one sync, 18-60% of their tokens from the newer weights; most of the
    test's ~2 minutes is the cluster's start-up)."""
    pytest.importorskip("vllm")
    from rl_data import REWARD_FN, TEMPLATE, prepare_prompts

    from rlhf_ray.pipelines import grpo
    from rlhf_ray.telemetry.tracker import read_jsonl_metrics

    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts")
    episodes = 3
    status = grpo.main([
        "--pretrain", str(tiny_model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
        "--conversation_template_config", TEMPLATE, "--colocate_policy_reference",
        "--n_samples_per_prompt", "4", "--max_new_tokens", "64", "--ignore_eos", "--max_prompt_len", "32",
        "--kv_cache_gib", "0.25", "--num_episodes", str(episodes), "--experience_batch_size", "4",
        "--train_batch_size", "8", "--accumulation_steps", "2", "--num_update_steps", "2", "--lr", "5e-3",
        "--warmup_steps", "0", "--kl_coef", "0.001", "--async_mode", "--max_staleness", "1",
        "--partial_rollout", "--partial_rollout_segment_tokens", "4", "--partial_rollout_max_resumes", "1",
        "--save_path", str(tmp_path / "policy"), "--log_dir", str(tmp_path / "log"), "--tensorboard", "false"])
    assert status == 0
    rows = read_jsonl_metrics(tmp_path / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, episodes + 1))
    for row in rows:
        assert row["rollout/prompts"] == 4 and row["rollout/samples"] == 16      # none lost, none duplicated
        # ignore_eos: neither EOS nor the template's end-of-turn id ends a response, so every one runs 16 segments
        assert row["rollout/response_len_mean"] == 64 and row["rollout/partial_segments"] == 16
        assert row["rollout/staleness_max"] <= 1                                  # oldest token within the bound
        assert 0 <= row["rollout/partial_newer_token_frac"] < 1
    crossed = [row for row in rows if row["rollout/partial_syncs_crossed"] > 0]
    assert crossed, "no batch continued across a weight sync"
    assert all(row["rollout/partial_resumed_frac"] > 0.5 for row in crossed)
    assert rows[0]["rollout/partial_syncs_crossed"] == 0                          # episode 0: nothing to sync yet
