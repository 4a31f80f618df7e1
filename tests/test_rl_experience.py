"""Experience making and the trainer-side RL losses, without Ray: padding layout, the math glue from scores to
advantages, reward-model inputs, exact global loss means under sharding, the ptx forward, async gating and data
positions."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rlhf_ray.algorithms import compute_advantages, compute_kl
from rlhf_ray.pipelines.rl.async_mode import AsyncCollector
from rlhf_ray.pipelines.rl.data import stream_indices
from rlhf_ray.pipelines.rl.experience import (AdvantageSettings, build_experience, finalize_experience,
                                              reward_model_inputs)
from rlhf_ray.pipelines.rl.metrics import merge_update_results
from rlhf_ray.rollout.types import PromptRollout, Sample
from rlhf_ray.workers.rl_objectives import (RLLossSettings, actor_loss, compute_response_logprobs, critic_loss,
                                            units_of)

PAD = 0


def _rollouts():
    """Two prompts (lengths 3 and 1), two samples each; one sample is empty, one ended on the stop token 2."""
    def sample(ids):
        return Sample(ids, "", [-0.5 - 0.1 * i for i in range(len(ids))], "stop" if ids[-1:] == [2] else "length")
    return [PromptRollout(0, [5, 6, 7], False, [sample([8, 9, 2]), sample([10])], policy_version=3, engine_rank=0),
            PromptRollout(1, [11], False, [sample([12, 13]), sample([])], policy_version=4, engine_rank=1)]


def test_build_experience_layout():
    exp = build_experience(_rollouts(), PAD, group_offset=10)
    assert exp.sequences.tolist() == [[5, 6, 7, 8, 9, 2], [5, 6, 7, 10, 0, 0], [0, 0, 11, 12, 13, 0],
                                      [0, 0, 11, 0, 0, 0]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0],
                                           [0, 0, 1, 0, 0, 0]]
    assert exp.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert exp.prompt_len == 3 and exp.response_len == 3
    assert exp.group_ids.tolist() == [10, 10, 11, 11] and exp.policy_version.tolist() == [3, 3, 4, 4]
    assert torch.allclose(exp.rollout_logprobs[0], torch.tensor([-0.5, -0.6, -0.7]))
    assert exp.rollout_logprobs[3].abs().sum() == 0


def test_reward_model_inputs_end_like_the_training_pairs():
    exp = build_experience(_rollouts(), PAD)
    sequences, mask = reward_model_inputs(exp, stop_ids=[2], end_ids=[2, 201], pad_token_id=PAD)
    rows = [s[m.bool()].tolist() for s, m in zip(sequences, mask)]
    # a stop token is replaced by the line end; a truncated response gets the same ending
    assert rows == [[5, 6, 7, 8, 9, 2, 201], [5, 6, 7, 10, 2, 201], [11, 12, 13, 2, 201], [11, 2, 201]]
    assert mask[:, 0].all()                                   # right-padded


def test_finalize_grpo_matches_the_estimator_and_keeps_kl_out_of_the_reward():
    exp = build_experience(_rollouts(), PAD)
    exp.scores = torch.tensor([1.0, 0.0, 0.5, 0.25])
    exp.ref_logprobs = exp.rollout_logprobs - 0.1
    settings = AdvantageSettings(advantage_estimator="grpo", kl_mode="loss", kl_estimator="low_var_kl")
    exp, metrics = finalize_experience(exp, settings, kl_coef=0.5)
    rewards = torch.zeros(4, 3)
    rewards[0, 2], rewards[1, 0], rewards[2, 1] = 1.0, 0.0, 0.5            # score on each last kept token
    assert torch.allclose(exp.rewards, rewards)
    expected, _ = compute_advantages("grpo", rewards, exp.response_mask, group_ids=exp.group_ids)
    assert torch.allclose(exp.advantages, expected)
    assert metrics["reward/kl"] > 0 and "reward/kl_penalty_mean" not in metrics


def test_finalize_gae_puts_the_kl_penalty_in_the_reward():
    exp = build_experience(_rollouts(), PAD)
    exp.scores = torch.tensor([1.0, -1.0, 0.5, 0.0])
    exp.old_logprobs = exp.rollout_logprobs.clone()
    exp.ref_logprobs = exp.rollout_logprobs - 0.2
    exp.values = torch.full((4, 3), 0.1)
    settings = AdvantageSettings(advantage_estimator="gae", gamma=1.0, lam=0.95)
    exp, metrics = finalize_experience(exp, settings, kl_coef=0.1)
    kl = compute_kl(exp.old_logprobs, exp.ref_logprobs, "k1") * exp.response_mask        # 0.2 on kept tokens
    assert torch.allclose(exp.rewards[0], torch.tensor([-0.02, -0.02, 1.0 - 0.02]))
    assert torch.allclose(exp.rewards[1], torch.tensor([-1.0 - 0.02, 0.0, 0.0]))
    assert metrics["reward/kl_sum"] == pytest.approx(kl.sum(dim=-1).mean().item())   # (0.6 + 0.2 + 0.4 + 0) / 4
    advantages, returns = compute_advantages("gae", exp.rewards, exp.response_mask, values=exp.values, lam=0.95)
    assert torch.allclose(exp.advantages, advantages) and torch.allclose(exp.returns, returns)


@pytest.mark.parametrize("estimator", sorted(__import__("rlhf_ray.algorithms", fromlist=["x"]).ADVANTAGE_ESTIMATORS))
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_every_registered_estimator_runs_through_finalize(estimator, norm_by_std):
    exp = build_experience(_rollouts(), PAD)
    exp.scores = torch.tensor([1.0, 0.0, 0.5, 0.25])
    exp.values = torch.full((4, 3), 0.2)
    exp.old_logprobs = exp.rollout_logprobs.clone()
    exp.ref_logprobs = exp.rollout_logprobs - 0.05
    settings = AdvantageSettings(advantage_estimator=estimator, norm_adv_by_std=norm_by_std, kl_mode="reward")
    exp, metrics = finalize_experience(exp, settings, kl_coef=0.1)
    outside = 1 - exp.response_mask
    assert torch.isfinite(exp.advantages).all() and torch.isfinite(exp.returns).all()
    assert (exp.advantages * outside).abs().sum() == 0 and (exp.returns * outside).abs().sum() == 0
    kept = exp.advantages[exp.response_mask.bool()]
    assert kept.abs().sum() > 0
    # the logged summary describes the advantages that were kept (response tokens only), not the padded tensor
    assert metrics["advantages/std"] == pytest.approx(kept.std().item()) and metrics["advantages/std"] > 0
    assert metrics["advantages/mean"] == pytest.approx(kept.mean().item())
    assert (metrics["advantages/min"], metrics["advantages/max"]) == (kept.min().item(), kept.max().item())


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def _batch(rows: int, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    prompt_len, response_len = 4, 5
    sequences = torch.randint(3, 40, (rows, prompt_len + response_len), generator=generator)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :2] = 0                                      # a left-padded prompt
    response_mask = torch.ones(rows, response_len, dtype=torch.long)
    for row in range(rows):                                        # ragged responses
        cut = 1 + (row * 2) % response_len
        response_mask[row, cut:] = 0
        attention_mask[row, prompt_len + cut:] = 0
    return {"sequences": sequences, "attention_mask": attention_mask, "response_mask": response_mask,
            "old_logprobs": -torch.rand(rows, response_len, generator=generator) - 2.5,
            "advantages": torch.randn(rows, response_len, generator=generator),
            "ref_logprobs": -torch.rand(rows, response_len, generator=generator) - 2.5,
            "values": torch.randn(rows, response_len, generator=generator),
            "returns": torch.randn(rows, response_len, generator=generator)}


def _grads(model, loss_fn, batches, settings, dp_accumulation):
    model.zero_grad()
    units = [units_of(b["response_mask"], settings.loss_agg_mode) for b in batches]
    for batch, local in zip(batches, units):
        loss, _ = loss_fn(model, batch, settings, local * dp_accumulation / sum(units))
        (loss / dp_accumulation).backward()            # the engine's 1/accumulation and DDP's 1/dp, together
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_sharded_micro_batches_give_the_unsharded_gradient(mode):
    """Four shards (2 dp ranks × 2 micro-batches) with the rescale give exactly the whole batch's gradient."""
    model = _tiny_llama()
    settings = RLLossSettings(loss_agg_mode=mode, kl_loss_coef=0.1, entropy_coef=0.01, temperature=0.9)
    full = _batch(8)
    shards = [{k: v[i * 2:(i + 1) * 2] for k, v in full.items()} for i in range(4)]
    whole = _grads(model, actor_loss, [full], settings, dp_accumulation=1)
    split = _grads(model, actor_loss, shards, settings, dp_accumulation=4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, split))
    critic_whole = _grads(_value_model(), critic_loss, [full], settings, 1)
    critic_split = _grads(_value_model(), critic_loss, shards, settings, 4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(critic_whole, critic_split))


def _value_model():
    from rlhf_ray.models.value_head import ValueHeadModel

    llama = _tiny_llama(seed=3)
    head = torch.nn.Linear(32, 1, bias=False)
    return ValueHeadModel(llama.model, head, llama.config)


def test_actor_loss_at_ratio_one_is_minus_the_mean_advantage_and_ptx_rides_along():
    model = _tiny_llama()
    batch = _batch(3)
    settings = RLLossSettings(temperature=0.7)
    batch["old_logprobs"] = compute_response_logprobs(model, batch["sequences"], batch["attention_mask"], 5, 0.7)
    loss, metrics = actor_loss(model, batch, settings, rescale=1.0)
    mask = batch["response_mask"].bool()
    assert abs(loss.item() + batch["advantages"][mask].mean().item()) < 1e-5
    assert metrics["policy/clip_frac"] == 0 and abs(metrics["policy/ratio_mean"] - 1) < 1e-5

    ptx_ids = torch.randint(3, 40, (2, 11))
    labels = ptx_ids.clone()
    labels[:, :3] = -100                                          # the prompt part carries no loss
    with_ptx = {**batch, "ptx_input_ids": ptx_ids, "ptx_attention_mask": torch.ones_like(ptx_ids),
                "ptx_labels": labels}
    loss_ptx, metrics_ptx = actor_loss(model, with_ptx, RLLossSettings(temperature=0.7, ptx_coef=0.5), 1.0)
    logits = model(input_ids=ptx_ids).logits[:, :-1]
    expected_ptx = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100)
    assert abs(metrics_ptx["loss/ptx"] - expected_ptx.item()) < 1e-4
    assert abs(loss_ptx.item() - (loss.item() + 0.5 * expected_ptx.item())) < 1e-4


def _experience_of(batch: dict, rollout_logprobs: torch.Tensor):
    from rlhf_ray.buffer.experience import Experience

    return Experience(sequences=batch["sequences"], attention_mask=batch["attention_mask"],
                      response_mask=batch["response_mask"].clone(), old_logprobs=batch["old_logprobs"],
                      rollout_logprobs=rollout_logprobs, advantages=batch["advantages"],
                      ref_logprobs=batch["ref_logprobs"])


def test_rollout_correction_without_mismatch_leaves_the_actor_loss_unchanged():
    """The trainer path (apply_rollout_correction, then actor_loss with the weights) with sampler log-probs equal to
    the old ones: the same loss and gradient as without the correction."""
    from rlhf_ray.workers.rl_objectives import apply_rollout_correction

    batch = _batch(6)
    on = RLLossSettings(kl_loss_coef=0.1, rollout_is="token", rollout_rs="token", rollout_rs_threshold=1.5)
    experience = _experience_of(batch, batch["old_logprobs"].clone())
    metrics = apply_rollout_correction(experience, on.rollout_correction)
    assert metrics["rollout_corr/masked_token_frac"] == 0 and metrics["rollout_corr/is_weight_mean"] == 1
    corrected = {**batch, "response_mask": experience.response_mask,
                 "rollout_is_weights": experience.extras["rollout_is_weights"]}
    plain_grads = _grads(_tiny_llama(), actor_loss, [batch], RLLossSettings(kl_loss_coef=0.1), 1)
    corrected_grads = _grads(_tiny_llama(), actor_loss, [corrected], on, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, corrected_grads))
    assert apply_rollout_correction(experience, RLLossSettings().rollout_correction) == {}


def test_rollout_correction_with_mismatch_masks_tokens_and_weights_the_loss():
    """A perturbed sampler: rejected tokens leave the mask (and so the loss units), the rest are weighted."""
    from rlhf_ray.workers.rl_objectives import apply_rollout_correction

    batch = _batch(6)
    noise = torch.randn(batch["old_logprobs"].shape, generator=torch.Generator().manual_seed(4)) * 0.8
    experience = _experience_of(batch, batch["old_logprobs"] + noise)
    settings = RLLossSettings(rollout_is="token", rollout_is_threshold=1.5, rollout_rs="token")
    metrics = apply_rollout_correction(experience, settings.rollout_correction)
    mask, weights = experience.response_mask, experience.extras["rollout_is_weights"]
    assert 0 < metrics["rollout_corr/masked_token_frac"] < 1
    assert units_of(mask, "token-mean") < units_of(batch["response_mask"], "token-mean")
    model = _tiny_llama()
    loss, _ = actor_loss(model, {**batch, "response_mask": mask, "rollout_is_weights": weights}, settings, 1.0)
    logprobs = compute_response_logprobs(model, batch["sequences"], batch["attention_mask"], 5)
    ratio = torch.exp(logprobs - batch["old_logprobs"])
    adv = batch["advantages"]
    token_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)) * weights
    assert loss.item() == pytest.approx(((token_loss * mask).sum() / mask.sum()).item(), abs=1e-5)


def test_merge_update_results_weights_by_units_and_skips_tp_duplicates():
    def rank(loss, units, norm):
        return [{"sums": {"loss/policy": loss * units}, "units": units, "tokens": units, "time_s": 1.0,
                 "grad_norm": norm, "lr": 0.1}]

    merged = merge_update_results([rank(1.0, 10, 3.0), rank(9.0, 10, 3.0), rank(4.0, 30, 3.0), rank(9.0, 30, 3.0)],
                                  tp=2, prefix="policy")
    assert merged["loss/policy"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
    assert merged["policy/grad_norm"] == 3.0 and merged["policy/lr"] == 0.1
    assert "policy/skipped_steps" not in merged                        # only when the ranks report it
    with_skips = [[{**step, "skipped_steps": 2} for step in rank(1.0, 10, 3.0)]]
    assert merge_update_results(with_skips, tp=1, prefix="policy")["policy/skipped_steps"] == 2.0


def test_stream_positions_are_deterministic_and_cover_each_pass():
    first = stream_indices(10, 0, 10, seed=3, shuffle=True)
    assert sorted(first) == list(range(10))
    assert stream_indices(10, 4, 9, seed=3, shuffle=True) == (first + stream_indices(10, 10, 10, 3, True))[4:13]
    assert stream_indices(10, 7, 4, seed=3, shuffle=False) == [7, 8, 9, 0]


def test_async_collector_never_runs_ahead_of_max_staleness():
    versions_seen = {}
    version = {"now": 0}

    def collect(episode):
        versions_seen[episode] = version["now"]
        time.sleep(0.01)
        return {"episode": episode}

    collector = AsyncCollector(collect, start=0, stop=5, max_staleness=1, version=0).start()
    for episode in range(5):
        assert collector.next(episode, timeout_s=10)["episode"] == episode
        time.sleep(0.05)                                       # "training": the collector may run ahead meanwhile
        assert max(versions_seen) <= episode + 1               # never more than one episode ahead
        version["now"] = episode + 1
        collector.set_version(episode + 1)
    collector.stop()
    # episode e was collected while the policy was at version >= e - 1: staleness <= 1, and overlap happened
    assert all(e - v <= 1 for e, v in versions_seen.items())
    assert any(e - v == 1 for e, v in versions_seen.items())


def test_async_collector_hands_over_errors():
    def collect(episode):
        raise ValueError("generator exploded")

    collector = AsyncCollector(collect, start=0, stop=2, max_staleness=1, version=0).start()
    with pytest.raises(RuntimeError, match="async collection failed: ValueError: generator exploded"):
        collector.next(0, timeout_s=10)
    collector.stop()
    assert not any(t.name == "rl-collector" and t.is_alive() for t in threading.enumerate())


def _kl_run(async_mode: bool, start: int = 0, stop: int = 6, resume_state: dict | None = None):
    """Episodes through EpisodeKLController as the RL controller drives it: collection updates the adaptive
    coefficient (two collect steps per episode), training commits it. Returns (coefficient used by each collect
    step, coefficient logged/checkpointed after each trained episode)."""
    from types import SimpleNamespace

    from rlhf_ray.pipelines.rl.experience import EpisodeKLController

    algo = SimpleNamespace(kl_ctrl_type="adaptive", kl_coef=0.1, target_kl=1.0, kl_horizon=50.0)
    kl = EpisodeKLController(algo)
    if resume_state is not None:
        kl.load_state_dict(resume_state)
    used, trained = {}, {}

    def collect(episode):
        for step in range(2):
            used[(episode, step)] = kl.collecting.value
            kl.collecting.update(current_kl=0.5 + 0.7 * episode + 0.1 * step, n_steps=8)
        kl.finish(episode)
        return {}

    collector = AsyncCollector(collect, start, stop, max_staleness=2, version=start).start() if async_mode else None
    for episode in range(start, stop):
        collector.next(episode, timeout_s=10) if collector else collect(episode)
        time.sleep(0.02 if collector else 0)                  # "training": collection runs ahead meanwhile
        kl.commit(episode)
        trained[episode] = kl.trained.state_dict()["value"]
        if collector:
            collector.set_version(episode + 1)
    if collector:
        collector.stop()
    return used, trained


def test_adaptive_kl_in_async_mode_matches_sync_and_checkpoints_the_trained_episode():
    sync_used, sync_trained = _kl_run(async_mode=False)
    async_used, async_trained = _kl_run(async_mode=True)
    assert async_used == sync_used and async_trained == sync_trained
    assert len(set(sync_trained.values())) == len(sync_trained)          # the coefficient does move
    # Resume from the checkpoint written after episode 2: the next episodes use the uninterrupted run's values.
    resumed_used, resumed_trained = _kl_run(async_mode=True, start=3, resume_state={"value": async_trained[2]})
    assert resumed_used == {key: value for key, value in sync_used.items() if key[0] >= 3}
    assert resumed_trained == {e: v for e, v in sync_trained.items() if e >= 3}
