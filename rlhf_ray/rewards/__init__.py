"""Reward sources behind one interface (`RewardSource.score(prompts, responses, gt_answers)`, and
`score_async(RewardBatch)` for the RL controller): rule functions from a python file, built-in GSM8K and arithmetic
checkers, a remote HTTP server. The reward-model source is registered by the pipeline under the reserved name
"model"."""

from rlhf_ray.rewards.base import (REWARD_SOURCES, RewardBatch, RewardResult, RewardSource, build_reward_source,
                                   summarize_rewards)
from rlhf_ray.rewards.math_checkers import ArithmeticReward, GSM8KReward, extract_final_answer
from rlhf_ray.rewards.remote import RemoteReward, RemoteRewardError
from rlhf_ray.rewards.rule import RuleReward, load_rule_function

__all__ = ["REWARD_SOURCES", "ArithmeticReward", "GSM8KReward", "RemoteReward", "RemoteRewardError", "RewardBatch",
           "RewardResult", "RewardSource", "RuleReward", "build_reward_source", "extract_final_answer",
           "load_rule_function", "summarize_rewards"]
