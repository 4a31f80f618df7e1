"""The RL losses as a trainer rank computes them on one micro-batch. Pure torch (no Ray), so they are tested alone.

    logits = model(sequences)                       (B, P + R, V)   prompt left-padded, response right-padded
    span   = logits[:, P - 1 : P + R - 1]           (B, R, V)       logits at t predict token t + 1
    logprobs = log softmax(span / T)[response]      (B, R)          T = the sampling temperature

(With --shared_prompt_forward, models/shared_prompt.py computes `span` running each distinct prompt once; the same
numbers to float rounding.)

Policy objective (minimised):   pg_loss + entropy_coef * entropy_loss + kl_loss_coef * kl_loss  [ + ptx_coef * ptx ]
Critic objective:               clipped value loss on values[:, P - 1 : P + R - 1] (the state before each token)

Exact global means under data parallelism and accumulation: each loss is first reduced over the micro-batch
(`loss_agg_mode`), then multiplied by `rescale = local_units * dp * accumulation_steps / global_units` (units =
tokens for "token-mean", sequences for the seq-mean modes, counted over every rank and micro-batch of the optimizer
step). The engine divides by accumulation_steps and DDP averages over dp ranks, so the gradient is that of the mean
over the whole global batch, however the tokens are spread. The ptx term is a plain token mean per micro-batch
(its own data, averaged over micro-batches and ranks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_ray.algorithms import (LossAggregation, PolicyLossParams, compute_entropy, compute_entropy_loss,
                                 compute_kl_loss, compute_policy_loss, compute_ptx_loss, compute_token_logprobs,
                                 compute_value_loss, count_tokens_and_sequences)
from rlhf_ray.algorithms.off_policy import RolloutCorrectionParams, compute_rollout_correction
from rlhf_ray.models.shared_prompt import shared_prompt_logits
from rlhf_ray.workers.objectives import causal_logits, position_ids_for


@dataclass(frozen=True)
class RLLossSettings:
    """The loss settings a trainer rank needs: the algorithm section's fields of the same names, and three values
    the driver resolves (pipelines/rl/groups.py loss_settings)."""

    policy_loss: str = "ppo"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    entropy_coef: float = 0.0
    kl_loss_coef: float = 0.0          # > 0 only when kl_mode is "loss"
    kl_estimator: str = "low_var_kl"
    ptx_coef: float = 0.0
    loss_agg_mode: str = "token-mean"
    max_response_len: int | None = None   # the generator's max_new_tokens: the constant of seq-mean-token-sum-norm
    temperature: float = 1.0
    # on-policy with one optimizer step per episode: pi_old is the weights being trained, so the old log-probs are
    # the update's own, detached (ratio exactly 1, the policy-gradient gradient), and no separate pass is needed
    old_logprobs_from_update: bool = False
    # sampler-mismatch / off-policy correction (algorithms/off_policy.py); resolved per mode by the driver
    rollout_is: str | None = None
    rollout_is_threshold: float = 2.0
    rollout_rs: str | None = None
    rollout_rs_threshold: float = 2.0
    rollout_rs_threshold_lower: float | None = None
    # each distinct prompt of a micro-batch runs once in the policy, reference and old-log-prob passes
    shared_prompt_forward: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def policy_params(self) -> PolicyLossParams:
        return PolicyLossParams(self.clip_ratio_low, self.clip_ratio_high, self.dual_clip)

    @property
    def aggregation(self) -> LossAggregation:
        """The micro-batch reduction (the global counts enter through `rescale`)."""
        return LossAggregation(self.loss_agg_mode, max_response_len=self.max_response_len)

    @property
    def rollout_correction(self) -> RolloutCorrectionParams:
        return RolloutCorrectionParams(self.rollout_is, self.rollout_is_threshold, self.rollout_rs,
                                       self.rollout_rs_threshold, self.rollout_rs_threshold_lower)


def response_span(full: torch.Tensor, response_len: int) -> torch.Tensor:
    """`full[:, P - 1 : P + R - 1]`: the positions whose outputs predict (or value the state before) each
    response token; works for logits (B, L, V) and values (B, L)."""
    length = full.shape[1]
    return full[:, length - response_len - 1:length - 1]


def units_of(response_mask: torch.Tensor, loss_agg_mode: str) -> float:
    """Loss units of a micro-batch: kept tokens ("token-mean") or sequences with a kept token."""
    tokens, sequences = count_tokens_and_sequences(response_mask)
    return tokens if loss_agg_mode == "token-mean" else sequences


@torch.no_grad()
def compute_response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                              temperature: float = 1.0, share_prompts: bool = False) -> torch.Tensor:
    """log-probs of the response tokens `(B, R)` under softmax(logits / temperature), float32."""
    span = response_logits(model, sequences, attention_mask, response_len, share_prompts)
    return compute_token_logprobs(span, sequences[:, -response_len:], temperature)


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                    share_prompts: bool) -> torch.Tensor:
    """The logits that predict the response tokens `(B, R, V)`; with `share_prompts`, each distinct prompt of the
    micro-batch runs once where the model allows (models/shared_prompt.py), else the full sequences run."""
    if share_prompts:
        shared = shared_prompt_logits(model, sequences, attention_mask, response_len)
        if shared is not None:
            return shared
    return response_span(causal_logits(model, sequences, attention_mask), response_len)


@torch.no_grad()
def compute_response_values(model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                            response_len: int) -> torch.Tensor:
    """Critic values `(B, R)`: the value of the state before each response token."""
    values = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids_for(attention_mask))
    return response_span(values, response_len).float()


def _pad_right(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return tensor if tensor.shape[1] == width else F.pad(tensor, (0, width - tensor.shape[1]), value=value)


def apply_rollout_correction(experience, params: RolloutCorrectionParams) -> dict[str, float]:
    """The off-policy correction on a rank's whole share of the buffer, before it is cut into micro-batches (the
    sequence-level weights need whole responses; the loss units are counted on the corrected mask):
    `experience.response_mask` loses the rejected tokens and `experience.extras["rollout_is_weights"]` gets the
    weights. Needs `old_logprobs` and the sampler's `rollout_logprobs`. Returns the `rollout_corr/...` metrics
    ({} when the correction is off)."""
    if not params.enabled:
        return {}
    if experience.old_logprobs is None or experience.rollout_logprobs is None:
        raise ValueError("the off-policy correction (--rollout_is / --rollout_rs) needs the trainer's old log-probs "
                         "and the sampler's log-probs in the experience")
    correction = compute_rollout_correction(experience.old_logprobs, experience.rollout_logprobs,
                                            experience.response_mask, params)
    experience.response_mask = correction.response_mask
    experience.extras["rollout_is_weights"] = correction.weights
    return correction.metrics


def actor_loss(model, batch: dict[str, Any], settings: RLLossSettings,
               rescale: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy objective on one micro-batch (see the module docstring).

    batch: sequences, attention_mask `(B, P + R)`; response_mask, advantages `(B, R)`; old_logprobs `(B, R)`
    unless settings.old_logprobs_from_update (then the sampler's rollout_logprobs `(B, R)`, when given, yield
    the metric rollout/logprob_gap_mean);
    ref_logprobs `(B, R)` when kl_loss_coef > 0; rollout_is_weights `(B, R)` when the off-policy correction is on
    (see `apply_rollout_correction`); optionally ptx_input_ids / ptx_attention_mask / ptx_labels
    `(Bp, Lp)` (one forward pass carries both: the rows are right-padded to one width and stacked).
    Metrics are local means over this micro-batch: loss/policy, policy/* (clip fractions, approx KL, ratio),
    policy/entropy, loss/kl, loss/ptx, loss/total.
    """
    sequences, attention_mask = batch["sequences"], batch["attention_mask"]
    mask = batch["response_mask"]
    rows, response_len = sequences.shape[0], mask.shape[1]
    input_ids, input_mask = sequences, attention_mask
    has_ptx = settings.ptx_coef > 0 and "ptx_input_ids" in batch
    if has_ptx:
        width = max(sequences.shape[1], batch["ptx_input_ids"].shape[1])
        input_ids = torch.cat([_pad_right(sequences, width, 0), _pad_right(batch["ptx_input_ids"], width, 0)])
        input_mask = torch.cat([_pad_right(attention_mask, width, 0),
                                _pad_right(batch["ptx_attention_mask"], width, 0)])
    if has_ptx:                                 # one forward pass carries the RL rows and the ptx rows
        logits = causal_logits(model, input_ids, input_mask)
        span = response_span(logits[:rows, :sequences.shape[1]], response_len)              # (B, R, V)
    else:
        span = response_logits(model, sequences, attention_mask, response_len, settings.shared_prompt_forward)
    logprobs = compute_token_logprobs(span, sequences[:, -response_len:], settings.temperature)

    local = settings.aggregation
    old_logprobs = logprobs.detach() if settings.old_logprobs_from_update else batch["old_logprobs"]
    pg_loss, metrics = compute_policy_loss(settings.policy_loss, logprobs, old_logprobs, batch["advantages"], mask,
                                           settings.policy_params, local, batch.get("rollout_is_weights"))
    if settings.old_logprobs_from_update and "rollout_logprobs" in batch:
        # The sampler's and the trainer's log-probs of the same tokens (the scoring pass reports it otherwise).
        metrics["rollout/logprob_gap_mean"] = local((old_logprobs - batch["rollout_logprobs"]).abs(), mask).item()
    rl_loss = pg_loss
    if settings.entropy_coef > 0:
        entropy_loss, entropy_metrics = compute_entropy_loss(compute_entropy(span, settings.temperature), mask, local)
        rl_loss = rl_loss + settings.entropy_coef * entropy_loss
    else:
        with torch.no_grad():
            entropy_metrics = {"policy/entropy": local(compute_entropy(span.detach(), settings.temperature),
                                                       mask).item()}
    metrics.update(entropy_metrics)
    if settings.kl_loss_coef > 0:
        kl_loss, kl_metrics = compute_kl_loss(logprobs, batch["ref_logprobs"], mask, settings.kl_estimator, local)
        rl_loss = rl_loss + settings.kl_loss_coef * kl_loss
        metrics.update(kl_metrics)
    total = rl_loss * rescale
    if has_ptx:
        ptx_logits = logits[rows:, :-1]
        labels = batch["ptx_labels"][:, 1:]
        label_mask = labels != -100
        ptx_logprobs = compute_token_logprobs(ptx_logits[:, :labels.shape[1]], labels.clamp(min=0))
        ptx_loss, ptx_metrics = compute_ptx_loss(ptx_logprobs, label_mask)
        total = total + settings.ptx_coef * ptx_loss
        metrics.update(ptx_metrics)
    metrics["loss/total"] = (rl_loss.item() + (settings.ptx_coef * metrics.get("loss/ptx", 0.0)))
    return total, metrics


def critic_loss(model, batch: dict[str, Any], settings: RLLossSettings,
                rescale: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss on one micro-batch: values `(B, R)` against `returns`, clipped around the scoring-time
    `values`. Metrics (local means): loss/value, value/clip_frac, value/mean, value/returns_mean,
    value/explained_variance."""
    sequences, attention_mask, mask = batch["sequences"], batch["attention_mask"], batch["response_mask"]
    values = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask))
    values = response_span(values, mask.shape[1]).float()
    loss, metrics = compute_value_loss(values, batch["values"], batch["returns"], mask, settings.value_clip,
                                       settings.aggregation)
    return loss * rescale, metrics
