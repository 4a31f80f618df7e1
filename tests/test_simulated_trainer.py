"""--simulated_trainer_step_s: the real RL loop with a stand-in policy (workers/simulated_trainer.py).

Without Ray: what the option refuses, which roles it starts, and the stand-in's refusal to write a model. With Ray and
the real vLLM CPU engine: an async GRPO run with partial rollouts whose update takes the configured time, whose
weight syncs reach the generators, which logs the async/partial metrics and writes no checkpoint or model.
"""

from __future__ import annotations

import pytest

from rlhf_ray.config.base import ConfigError, parse_config
from rlhf_ray.pipelines.rl.config import GRPOConfig, PPOConfig, check_rl_config
from rlhf_ray.pipelines.rl.groups import active_roles

STEP_S = 1.0


def _argv(tmp_path, *extra: str) -> list[str]:
    (tmp_path / "config.json").write_text("{}")
    return ["--pretrain", str(tmp_path), "--prompt_dataset", "x", "--reward_fn", "f.py:f", *extra]


def test_the_option_replaces_the_trainer_side_and_refuses_what_needs_a_real_one(tmp_path):
    real = parse_config(GRPOConfig, _argv(tmp_path), "rlhf-ray grpo")
    assert real.rl.simulated_trainer_step_s is None and "reference" in active_roles(real)   # off: unchanged
    simulated = parse_config(GRPOConfig, _argv(tmp_path, "--simulated_trainer_step_s", "2.5"), "rlhf-ray grpo")
    assert active_roles(simulated) == ["policy", "generator"]          # the sampler's log-probs stand in for ref
    notes = check_rl_config(simulated, "grpo")
    assert any("2.5 s" in note and "no checkpoint and no model" in note for note in notes)
    assert not any("resumable checkpoint" in note for note in notes)
    # sampling settings whose log-probs the trainer could not reproduce are fine: nothing trains on them
    check_rl_config(parse_config(GRPOConfig, _argv(tmp_path, "--simulated_trainer_step_s", "1", "--top_p", "0.9",
                                                   "--async_mode"), "rlhf-ray grpo"), "grpo")
    for extra, refused in ((["--save_interval", "2"], "--save_interval 2"),
                           (["--checkpoint_path", str(tmp_path)], "--checkpoint_path")):
        cfg = parse_config(GRPOConfig, _argv(tmp_path, "--simulated_trainer_step_s", "1", *extra), "rlhf-ray grpo")
        with pytest.raises(ConfigError, match=f"--simulated_trainer_step_s 1.0 .*{refused}"):
            check_rl_config(cfg, "grpo")
    with pytest.raises(ConfigError, match="--advantage_estimator gae \\(it trains a critic\\)"):
        check_rl_config(parse_config(PPOConfig, _argv(tmp_path, "--simulated_trainer_step_s", "1"), "rlhf-ray ppo"),
                        "ppo")
    with pytest.raises(ValueError, match="simulated_trainer_step_s"):
        parse_config(GRPOConfig, _argv(tmp_path, "--simulated_trainer_step_s", "-1"), "rlhf-ray grpo")


def test_the_stand_in_holds_weights_on_rank_0_only_and_never_writes_a_model(tiny_model_dir, tmp_path, monkeypatch):
    from rlhf_ray.workers.simulated_trainer import SimulatedTrainerWorker

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):        # RankedWorker sets them for its own process
        monkeypatch.setenv(name, "0")
    model = {"pretrain": str(tiny_model_dir)}
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)   # the worker's own process setting, not pytest's
    other = SimulatedTrainerWorker(1, 2, model=model, step_s=STEP_S)
    assert other.build(1)["parameters"] == 0 and list(other.weights_for_sync()) == []
    first = SimulatedTrainerWorker(0, 2, model=model, step_s=STEP_S)
    assert first.build(1)["parameters"] > 0
    names = [name for name, _ in first.weights_for_sync()]
    assert names and len(names) == len(set(names))
    for method in ("save_hf", "save_checkpoint"):
        with pytest.raises(RuntimeError, match="simulated trainer has no trained"):
            getattr(first, method)(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.vllm
def test_async_partial_grpo_with_a_simulated_trainer(ray_cluster, tiny_model_dir, tmp_path, capsys):
    """3 episodes of async GRPO with partial rollouts (64-token responses in 4-token segments) and a 1 s stand-in
    optimizer step: each update takes about that long, each sync stamps the generators with the next version and
    carries the whole model, staleness stays within 1, and nothing but the logs is written."""
    pytest.importorskip("vllm")
    from rl_data import REWARD_FN, TEMPLATE, prepare_prompts

    from rlhf_ray.benchmarks.workload import weight_bytes
    from rlhf_ray.pipelines import grpo
    from rlhf_ray.telemetry.tracker import read_jsonl_metrics

    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts")
    episodes, run = 3, tmp_path / "run"
    status = grpo.main([
        "--pretrain", str(tiny_model_dir), "--prompt_dataset", str(prompts), "--reward_fn", REWARD_FN,
        "--conversation_template_config", TEMPLATE, "--simulated_trainer_step_s", str(STEP_S),
        "--n_samples_per_prompt", "4", "--max_new_tokens", "64", "--ignore_eos", "--max_prompt_len", "32",
        "--kv_cache_gib", "0.25", "--num_episodes", str(episodes), "--experience_batch_size", "4",
        "--train_batch_size", "16", "--accumulation_steps", "1", "--kl_coef", "0.01", "--async_mode",
        "--max_staleness", "1", "--partial_rollout", "--partial_rollout_segment_tokens", "4",
        "--partial_rollout_max_resumes", "1", "--save_path", str(run / "policy"), "--log_dir", str(run / "log"),
        "--tensorboard", "false"])
    out = capsys.readouterr().out
    assert status == 0
    assert "simulated trainer: no checkpoint and no model written" in out and "HF policy ->" not in out
    assert sorted(path.name for path in run.iterdir()) == ["log"]     # no policy/, no policy-checkpoints/
    rows = read_jsonl_metrics(run / "log" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, episodes + 1))
    for step, row in enumerate(rows, start=1):
        assert row["rollout/prompts"] == 4 and row["rollout/samples"] == 16           # every episode complete
        assert STEP_S <= row["timing/update"] < STEP_S + 0.75                         # the configured step time
        assert row["weight_sync/version"] == step == row["rl/policy_version"]       # generators at the new version
        assert row["weight_sync/bytes"] >= 0.99 * weight_bytes(str(tiny_model_dir))  # the whole model, each sync
        assert row["rollout/partial_segments"] == 16 and row["rollout/staleness_max"] <= 1
        for key in ("rollout/staleness_mean", "rollout/partial_syncs_crossed", "rollout/partial_resumed_frac",
                    "rollout/partial_newer_token_frac", "timing/generate", "timing/weight_sync"):
            assert key in row, key
    assert rows[0]["rollout/partial_syncs_crossed"] == 0                          # episode 0: nothing to sync yet


def test_bench_rl_loop_builds_one_valid_grpo_run_per_mode(tmp_path):
    """`rlhf-ray bench rl_loop`: every mode's flags (with those after `--`) pass the grpo checks; sync always runs
    first, as the ratios' baseline."""
    from rlhf_ray.benchmarks.bench_rl_loop import grpo_argv, parse_args

    args, extra = parse_args(["--model", str(tmp_path), "--modes", "partial", "--prompts", "4", "--n", "8",
                              "--simulated_trainer_step_s", "3", "--", "--num_engines", "2", "--top_p", "0.9"])
    assert args.modes == ["sync", "partial"] and extra == ["--num_engines", "2", "--top_p", "0.9"]
    (tmp_path / "config.json").write_text("{}")
    for mode in args.modes:
        cfg = parse_config(GRPOConfig, grpo_argv(args, tmp_path, tmp_path, tmp_path, mode, extra), "bench")
        check_rl_config(cfg, "grpo")
        assert cfg.rl.simulated_trainer_step_s == 3 and cfg.generator.num_engines == 2
        assert cfg.rl.async_mode == cfg.generator.partial_rollout == (mode == "partial")
    with pytest.raises(SystemExit):
        parse_args(["--episodes", "1"])
