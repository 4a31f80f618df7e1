"""Pairwise preference losses (reward model: log_sig, log_exp; DPO, IPO, SimPO) against their formulas."""

import math
import subprocess
import sys

import pytest
import torch

from rlhf_ray.algorithms.preference import (NEEDS_REFERENCE, PREFERENCE_LOSSES, REWARD_MODEL_LOSSES,
                                            PreferenceLossParams, compute_dpo_loss, compute_ipo_loss,
                                            compute_log_exp_loss, compute_log_sig_loss, compute_sequence_logprobs,
                                            compute_simpo_loss)


def test_sequence_logprobs_sum_and_mean():
    token_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])
    assert compute_sequence_logprobs(token_logprobs, mask).tolist() == [-5.0, 0.0]
    assert compute_sequence_logprobs(token_logprobs, mask, length_normalize=True).tolist() == [-2.5, 0.0]
    with pytest.raises(ValueError, match="differ"):
        compute_sequence_logprobs(token_logprobs, mask[:, :2])


def test_reward_losses_match_bradley_terry_and_each_other():
    chosen = torch.tensor([1.0, -0.5, 2.0, 0.0])
    rejected = torch.tensor([0.0, 0.5, -1.0, 0.0])
    expected = sum(math.log1p(math.exp(r - c)) for c, r in zip(chosen.tolist(), rejected.tolist())) / 4
    sig, sig_metrics = compute_log_sig_loss(chosen, rejected)
    exp, exp_metrics = compute_log_exp_loss(chosen, rejected)
    assert sig.item() == pytest.approx(expected, rel=1e-6)
    assert exp.item() == pytest.approx(expected, rel=1e-6)
    # ties count as wrong: 2 of 4 pairs have chosen > rejected
    assert sig_metrics["rm/acc"] == 0.5
    assert exp_metrics == pytest.approx(sig_metrics, rel=1e-6)
    assert sig_metrics["rm/reward_chosen"] == pytest.approx(0.625)
    assert sig_metrics["rm/reward_rejected"] == pytest.approx(-0.125)
    assert sig_metrics["rm/margin"] == pytest.approx(0.75)


def test_log_exp_stays_finite_where_the_literal_formula_overflows():
    chosen, rejected = torch.tensor([0.0]), torch.tensor([200.0])
    assert math.isinf(torch.log(1 + torch.exp(rejected - chosen)).item())  # the seed's literal form
    loss, _ = compute_log_exp_loss(chosen, rejected)
    assert loss.item() == pytest.approx(200.0)


def test_reward_loss_gradient_separates_the_pair():
    chosen = torch.zeros(3, requires_grad=True)
    rejected = torch.zeros(3, requires_grad=True)
    loss, _ = compute_log_sig_loss(chosen, rejected)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected


def _pairs(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(n, generator=g) for _ in range(4)]


def test_dpo_matches_its_formula_and_starts_at_log2():
    pc, pr, rc, rr = _pairs()
    beta = 0.2
    loss, metrics = compute_dpo_loss(pc, pr, rc, rr, params=PreferenceLossParams(beta=beta))
    margin = beta * ((pc - rc) - (pr - rr))
    expected = torch.stack([-torch.log(torch.sigmoid(m)) for m in margin]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["dpo/reward_margin"] == pytest.approx(margin.mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["dpo/acc"] == pytest.approx((margin > 0).float().mean().item())
    assert metrics["dpo/reward_chosen"] == pytest.approx((beta * (pc - rc)).mean().item(), rel=1e-6)
    # policy == reference: every implicit reward is 0 and the loss is log 2
    loss0, metrics0 = compute_dpo_loss(pc, pr, pc, pr)
    assert loss0.item() == pytest.approx(math.log(2), rel=1e-6)
    assert metrics0["dpo/reward_margin"] == 0.0 and metrics0["dpo/acc"] == 0.0


def test_dpo_label_smoothing_is_the_flipped_label_mixture():
    pc, pr, rc, rr = _pairs(1)
    eps, beta = 0.1, 0.5
    loss, _ = compute_dpo_loss(pc, pr, rc, rr, params=PreferenceLossParams(beta=beta, label_smoothing=eps))
    flipped, _ = compute_dpo_loss(pr, pc, rr, rc, params=PreferenceLossParams(beta=beta))
    plain, _ = compute_dpo_loss(pc, pr, rc, rr, params=PreferenceLossParams(beta=beta))
    assert loss.item() == pytest.approx((1 - eps) * plain.item() + eps * flipped.item(), rel=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr, rc, rr = _pairs(2)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, _ = compute_dpo_loss(pc, pr, rc, rr)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_ipo_is_zero_at_its_target_margin():
    beta = 0.25
    target = 1 / (2 * beta)
    rc, rr = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -1.0])
    pc = rc + target / 2
    pr = rr - target / 2
    loss, metrics = compute_ipo_loss(pc, pr, rc, rr, params=PreferenceLossParams(beta=beta))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert metrics["dpo/reward_margin"] == pytest.approx(beta * target)
    loss_far, _ = compute_ipo_loss(pc + 1.0, pr, rc, rr, params=PreferenceLossParams(beta=beta))
    assert loss_far.item() == pytest.approx(1.0)  # overshooting the margin is penalised too


def test_simpo_needs_no_reference_and_applies_gamma():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    beta, gamma = 2.0, 0.5
    loss, metrics = compute_simpo_loss(pc, pr, None, None, params=PreferenceLossParams(beta=beta, gamma=gamma))
    expected = -torch.nn.functional.logsigmoid(beta * (pc - pr) - gamma).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["dpo/reward_chosen"] == pytest.approx(beta * pc.mean().item())
    with_ref, _ = compute_simpo_loss(pc, pr, pc * 7, pr * 7, params=PreferenceLossParams(beta=beta, gamma=gamma))
    assert with_ref.item() == loss.item()


@pytest.mark.parametrize("name", PREFERENCE_LOSSES.names())
def test_every_registered_preference_loss_runs_and_descends(name):
    # policy == reference, so every pair is below each loss's target margin and descent must raise chosen
    pc, pr, _, _ = _pairs(3)
    rc, rr = pc.clone(), pr.clone()
    pc.requires_grad_(True)
    loss, metrics = PREFERENCE_LOSSES.get(name)(pc, pr, rc, rr, params=PreferenceLossParams(beta=0.1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert (pc.grad < 0).all(), f"{name} must reward raising the chosen log-prob (below its target)"
    assert {"loss/preference", "dpo/reward_margin", "dpo/acc"} <= set(metrics)
    if NEEDS_REFERENCE[name]:
        with pytest.raises(ValueError, match="reference"):
            PREFERENCE_LOSSES.get(name)(pc, pr, None, None, params=PreferenceLossParams())


def test_registries_list_known_names_and_refuse_bad_settings():
    assert REWARD_MODEL_LOSSES.names() == ["log_exp", "log_sig"]
    with pytest.raises(ValueError, match="dpo, ipo, simpo"):
        PREFERENCE_LOSSES.get("kto")
    with pytest.raises(ValueError, match="already registered"):
        REWARD_MODEL_LOSSES.add("log_sig", compute_log_sig_loss)
    with pytest.raises(ValueError, match="beta must be > 0"):
        PreferenceLossParams(beta=0)
    with pytest.raises(ValueError, match="shape"):
        compute_log_sig_loss(torch.zeros(2), torch.zeros(3))


def test_preference_module_imports_neither_ray_nor_vllm():
    code = ("import sys, rlhf_ray.algorithms.preference; "
            "print(any(m == 'ray' or m.startswith(('ray.', 'vllm')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
