"""KL estimators (formula loops + Monte-Carlo unbiasedness), KL controllers (hand-derived), and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.kl import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, build_kl_controller,
                                    compute_kl)
from rlhf_ray.algorithms.registry import Registry


def loop_k1(lp, ref):
    return lp - ref


def loop_abs(lp, ref):
    return abs(lp - ref)


def loop_k2(lp, ref):
    return 0.5 * (lp - ref) ** 2


def loop_k3(lp, ref):
    return math.exp(ref - lp) - 1 - (ref - lp)


def loop_low_var_kl(lp, ref):
    log_ratio = min(max(ref - lp, -20.0), 20.0)
    return min(max(math.exp(log_ratio) - 1 - log_ratio, -10.0), 10.0)


REFERENCES = {"k1": loop_k1, "abs": loop_abs, "k2": loop_k2, "k3": loop_k3, "low_var_kl": loop_low_var_kl}


def test_every_registered_kl_estimator_matches_its_formula():
    assert set(KL_ESTIMATORS.names()) == set(REFERENCES), "add a reference formula for the new KL estimator"
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(5, 7, generator=generator, dtype=torch.float64) * 4
    ref_logprobs = -torch.rand(5, 7, generator=generator, dtype=torch.float64) * 4
    ref_logprobs[0, 0] = logprobs[0, 0] + 5.0  # k3 = e^5 - 6 > 10: low_var_kl must clamp it
    for name in KL_ESTIMATORS.names():
        kl = compute_kl(logprobs, ref_logprobs, name)
        expected = [[REFERENCES[name](a, b) for a, b in zip(r1, r2)]
                    for r1, r2 in zip(logprobs.tolist(), ref_logprobs.tolist())]
        assert torch.allclose(kl, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6), name
    assert compute_kl(logprobs, ref_logprobs, "low_var_kl")[0, 0].item() == 10.0


def test_k1_and_k3_are_unbiased_and_k3_nonnegative():
    """Sampling tokens from pi, the means of k1 and k3 converge to the exact KL(pi || pi_ref)."""
    generator = torch.Generator().manual_seed(1)
    pi = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), dim=0)
    pi_ref = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), dim=0)
    exact = float((pi * (pi.log() - pi_ref.log())).sum())
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=generator)
    logprobs, ref_logprobs = pi.log()[tokens][None, :], pi_ref.log()[tokens][None, :]
    for name in ("k1", "k3"):
        assert compute_kl(logprobs, ref_logprobs, name).mean().item() == pytest.approx(exact, abs=0.01), name
    assert compute_kl(logprobs, ref_logprobs, "k3").min().item() >= 0.0


def test_adaptive_controller_follows_ziegler_update():
    controller = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10_000)
    controller.update(current_kl=9.0, n_steps=256)   # error 0.5 clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000), abs=1e-15)
    controller.update(current_kl=6.6, n_steps=100)   # error 0.1 (not clipped)
    assert controller.value == pytest.approx(0.1 * 1.00512 * 1.001, abs=1e-15)
    controller.update(current_kl=0.0, n_steps=1000)  # error -1 clipped to -0.2
    expected = 0.1 * 1.00512 * 1.001 * 0.98
    assert controller.value == pytest.approx(expected, abs=1e-15)

    restored = build_kl_controller("adaptive", kl_coef=0.5, target_kl=6.0, horizon=10_000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_fixed_controller_and_builder_errors():
    fixed = build_kl_controller("fixed", kl_coef=0.05)
    assert isinstance(fixed, FixedKLController)
    fixed.update(current_kl=100.0, n_steps=10)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target_kl and horizon"):
        build_kl_controller("adaptive", kl_coef=0.1)
    with pytest.raises(ValueError, match="'fixed' or 'adaptive'"):
        build_kl_controller("pid", kl_coef=0.1)


def test_registry_refuses_duplicates_and_lists_names():
    registry: Registry = Registry("widget", setting="widget_kind")
    registry.register("a", "alias_a")(len)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(abs)
    assert registry.get("alias_a") is len
    with pytest.raises(ValueError, match=r"unknown widget widget_kind='b'; known: a, alias_a"):
        registry.get("b")
    registry.reserve("model", "registered by the pipeline")
    with pytest.raises(ValueError, match="not available yet: registered by the pipeline"):
        registry.get("model")
    with pytest.raises(ValueError, match="known: abs, k1, k2, k3, low_var_kl"):
        compute_kl(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
