"""Pure tensor math for RLHF: losses, advantage estimators, KL estimators and controllers. No Ray, no I/O.

Modules: `masking` (masked reductions, loss aggregation), `logprobs` (token log-probs, entropy), `kl` (KL
estimators, KL loss, KL controllers), `shaping` (score -> token-level rewards), `advantages` (estimators),
`policy_loss` (PPO / GSPO / CISPO), `off_policy` (sampler-mismatch correction), `auxiliary_losses` (value, entropy, ptx), `preference` (DPO / IPO / SimPO, reward-model
losses). Registries: `ADVANTAGE_ESTIMATORS`, `POLICY_LOSSES`, `KL_ESTIMATORS`, `PREFERENCE_LOSSES`,
`REWARD_MODEL_LOSSES`.
"""

from rlhf_ray.algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from rlhf_ray.algorithms.auxiliary_losses import compute_entropy_loss, compute_ptx_loss, compute_value_loss
from rlhf_ray.algorithms.kl import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, build_kl_controller,
                                    compute_kl, compute_kl_loss)
from rlhf_ray.algorithms.logprobs import compute_entropy, compute_token_logprobs
from rlhf_ray.algorithms.masking import (LossAggregation, aggregate_loss, count_tokens_and_sequences, masked_mean,
                                         masked_sum, masked_var, masked_whiten)
from rlhf_ray.algorithms.off_policy import RolloutCorrectionParams, compute_rollout_correction
from rlhf_ray.algorithms.policy_loss import POLICY_LOSSES, PolicyLossParams, compute_policy_loss
from rlhf_ray.algorithms.preference import PREFERENCE_LOSSES, REWARD_MODEL_LOSSES
from rlhf_ray.algorithms.registry import Registry
from rlhf_ray.algorithms.shaping import compute_token_level_rewards

__all__ = [
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "POLICY_LOSSES", "PREFERENCE_LOSSES", "REWARD_MODEL_LOSSES", "AdaptiveKLController", "FixedKLController",
    "LossAggregation", "PolicyLossParams", "Registry", "RolloutCorrectionParams", "aggregate_loss", "build_kl_controller", "compute_advantages",
    "compute_entropy", "compute_entropy_loss", "compute_kl", "compute_kl_loss", "compute_policy_loss",
    "compute_ptx_loss", "compute_rollout_correction", "compute_token_level_rewards", "compute_token_logprobs", "compute_value_loss",
    "count_tokens_and_sequences", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
]
