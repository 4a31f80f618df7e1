"""The RL job's config: the seed's flags, GRPO's defaults, the buffer arithmetic and the other start-up refusals,
and the role plan with colocation. No Ray: everything here is decided before any actor starts."""

from __future__ import annotations

import pytest

from rlhf_ray.config.base import ConfigError, parse_config
from rlhf_ray.pipelines.rl.config import BufferPlan, GRPOConfig, PPOConfig, check_rl_config
from rlhf_ray.pipelines.rl.groups import active_roles
from rlhf_ray.pipelines.rl.roles import plan_roles

SEED_PPO_FLAGS = {
    # flag: (value, dotted field, parsed value)
    "--pretrain": ("m/actor", "model.pretrain", "m/actor"),
    "--rm_pretrain": ("m/rm-base", "reward.rm_pretrain", "m/rm-base"),
    "--tokenizer_dir": ("m/tok", "model.tokenizer_dir", "m/tok"),
    "--rm_checkpoint_path": ("m/rm", "reward.rm_checkpoint_path", "m/rm"),
    "--prompt_dataset": ("d/prompt", "data.prompt_dataset", ["d/prompt"]),
    "--pretrain_dataset": ("d/ptx", "data.pretrain_dataset", ["d/ptx"]),
    "--conversation_template_config": ("t.json", "data.conversation_template_config", "t.json"),
    "--ptx_batch_size": ("2", "data.ptx_batch_size", 2),
    "--ptx_coef": ("0.3", "algorithm.ptx_coef", 0.3),
    "--num_episodes": ("7", "rl.num_episodes", 7),
    "--num_collect_steps": ("2", "rl.num_collect_steps", 2),
    "--num_update_steps": ("3", "rl.num_update_steps", 3),
    "--experience_batch_size": ("8", "rl.experience_batch_size", 8),
    "--train_batch_size": ("4", "train.batch_size", 4),
    "--accumulation_steps": ("4", "train.accumulation_steps", 4),
    "--tp": ("1", "parallel.tp", 1),
    "--lr": ("1e-5", "train.lr", 1e-5),
    "--mixed_precision": ("bf16", "train.mixed_precision", "bf16"),
    "--grad_clip": ("0.5", "train.grad_clip", 0.5),
    "--weight_decay": ("0.01", "train.weight_decay", 0.01),
    "--warmup_steps": ("3", "train.warmup_steps", 3),
    "--grad_checkpoint": (None, "model.grad_checkpoint", True),
    "--save_interval": ("5", "checkpoint.save_interval", 5),
    "--save_path": ("out/ppo", "checkpoint.save_path", "out/ppo"),
    "--use_wandb": (None, "logging.use_wandb", True),
}


def _get(cfg, dotted: str):
    section, field = dotted.split(".")
    return getattr(getattr(cfg, section), field)


def test_every_seed_ppo_flag_lands_in_its_field():
    argv = []
    for flag, (value, _, _) in SEED_PPO_FLAGS.items():
        argv += [flag] if value is None else [flag, value]
    cfg = parse_config(PPOConfig, argv, "rlhf-ray ppo")
    for flag, (_, dotted, expected) in SEED_PPO_FLAGS.items():
        assert _get(cfg, dotted) == expected, flag


def test_grpo_has_its_own_defaults_and_no_critic():
    cfg = parse_config(GRPOConfig, ["--kl_coef", "0.02"], "rlhf-ray grpo")
    assert cfg.algorithm.advantage_estimator == "grpo" and cfg.algorithm.kl_mode == "loss"
    assert cfg.algorithm.kl_coef == 0.02 and cfg.algorithm.resolved_kl_estimator == "low_var_kl"
    assert cfg.generator.n_samples_per_prompt == 4
    assert not hasattr(cfg, "critic")
    ppo = parse_config(PPOConfig, [], "rlhf-ray ppo")
    assert ppo.algorithm.advantage_estimator == "gae" and ppo.algorithm.resolved_kl_estimator == "k1"
    for defaults in (cfg, ppo):                  # the defaults satisfy the buffer arithmetic
        BufferPlan.from_config(defaults).check()


def test_job_defaults_survive_a_partial_section(tmp_path):
    """GRPO's defaults are TrainSection/AlgorithmSection instances: a flag or YAML key for one field keeps the rest."""
    cfg = parse_config(GRPOConfig, ["--lr", "1e-6", "--norm_adv_by_std", "false"], "rlhf-ray grpo")
    assert (cfg.train.batch_size, cfg.train.accumulation_steps, cfg.train.lr) == (16, 2, 1e-6)
    assert cfg.algorithm.advantage_estimator == "grpo" and cfg.algorithm.kl_coef == 0.01
    path = tmp_path / "grpo.yaml"
    path.write_text("train:\n  seed: 3\ngenerator:\n  temperature: 0.7\n")
    cfg = parse_config(GRPOConfig, ["--config", str(path)], "rlhf-ray grpo")
    assert (cfg.train.batch_size, cfg.train.seed, cfg.generator.n_samples_per_prompt) == (16, 3, 4)


def test_seed_names_inside_their_section_load_from_yaml(tmp_path):
    """YAML files written with the former field names (`critic: {critic_lr: ...}`) keep loading."""
    path = tmp_path / "ppo.yaml"
    path.write_text("train:\n  train_batch_size: 2\ncritic:\n  critic_lr: 0.5\n  critic_pool: a\n"
                    "reference:\n  ref_num_workers: 3\nreward:\n  reward_gpus_per_worker: 0.5\nref_pool: b\n")
    cfg = parse_config(PPOConfig, ["--config", str(path)], "rlhf-ray ppo")
    assert (cfg.train.batch_size, cfg.critic.lr, cfg.critic.pool) == (2, 0.5, "a")
    assert (cfg.reference.num_workers, cfg.reference.pool, cfg.reward.gpus_per_worker) == (3, "b", 0.5)
    path.write_text("critic:\n  ref_pool: a\n")        # a bare name of another section is not taken there
    with pytest.raises(ConfigError, match="unknown key 'critic.ref_pool'"):
        parse_config(PPOConfig, ["--config", str(path)], "rlhf-ray ppo")


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: gae, grpo"):
        parse_config(PPOConfig, ["--advantage_estimator", "vtrace"], "rlhf-ray ppo")


def _cfg(cls, tiny_model_dir, *flags):
    base = ["--pretrain", str(tiny_model_dir), "--prompt_dataset", "unused", "--reward_source", "gsm8k"]
    return parse_config(cls, base + list(flags), "test")


@pytest.mark.parametrize("flags, numbers", [
    # no TP: dp = 2; 2 × 1 × 8 = 16 vs 4 × 2 × 2 = 16 holds; 3 collect steps breaks it
    (["--num_workers", "2", "--num_collect_steps", "3", "--experience_batch_size", "8", "--train_batch_size", "4",
      "--accumulation_steps", "2"],
     "dp (2) × num_collect_steps (3) × experience_batch_size (8) = 48 samples; train batch = train_batch_size (4) × "
     "accumulation_steps (2) × dp (2) = 16 samples (dp = num_workers / tp = 2 / 1)"),
    # TP 2 over 4 workers: dp = 2, so the TP ranks do not count
    (["--num_workers", "4", "--tp", "2", "--experience_batch_size", "8", "--train_batch_size", "8",
      "--accumulation_steps", "2"],
     "dp (2) × num_collect_steps (1) × experience_batch_size (8) = 16 samples; train batch = train_batch_size (8) × "
     "accumulation_steps (2) × dp (2) = 32 samples (dp = num_workers / tp = 4 / 2)"),
])
def test_buffer_arithmetic_is_refused_with_the_numbers(tiny_model_dir, flags, numbers):
    cfg = _cfg(PPOConfig, tiny_model_dir, *flags)
    with pytest.raises(ConfigError, match="buffer arithmetic does not hold") as caught:
        check_rl_config(cfg, "ppo")
    assert numbers in str(caught.value)
    assert "Try --accumulation_steps" in str(caught.value)


def test_buffer_arithmetic_holds_with_tp_and_group_samples(tiny_model_dir):
    cfg = _cfg(GRPOConfig, tiny_model_dir, "--num_workers", "4", "--tp", "2", "--experience_batch_size", "2",
               "--n_samples_per_prompt", "4", "--num_collect_steps", "2", "--train_batch_size", "8",
               "--accumulation_steps", "2")
    check_rl_config(cfg, "grpo")
    plan = BufferPlan.from_config(cfg)
    assert (plan.dp, plan.prompts_per_collect, plan.samples_per_collect) == (2, 4, 16)
    assert plan.buffer_samples == plan.train_samples == 32 and plan.samples_per_rank == 16


def test_cli_refuses_a_broken_layout_before_starting_anything(tiny_model_dir, capsys):
    from rlhf_ray.pipelines import ppo

    status = ppo.main(["--pretrain", str(tiny_model_dir), "--prompt_dataset", "unused", "--reward_source", "gsm8k",
                       "--experience_batch_size", "3", "--train_batch_size", "4", "--accumulation_steps", "1"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-ray ppo: the buffer arithmetic does not hold") and "Try --train_batch_size 3" in err


@pytest.mark.parametrize("cls, flags, message", [
    (GRPOConfig, ["--n_samples_per_prompt", "1"], "needs n_samples_per_prompt > 1 (got 1)"),
    (GRPOConfig, ["--advantage_estimator", "gae"], "needs a critic, which `rlhf-ray grpo` does not run"),
    (PPOConfig, ["--temperature", "0"], "RL needs sampled rollouts"),
    (PPOConfig, ["--kl_ctrl_type", "adaptive"], "needs --target_kl"),
    (PPOConfig, ["--ptx_coef", "0.1"], "needs --pretrain_dataset"),
    (PPOConfig, ["--reward_source", "rule"], "needs --reward_fn"),
    (PPOConfig, ["--rm_checkpoint_path", "/nonexistent/rm"], "--rm_checkpoint_path /nonexistent/rm: no config.json"),
])
def test_cross_section_refusals_name_the_flag(tiny_model_dir, cls, flags, message):
    cfg = _cfg(cls, tiny_model_dir, "--experience_batch_size", "2", "--train_batch_size", "8",
               "--accumulation_steps", "1", *flags)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("`", ".")):
        check_rl_config(cfg, "grpo" if cls is GRPOConfig else "ppo")


def test_missing_reward_source_lists_the_choices(tiny_model_dir):
    cfg = parse_config(PPOConfig, ["--pretrain", str(tiny_model_dir), "--prompt_dataset", "d"], "test")
    with pytest.raises(ConfigError, match="--reward_fn file.py:function .rule., --rm_checkpoint_path DIR"):
        check_rl_config(cfg, "ppo")


def test_roles_follow_the_algorithm(tiny_model_dir):
    ppo = _cfg(PPOConfig, tiny_model_dir)
    assert active_roles(ppo) == ["policy", "critic", "reference", "generator"]
    no_critic = _cfg(PPOConfig, tiny_model_dir, "--advantage_estimator", "reinforce_plus_plus", "--kl_coef", "0")
    assert active_roles(no_critic) == ["policy", "generator"]
    grpo = _cfg(GRPOConfig, tiny_model_dir, "--reward_source", "model", "--rm_pretrain", str(tiny_model_dir))
    assert active_roles(grpo) == ["policy", "reference", "reward", "generator"]


def test_colocation_shares_bundles(tiny_model_dir):
    cfg = _cfg(PPOConfig, tiny_model_dir, "--num_workers", "2", "--cpus_per_worker", "2", "--ref_num_workers", "1",
               "--colocate_policy_reference", "--rm_pretrain", str(tiny_model_dir), "--reward_source", "model",
               "--colocate_critic_reward", "--num_engines", "2")
    plan = plan_roles(cfg, active_roles(cfg))
    bundle, members = plan.sets["policy+reference"]
    assert members == ["policy", "reference"] and bundle.num_workers == 2 and bundle.cpus_per_worker == 2
    assert plan.specs["policy"].cpus_per_worker == plan.specs["reference"].cpus_per_worker == 1.0
    assert plan.sets["critic+reward"][0].num_workers == 2
    assert plan.specs["generator"].cpus_per_worker == 1.0 and plan.set_of("generator") == "generator"
    # what each role's workers are handed: the critic has the policy's ranks on its own resources
    critic, reference = plan.layouts["critic"], plan.layouts["reference"]
    assert (critic.num_workers, critic.tp, critic.cpus_per_worker) == (2, 1, 1.0)
    assert (reference.num_workers, reference.tp, plan.layouts["reward"].num_workers) == (1, 1, 1)

    everything = _cfg(PPOConfig, tiny_model_dir, "--num_workers", "2", "--colocate_all", "--num_engines", "2")
    plan = plan_roles(everything, active_roles(everything))
    (name, (bundle, members)), = plan.sets.items()
    assert members == ["policy", "critic", "reference", "generator"] and bundle.num_workers == 2
    assert all(spec.cpus_per_worker == 0.25 for spec in plan.specs.values())


def test_colocated_roles_in_different_pools_are_refused(tiny_model_dir):
    cfg = _cfg(PPOConfig, tiny_model_dir, "--pool", "train", "--ref_pool", "infer", "--colocate_policy_reference")
    with pytest.raises(ConfigError, match=r"pinned to different pools \['infer', 'train'\]"):
        plan_roles(cfg, active_roles(cfg))


def test_off_policy_correction_is_on_by_default_in_async_mode_only(tiny_model_dir):
    from rlhf_ray.pipelines.rl.groups import loss_settings

    layout = ["--experience_batch_size", "2", "--train_batch_size", "8", "--accumulation_steps", "1"]
    sync = loss_settings(_cfg(GRPOConfig, tiny_model_dir, *layout))
    assert sync.rollout_is is None and sync.rollout_rs is None and not sync.rollout_correction.enabled
    cfg = _cfg(GRPOConfig, tiny_model_dir, *layout, "--async_mode", "true")
    assert loss_settings(cfg).rollout_is == "token" and loss_settings(cfg).rollout_is_threshold == 2.0
    assert any("decoupled objective" in note for note in check_rl_config(cfg, "grpo"))
    off = loss_settings(_cfg(GRPOConfig, tiny_model_dir, *layout, "--async_mode", "true", "--rollout_is", "none"))
    assert off.rollout_is is None
    icepop = loss_settings(_cfg(GRPOConfig, tiny_model_dir, *layout, "--rollout_rs", "token",
                                "--rollout_rs_threshold", "5", "--rollout_rs_threshold_lower", "0.5"))
    assert icepop.rollout_correction.band == (0.5, 5.0) and icepop.rollout_is is None


@pytest.mark.parametrize("flags, refused", [
    (["--async_mode", "true", "--top_p", "0.9"], "--top_p 0.9"),
    (["--async_mode", "true", "--top_k", "20"], "--top_k 20"),
    (["--old_logprobs_source", "rollout", "--temperature", "0.7", "--logprobs_mode", "raw"],
     "--temperature 0.7 with --logprobs_mode raw"),
    (["--rollout_is", "token", "--top_p", "0.5"], "--top_p 0.5"),
    (["--rollout_is", "token", "--old_logprobs_source", "rollout"], "makes them the same"),
    (["--async_mode", "true", "--rollout_is", "none", "--kl_mode", "reward", "--top_k", "5"], "--top_k 5"),
    (["--top_p", "0.9"], None),                               # sync, trainer old log-probs: nothing trains on them
    (["--temperature", "0.7", "--logprobs_mode", "raw"], None),
    (["--async_mode", "true", "--rollout_is", "none", "--temperature", "0.7", "--logprobs_mode", "processed"], None),
])
def test_sampler_logprobs_the_trainer_cannot_reproduce_are_refused_when_trained_on(tiny_model_dir, flags, refused):
    cfg = _cfg(GRPOConfig, tiny_model_dir, "--experience_batch_size", "2", "--train_batch_size", "8",
               "--accumulation_steps", "1", *flags)
    if refused is None:
        check_rl_config(cfg, "grpo")
        return
    with pytest.raises(ConfigError, match=refused):
        check_rl_config(cfg, "grpo")
