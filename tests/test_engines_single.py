"""The engine interface in one process (no process group): registry, accumulation, clipping, schedule, mixed
precision and loss scaling, step skipping, and refusals with their messages."""

from __future__ import annotations

import math

import pytest
import torch
from engines_harness import ACCUMULATION, lm_loss, make_data, make_engine, run_steps

from rlhf_ray.config.base import ConfigError
from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
from rlhf_ray.engines import plugins
from rlhf_ray.engines.optim import no_decay, parameter_groups, warmup_cosine_factor
from rlhf_ray.engines.precision import DynamicLossScaler
from rlhf_ray.engines.registry import build_engine, known_engines, register_engine, validate_engine_config
from rlhf_ray.models.loading import load_causal_lm

DATA = make_data()


def test_registry_names_every_backend_and_lists_them_on_a_miss(tiny_model_dir):
    names = set(known_engines())
    assert {"ddp", "fsdp", "fsdp_cpu", "tp", "3d", "colossal_ddp", "zero2", "zero2_cpu", "gemini",
            "gemini_auto"} <= names
    with pytest.raises(ValueError, match=r"--plugin 'zer02' is not a known training backend; choose one of .*ddp"):
        build_engine(ParallelSection(plugin="zer02"), TrainSection(), lambda: None, 10)


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="'ddp' is already registered"):
        register_engine("ddp")(lambda *a, **k: None)


@pytest.mark.parametrize("plugin, alternative", [("zero2", "fsdp"), ("zero2_cpu", "fsdp_cpu"), ("gemini", "fsdp"),
                                                 ("gemini_auto", "fsdp_cpu")])
def test_gpu_only_colossal_plugins_refuse_on_cpu_naming_the_alternative(tiny_model_dir, plugin, alternative):
    with pytest.raises(ValueError) as info:
        make_engine(tiny_model_dir, plugin)
    message = str(info.value)
    assert f"--plugin {plugin} is ColossalAI's" in message
    assert f"Use the torch-native --plugin {alternative} instead" in message
    assert message.count("\n") == 0                     # one message, one line


def test_gemini_refuses_accumulation_when_it_could_run(monkeypatch):
    # colossalai is mocked as installed (it is not on this CPU machine) and the rank is told it sees CUDA: only the
    # rule is under test.
    monkeypatch.setattr(plugins, "colossalai_installed", lambda: True)
    parallel = ParallelSection(plugin="gemini", gpus_per_worker=1)
    with pytest.raises(ValueError, match=r"--plugin gemini does not support gradient accumulation \(got "
                                         r"--accumulation_steps 4\)"):
        plugins.check_plugin_usable("gemini", parallel, TrainSection(accumulation_steps=4), cuda_visible=True)
    plugins.check_plugin_usable("gemini", parallel, TrainSection(accumulation_steps=1), cuda_visible=True)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        plugins.check_plugin_usable("gemini", parallel, TrainSection(accumulation_steps=1), cuda_visible=False)


@pytest.mark.parametrize("plugin, alternative", [("zero2", "fsdp"), ("zero2_cpu", "fsdp_cpu"), ("gemini", "fsdp"),
                                                 ("gemini_auto", "fsdp_cpu")])
def test_the_driver_refuses_gpu_only_plugins_without_gpus(monkeypatch, plugin, alternative):
    """What the jobs run before Ray starts: with --gpus_per_worker 0 no rank can get a GPU, wherever the driver
    runs; with GPUs reserved the driver accepts (the ranks check that CUDA is visible)."""
    monkeypatch.setattr(plugins, "colossalai_installed", lambda: True)
    with pytest.raises(ConfigError) as info:
        validate_engine_config(ParallelSection(plugin=plugin), TrainSection())
    assert f"--plugin {plugin} is ColossalAI's" in str(info.value) and "--gpus_per_worker is 0" in str(info.value)
    assert f"Use the torch-native --plugin {alternative} instead" in str(info.value)
    validate_engine_config(ParallelSection(plugin=plugin, gpus_per_worker=1), TrainSection())


def test_settings_are_checked_on_the_driver_without_building_anything(monkeypatch):
    validate_engine_config(ParallelSection(plugin="fsdp", num_workers=4, tp=2), TrainSection())
    with pytest.raises(ConfigError, match="choose one of"):
        validate_engine_config(ParallelSection(plugin="deepspeed"), TrainSection())
    with pytest.raises(ConfigError, match=r"--plugin tp needs --tp 2 or more"):
        validate_engine_config(ParallelSection(plugin="tp", num_workers=2), TrainSection())
    monkeypatch.setattr(plugins, "colossalai_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"--plugin colossal_ddp .* colossalai is not installed"):
        validate_engine_config(ParallelSection(plugin="colossal_ddp"), TrainSection())
    monkeypatch.setattr(plugins, "colossalai_installed", lambda: True)
    gpus = {"gpus_per_worker": 1}
    with pytest.raises(ConfigError, match=r"--plugin gemini_auto does not support gradient accumulation"):
        validate_engine_config(ParallelSection(plugin="gemini_auto", **gpus), TrainSection(accumulation_steps=2))
    with pytest.raises(ConfigError, match=r"use --plugin 3d or --plugin fsdp --tp 2"):
        validate_engine_config(ParallelSection(plugin="zero2", num_workers=2, tp=2, **gpus), TrainSection())


def test_layout_errors_name_the_settings(tiny_model_dir):
    with pytest.raises(ValueError, match=r"--plugin tp needs --tp 2 or more \(got --tp 1\)"):
        make_engine(tiny_model_dir, "tp")
    with pytest.raises(ValueError, match=r"--num_workers 2 but the process group has 1 rank"):
        make_engine(tiny_model_dir, "fsdp", world=2)


def test_accumulation_equals_one_big_batch(tiny_model_dir):
    """2 micro-batches of 2 rows with accumulation == 1 batch of 4 rows (equal-length rows, token-mean loss)."""
    accumulated = make_engine(tiny_model_dir, accumulation=ACCUMULATION)
    losses = run_steps(accumulated, DATA, range(3))
    whole = make_engine(tiny_model_dir, accumulation=1)
    merged = DATA.reshape(DATA.shape[0], 1, -1, DATA.shape[-1])            # (steps, 1, 2 * 4 rows, seq)
    assert run_steps(whole, merged, range(3)) == pytest.approx(losses, rel=1e-5)
    # The gradient itself (Adam would hide a wrong scale): 2 accumulated halves == the whole batch's gradient.
    norms = []
    for engine, batches in ((accumulated, DATA[3]), (whole, merged[3])):
        for rows in batches:
            engine.forward_backward({"input_ids": rows}, lm_loss)
        norms.append(engine.optimizer_step()["grad_norm"])
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    # Weights agree to 1e-4, not 1e-6: Adam divides by sqrt(v), which turns float rounding in near-zero gradients
    # (rare tokens' embeddings) into visible differences. A wrong 1/accumulation_steps scale would differ by ~lr.
    for (name, a), (_, b) in zip(accumulated.iter_weights(), whole.iter_weights()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_clipping_scales_gradients_to_the_global_norm(tiny_model_dir):
    engine = make_engine(tiny_model_dir, accumulation=1, grad_clip=0.5)
    engine.forward_backward({"input_ids": DATA[0, 0]}, lm_loss)
    params = engine.trainable_parameters
    expected_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    assert expected_norm > 0.5                          # so clipping must act
    expected = [p.grad.clone() * 0.5 / (expected_norm + 1e-6) for p in params]
    seen = []
    engine.optimizer.step = lambda: seen.extend(p.grad.clone() for p in params)   # what AdamW would receive
    metrics = engine.optimizer_step()
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-6)
    torch.testing.assert_close(seen, expected, rtol=1e-6, atol=0)


def test_weight_decay_spares_norms_and_biases(tiny_model_dir):
    model = load_causal_lm(ModelSection(pretrain=str(tiny_model_dir)))
    groups = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all("norm" in n for n in undecayed) and undecayed
    assert all("norm" not in n for n in decayed) and "lm_head.weight" in decayed
    assert no_decay("x.bias", torch.zeros(3, 3)) and not no_decay("x.weight", torch.zeros(3, 3))


def test_warmup_then_cosine_to_ten_percent():
    factors = [warmup_cosine_factor(step, warmup_steps=4, total_steps=14) for step in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert factors[9] == pytest.approx(0.55)              # half way through the cosine: (1 + 0.1) / 2
    assert factors[14] == pytest.approx(0.1) and factors[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_scheduler_and_lr_follow_the_schedule(tiny_model_dir):
    engine = make_engine(tiny_model_dir, accumulation=1)
    lrs = []
    for step in range(3):
        engine.forward_backward({"input_ids": DATA[step, 0]}, lm_loss)
        lrs.append(engine.optimizer_step()["lr"])
    assert lrs == pytest.approx([2e-3 * f for f in (0.5, 1.0, warmup_cosine_factor(2, 2, 10))])


def test_non_finite_gradients_skip_the_step(tiny_model_dir):
    engine = make_engine(tiny_model_dir, accumulation=1)
    before = {n: t.clone() for n, t in engine.iter_weights()}
    engine.forward_backward({"input_ids": DATA[0, 0]}, lambda m, b: (lm_loss(m, b)[0] * float("inf"), {}))
    metrics = engine.optimizer_step()
    assert metrics["skipped"] == 1.0 and not math.isfinite(metrics["grad_norm"])
    for name, tensor in engine.iter_weights():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    assert all(p.grad is None for p in engine.trainable_parameters)


def test_fp16_with_loss_scaling_trains_on_cpu(tiny_model_dir):
    engine = make_engine(tiny_model_dir, precision="fp16", accumulation=1)
    losses = []
    for step in range(3):
        metrics = engine.forward_backward({"input_ids": DATA[step, 0]}, lm_loss)
        metrics |= engine.optimizer_step()
        losses.append(metrics["loss"])
        assert metrics["loss_scale"] == 2.0 ** 16 and metrics["skipped"] == 0.0
    reference = run_steps(make_engine(tiny_model_dir, accumulation=1), DATA[:, :1], range(3))
    assert losses == pytest.approx(reference, abs=5e-3)


def test_loss_scaler_backs_off_and_grows():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    assert scaler.update(float("nan")) is False and scaler.scale == 4.0
    assert scaler.update(1.0) and scaler.update(1.0) and scaler.scale == 8.0
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def test_optimizer_step_before_the_accumulation_boundary_is_refused(tiny_model_dir):
    engine = make_engine(tiny_model_dir, accumulation=2)
    engine.forward_backward({"input_ids": DATA[0, 0]}, lm_loss)
    assert not engine.is_accumulation_boundary()
    with pytest.raises(RuntimeError, match="after 1 of 2 micro-batches"):
        engine.optimizer_step()


def test_forward_runs_without_grad(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    logits = engine.forward({"input_ids": DATA[0, 0]}, lambda m, b: m(input_ids=b["input_ids"]).logits)
    assert logits.shape == (4, 16, engine.unwrap().config.vocab_size) and not logits.requires_grad


def test_single_process_resume_is_exact_including_the_fp16_scaler(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, precision="fp16")
    run_steps(engine, DATA, range(2))
    engine.scaler.scale = 1024.0                          # a state worth restoring
    engine.save_checkpoint(tmp_path / "ckpt", {"step": 2})
    uninterrupted = run_steps(engine, DATA, range(2, 4))
    resumed = make_engine(tiny_model_dir, precision="fp16")
    assert resumed.load_checkpoint(tmp_path / "ckpt") == {"step": 2}
    assert resumed.scaler.scale == 1024.0 and resumed.global_step == 2
    assert run_steps(resumed, DATA, range(2, 4)) == uninterrupted


def test_build_engine_in_process_returns_a_working_ddp_engine(tiny_model_dir):
    model_cfg = ModelSection(pretrain=str(tiny_model_dir))
    engine = build_engine(ParallelSection(), TrainSection(), lambda: load_causal_lm(model_cfg), 4, model_cfg=model_cfg)
    assert engine.unwrap() is engine.model                # one process: nothing wraps the model
    assert engine.scheduler.warmup_steps == 0             # 2.5% of 4 steps
