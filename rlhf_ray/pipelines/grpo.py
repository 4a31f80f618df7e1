"""`rlhf-ray grpo`: GRPO (and RLOO, REINFORCE++) with verifiable rewards: no critic, n samples per prompt.

    rlhf-ray grpo --pretrain runs/sft --prompt_dataset runs/data/gsm8k-prompts --reward_source gsm8k \
        --n_samples_per_prompt 8 --num_episodes 50 --experience_batch_size 4 --train_batch_size 8 \
        --accumulation_steps 4 --lr 1e-6 --kl_coef 0.001 --save_path runs/grpo
    rlhf-ray grpo ... --reward_fn my_rewards.py:exact_match        # a rule reward from a python file

The same controller as `rlhf-ray ppo` with advantage_estimator grpo (group-normalised outcome rewards), KL as a
loss term and no critic. docs/grpo.md lists every flag, implementation detail and metric.
"""

from __future__ import annotations

from rlhf_ray.config.base import run_cli
from rlhf_ray.pipelines.rl.config import GRPOConfig
from rlhf_ray.pipelines.rl.run import run_rl


def run(cfg: GRPOConfig) -> int:
    return run_rl(cfg, "grpo")


def main(argv: list[str] | None = None) -> int:
    return run_cli(GRPOConfig, run, argv, prog="rlhf-ray grpo", description=__doc__.split("\n\n")[0])
