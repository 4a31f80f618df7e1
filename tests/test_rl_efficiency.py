"""No forward pass the math does not need, without Ray: on-policy with one optimizer step per episode, the old
log-probs come from the update's own forward pass (detached) with the same loss and gradients as a separate pass;
`--recompute_old_logprobs auto` picks that path only where it is exact, and the controller then scores no old
log-probs."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.base import ConfigError, parse_config
from rlhf_ray.pipelines.rl.config import GRPOConfig, PPOConfig, check_rl_config, old_logprobs_from_update
from rlhf_ray.pipelines.rl.experience import build_experience
from rlhf_ray.rollout.types import PromptRollout, Sample
from rlhf_ray.workers.rl_objectives import RLLossSettings, actor_loss, compute_response_logprobs
from test_rl_experience import _batch, _tiny_llama

LAYOUT = ["--n_samples_per_prompt", "4", "--experience_batch_size", "2", "--train_batch_size", "8",
          "--accumulation_steps", "1"]


def _cfg(cls, tiny_model_dir, *flags):
    base = ["--pretrain", str(tiny_model_dir), "--prompt_dataset", "unused", "--reward_source", "gsm8k", *LAYOUT]
    return parse_config(cls, base + list(flags), "test")


def _loss_and_grads(model, batch, settings):
    model.zero_grad()
    loss, metrics = actor_loss(model, batch, settings, rescale=1.0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], metrics


@pytest.mark.parametrize("policy_loss", ["ppo", "gspo", "cispo"])
def test_old_logprobs_from_the_update_give_the_separate_pass_loss_and_gradients(policy_loss):
    """One update at the weights that scored the batch: the separate pass's old log-probs equal the update's own,
    so loss (with KL loss and entropy terms) and every gradient agree to 1e-6."""
    model = _tiny_llama()
    batch = {key: value for key, value in _batch(4).items() if key != "old_logprobs"}
    common = dict(policy_loss=policy_loss, kl_loss_coef=0.1, entropy_coef=0.01, temperature=0.8)
    separate = {**batch, "old_logprobs": compute_response_logprobs(model, batch["sequences"],
                                                                   batch["attention_mask"], 5, 0.8)}
    loss_a, grads_a, _ = _loss_and_grads(model, separate, RLLossSettings(**common))
    fused = {**batch, "rollout_logprobs": separate["old_logprobs"] - 0.25}
    loss_b, grads_b, metrics = _loss_and_grads(model, fused, RLLossSettings(**common, old_logprobs_from_update=True))
    assert abs(loss_a.item() - loss_b.item()) < 1e-6
    assert grads_a and all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(grads_a, grads_b))
    assert metrics["rollout/logprob_gap_mean"] == pytest.approx(0.25, abs=1e-5)
    assert "old_logprobs" not in fused                  # the fused path never reads a separate pass's result


@pytest.mark.parametrize("cls, flags, fused", [
    (GRPOConfig, [], True),                                              # KL as a loss, sync, one step
    (GRPOConfig, ["--kl_coef", "0"], True),
    (GRPOConfig, ["--num_update_steps", "2", "--num_episodes", "2"], False),
    (GRPOConfig, ["--async_mode", "true"], False),
    (GRPOConfig, ["--rollout_is", "token"], False),
    (GRPOConfig, ["--rollout_rs", "geometric"], False),
    (GRPOConfig, ["--recompute_old_logprobs", "true"], False),
    (GRPOConfig, ["--old_logprobs_source", "rollout"], False),
    (PPOConfig, [], False),                                              # the reward's KL reads them
    (PPOConfig, ["--recompute_old_logprobs", "false"], True),            # ... then from the sampler's
])
def test_auto_picks_the_fused_path_only_where_it_is_exact(tiny_model_dir, cls, flags, fused):
    cfg = _cfg(cls, tiny_model_dir, *flags)
    chosen, reason = old_logprobs_from_update(cfg)
    assert chosen is fused
    assert reason in check_rl_config(cfg, "grpo" if cls is GRPOConfig else "ppo")      # logged once at start


@pytest.mark.parametrize("flags, names", [
    (["--num_update_steps", "2", "--num_episodes", "2"], "--num_update_steps 2"),
    (["--async_mode", "true"], "--async_mode"),
    (["--rollout_rs", "token"], "--rollout_is / --rollout_rs"),
])
def test_forcing_the_fused_path_where_it_changes_the_loss_is_refused(tiny_model_dir, flags, names):
    cfg = _cfg(GRPOConfig, tiny_model_dir, "--recompute_old_logprobs", "false", *flags)
    with pytest.raises(ConfigError, match="--recompute_old_logprobs false") as error:
        check_rl_config(cfg, "grpo")
    assert names in str(error.value)


class _RecordingGroup:
    """Stands in for a WorkerGroup: records call_rows_async calls, returns one (B, R) tensor as the 'refs'."""

    def __init__(self):
        self.calls: list[str] = []

    def call_rows_async(self, method, batch, **_):
        self.calls.append(method)
        rows, response_len = batch["sequences"].shape[0], int(batch["response_len"])
        return [torch.full((rows, response_len), -1.0)]


class _Reward:
    reads_tokens = False

    def score_async(self, texts):
        class Done:
            def result(self):
                from types import SimpleNamespace

                return SimpleNamespace(rewards=[1.0] * len(texts.responses), metrics={"reward/mean": 1.0})
        return Done()


def _score_once(cfg, monkeypatch) -> tuple[_RecordingGroup, object]:
    from types import SimpleNamespace

    import rlhf_ray.pipelines.rl.controller as controller_module

    monkeypatch.setattr(controller_module.ray, "get", lambda refs: refs)      # the fake 'refs' are the tensors
    policy, reference = _RecordingGroup(), _RecordingGroup()
    groups = SimpleNamespace(policy=policy, reference=reference, critic=None)
    tokenizer = SimpleNamespace(decode=lambda ids, **_: "prompt", pad_token_id=0)
    controller = controller_module.RLController(cfg, "test", groups, None, tokenizer, _Reward(), None, None)

    def sample(ids):
        return Sample(ids, "7", [-0.5] * len(ids), "stop")
    rollouts = [PromptRollout(0, [5, 6], False, [sample([8, 9]), sample([10])], policy_version=0, engine_rank=0)]
    experience = build_experience(rollouts, 0)
    controller.score(experience, rollouts, [{"gt_answer": "7"}])
    assert reference.calls == ["compute_response_logprobs"]                  # kl_coef > 0: the reference scores
    return policy, experience


def test_the_controller_skips_the_old_logprob_pass_when_auto_picks_the_fused_path(tiny_model_dir, monkeypatch):
    policy, experience = _score_once(_cfg(GRPOConfig, tiny_model_dir), monkeypatch)
    assert policy.calls == [] and experience.old_logprobs is None
    policy, experience = _score_once(_cfg(GRPOConfig, tiny_model_dir, "--recompute_old_logprobs", "true"),
                                     monkeypatch)
    assert policy.calls == ["compute_response_logprobs"] and experience.old_logprobs is not None


@pytest.mark.ray
@pytest.mark.vllm
def test_a_grpo_run_without_the_old_logprob_pass_reports_startup_and_peak_memory(ray_cluster, tiny_model_dir,
                                                                                   tmp_path, capsys):
    """GRPO's defaults (KL as a loss, sync, one optimizer step) end to end on the fused path: the update's own
    log-probs agree with the sampler's, the ratio is exactly 1; start-up parts in the first row and the log,
    peak memory per role in the last row and the log."""
    pytest.importorskip("vllm")
    from rl_data import REWARD_FN, TEMPLATE, prepare_prompts

    from rlhf_ray.pipelines import grpo
    from rlhf_ray.telemetry.tracker import read_jsonl_metrics

    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts")
    status = grpo.main([
        "--pretrain", str(tiny_model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
        "--conversation_template_config", TEMPLATE, "--colocate_policy_reference",
        "--n_samples_per_prompt", "4", "--max_new_tokens", "4", "--max_prompt_len", "32", "--kv_cache_gib", "0.25",
        "--num_episodes", "2", "--experience_batch_size", "4", "--train_batch_size", "8", "--accumulation_steps", "2",
        "--lr", "5e-3", "--kl_coef", "0.001", "--save_path", str(tmp_path / "policy"),
        "--log_dir", str(tmp_path / "log"), "--tensorboard", "false", "--progress", "false"])
    assert status == 0
    out = capsys.readouterr().out
    assert "note: old log-probs: from the update's own forward pass" in out
    assert "s to the first generation: Ray connect" in out and "peak RSS per process (MiB): driver" in out
    assert "note: reference model: inside the policy's processes" in out        # colocated, sync: one process
    rows = read_jsonl_metrics(tmp_path / "log" / "metrics.jsonl")
    for row in rows:
        assert row["rollout/logprob_gap_mean"] < 1e-3                      # from the update's forward pass
        assert row["policy/ratio_max"] == pytest.approx(1.0, abs=1e-6) and row["policy/clip_frac"] == 0.0
    first, last = rows[0], rows[-1]
    assert 0 < first["startup/generators_s"] <= first["startup/groups_s"] < first["startup/to_first_generation_s"]
    for role in ("driver", "policy", "generator"):
        assert last[f"memory/peak_rss_mib/{role}"] > 50, role
    assert "memory/peak_rss_mib/reference" not in last                         # no reference actors
    assert all(row["reward/kl"] > 0 for row in rows[1:])        # the reference scored, the policy moved from it


def test_the_reference_inside_the_policy_scores_as_a_reference_worker_does_and_stays_frozen(tiny_model_dir):
    """--reference_in_policy: the policy rank's own frozen copy gives the reference worker's log-probs exactly, and
    is a copy: the policy's weights moving leaves it where it was."""
    from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
    from rlhf_ray.workers.rl_actor import RLWorker

    kwargs = {"model": ModelSection(pretrain=str(tiny_model_dir)).model_dump(),
              "train": TrainSection(batch_size=2).model_dump(), "parallel": ParallelSection().model_dump()}
    policy = RLWorker(0, 1, **kwargs, loss=RLLossSettings().to_dict(), reference_in_process=True)
    policy.build(4)
    reference = RLWorker(0, 1, **kwargs, frozen=True)
    reference.build(1)
    generator = torch.Generator().manual_seed(0)
    batch = {"sequences": torch.randint(3, 60, (3, 9), generator=generator), "attention_mask": torch.ones(3, 9),
             "response_len": 4}
    batch["attention_mask"][0, :2] = 0                                     # a left-padded row
    expected = reference.compute_response_logprobs(batch, temperature=0.7)
    assert torch.equal(policy.compute_reference_logprobs(batch, temperature=0.7), expected)
    with torch.no_grad():
        for param in policy.engine.unwrap().parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    assert not torch.allclose(policy.compute_response_logprobs(batch, temperature=0.7), expected, atol=1e-3)
    assert torch.equal(policy.compute_reference_logprobs(batch, temperature=0.7), expected)
    with pytest.raises(RuntimeError, match="holds no reference model"):
        reference.compute_reference_logprobs(batch)


@pytest.mark.parametrize("flags, inside", [
    (["--colocate_all"], True),
    (["--colocate_policy_reference"], True),
    ([], False),                                                          # not colocated: a group of its own
    (["--colocate_all", "--async_mode", "true"], False),                  # the policy trains while scoring runs
    (["--colocate_all", "--ref_num_workers", "2"], False),
    (["--colocate_all", "--reference_in_policy", "false"], False),
    (["--reference_in_policy", "true"], True),
    (["--colocate_all", "--kl_coef", "0"], False),                        # no reference at all
])
def test_auto_puts_the_reference_inside_the_policy_when_colocated_and_sync(tiny_model_dir, flags, inside):
    from rlhf_ray.pipelines.rl.config import reference_in_policy
    from rlhf_ray.pipelines.rl.groups import active_roles

    cfg = _cfg(GRPOConfig, tiny_model_dir, *flags)
    assert reference_in_policy(cfg) is inside
    assert ("reference" in active_roles(cfg)) is (not inside and cfg.algorithm.kl_coef > 0)


def test_the_controller_asks_the_policy_for_reference_logprobs_when_it_holds_the_reference(tiny_model_dir,
                                                                                           monkeypatch):
    from types import SimpleNamespace

    import rlhf_ray.pipelines.rl.controller as controller_module

    monkeypatch.setattr(controller_module.ray, "get", lambda refs: refs)
    policy = _RecordingGroup()
    groups = SimpleNamespace(policy=policy, reference=None, critic=None, reference_in_policy=True)
    tokenizer = SimpleNamespace(decode=lambda ids, **_: "prompt", pad_token_id=0)
    controller = controller_module.RLController(_cfg(GRPOConfig, tiny_model_dir, "--colocate_all"), "test", groups,
                                                None, tokenizer, _Reward(), None, None)
    rollouts = [PromptRollout(0, [5, 6], False, [Sample([8, 9], "7", [-0.5, -0.5], "stop")], 0, 0)]
    experience = build_experience(rollouts, 0)
    controller.score(experience, rollouts, [{"gt_answer": "7"}])
    assert policy.calls == ["compute_reference_logprobs"] and experience.ref_logprobs is not None
