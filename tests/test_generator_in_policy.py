"""--generator_in_policy: the policy's rank generates with its own module (transformers backend), so a small job runs
in one process per role-set and a weight sync sends nothing. It must sample exactly what a generator actor of its
own samples after a real weight sync: the same seeds, the same weights, hence the same episodes."""

from __future__ import annotations

import pytest

from rlhf_ray.config.base import ConfigError, parse_config
from rlhf_ray.pipelines.rl.config import GRPOConfig, generator_in_policy, generator_in_policy_blockers
from rlhf_ray.pipelines.rl.groups import active_roles


def _cfg(tiny_model_dir, *flags):
    return parse_config(GRPOConfig, ["--pretrain", str(tiny_model_dir), "--prompt_dataset", "unused",
                                     "--reward_source", "gsm8k", "--backend", "hf", *flags], "test")


@pytest.mark.parametrize("flags, inside", [
    (["--colocate_all"], True),
    ([], False),                                                          # its own bundles: its own actor
    (["--colocate_all", "--generator_in_policy", "false"], False),
    (["--colocate_all", "--backend", "vllm"], False),
    (["--colocate_all", "--num_engines", "2"], False),
    (["--colocate_all", "--num_workers", "2", "--train_batch_size", "4"], False),
    (["--colocate_all", "--plugin", "fsdp"], False),
    (["--colocate_all", "--async_mode", "true"], False),
])
def test_auto_puts_the_engine_in_the_policy_only_where_it_can_be(tiny_model_dir, flags, inside):
    cfg = _cfg(tiny_model_dir, *flags)
    assert generator_in_policy(cfg) is inside
    assert ("generator" in active_roles(cfg)) is not inside


def test_asking_for_it_where_it_cannot_be_names_what_stands_in_the_way(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, "--generator_in_policy", "true", "--backend", "vllm", "--num_engines", "2")
    assert len(generator_in_policy_blockers(cfg)) == 3                    # vllm, not colocated, two engines
    with pytest.raises(ConfigError, match=r"--generator_in_policy true cannot be: --backend vllm .*no "
                                          r"--colocate_all; --num_engines 2"):
        generator_in_policy(cfg)


@pytest.mark.ray
def test_the_policy_generating_itself_gives_the_episodes_of_a_separate_engine(ray_cluster, tiny_model_dir,
                                                                              tmp_path, capsys):
    from rl_data import REWARD_FN, TEMPLATE, prepare_prompts

    from rlhf_ray.pipelines import grpo
    from rlhf_ray.telemetry.tracker import read_jsonl_metrics

    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts")
    runs = {}
    for name, flags in (("inside", []), ("separate", ["--generator_in_policy", "false"])):
        status = grpo.main([
            "--pretrain", str(tiny_model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
            "--conversation_template_config", TEMPLATE, "--backend", "hf", "--colocate_all", "--seed", "3",
            "--n_samples_per_prompt", "4", "--max_new_tokens", "6", "--max_prompt_len", "32", "--num_episodes", "3",
            "--experience_batch_size", "4", "--train_batch_size", "8", "--accumulation_steps", "2", "--lr", "5e-3",
            "--kl_coef", "0.001", "--save_path", str(tmp_path / name / "policy"), "--log_dir",
            str(tmp_path / name / "log"), "--tensorboard", "false", "--progress", "false", *flags])
        assert status == 0
        runs[name] = (read_jsonl_metrics(tmp_path / name / "log" / "metrics.jsonl"), capsys.readouterr().out)
    (inside, inside_log), (separate, separate_log) = runs["inside"], runs["separate"]
    assert "note: generation: the policy's rank samples with its own module" in inside_log
    assert "the policy's ranks generating too" in inside_log and "generator engines" in separate_log
    assert "memory/peak_rss_mib/generator" not in inside[-1] and "memory/peak_rss_mib/generator" in separate[-1]
    assert all(row["weight_sync/bytes"] == 0 for row in inside if "weight_sync/bytes" in row)
    assert any(row.get("weight_sync/bytes", 0) > 0 for row in separate)
    for mine, theirs in zip(inside, separate, strict=True):            # the weights moved, the samples agree
        for key in ("reward/mean", "reward/kl", "rollout/response_len_mean", "loss/policy", "policy/grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (mine["step"], key)
    assert inside[-1]["reward/kl"] > 0


@pytest.mark.ray
def test_a_policy_rank_lost_mid_generation_restarts_from_the_checkpoint(ray_cluster, tiny_model_dir, tmp_path,
                                                                       monkeypatch, capsys):
    """The engine is the policy's own rank, so losing it mid-generation loses a trainer rank: the job must restart
    from its newest checkpoint (--max_restarts), not route the chunk to another engine, and the episodes after the
    restart must be the uninterrupted run's."""
    from rl_data import REWARD_FN, TEMPLATE, prepare_prompts

    from rlhf_ray.pipelines import grpo
    from rlhf_ray.pipelines.rl.controller import RLController
    from rlhf_ray.telemetry.tracker import read_jsonl_metrics

    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts")

    def run(name: str) -> list[dict]:
        status = grpo.main([
            "--pretrain", str(tiny_model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
            "--conversation_template_config", TEMPLATE, "--backend", "hf", "--colocate_all", "--seed", "5",
            "--n_samples_per_prompt", "4", "--max_new_tokens", "6", "--max_prompt_len", "32", "--num_episodes", "4",
            "--experience_batch_size", "4", "--train_batch_size", "16", "--accumulation_steps", "1", "--lr", "5e-3",
            "--kl_coef", "0.001", "--save_interval", "2", "--max_restarts", "1", "--save_path", str(tmp_path / name / "policy"),
            "--log_dir", str(tmp_path / name / "log"), "--tensorboard", "false", "--progress", "false"])
        assert status == 0
        return read_jsonl_metrics(tmp_path / name / "log" / "metrics.jsonl")

    whole = run("whole")
    crashed: list[int] = []
    collect = RLController.collect_episode

    def crash_in_episode_3(self, episode):
        if episode == 2 and not crashed:          # episodes count from 0: the third, after step_2 is saved
            crashed.append(episode)
            self.groups.generators.inject_crash_on_next_generate(0)
        return collect(self, episode)

    monkeypatch.setattr(RLController, "collect_episode", crash_in_episode_3)
    capsys.readouterr()
    restarted = run("restarted")
    out = capsys.readouterr()
    assert crashed, "the crash was never injected"
    assert "lost policy rank 0" in out.out + out.err and "step_2" in out.out + out.err, out.out + out.err
    by_step = {row["step"]: row for row in restarted}           # the restarted attempt rewrote steps 3 and 4
    assert sorted(by_step) == [row["step"] for row in whole] == [1, 2, 3, 4]
    for row in whole:
        for key in ("reward/mean", "reward/kl", "loss/policy", "policy/grad_norm"):
            assert by_step[row["step"]][key] == pytest.approx(row[key], rel=1e-5, abs=1e-7), (row["step"], key)
