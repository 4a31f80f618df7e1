"""`rlhf-ray ppo`: PPO with policy, critic, reference and reward-model groups and vLLM rollouts.

    rlhf-ray ppo --pretrain runs/sft --rm_checkpoint_path runs/rm --prompt_dataset runs/data/prompt \
        --pretrain_dataset runs/data/ptx --ptx_coef 0.1 --conversation_template_config TEMPLATE.json \
        --num_episodes 10 --num_collect_steps 1 --num_update_steps 1 --experience_batch_size 8 \
        --train_batch_size 4 --accumulation_steps 2 --lr 9e-6 --critic_lr 9e-6 --save_path runs/ppo

The seed's flags work as written (ColossalChat train_ppo.py). Buffer arithmetic, checked at start-up:
dp × num_collect_steps × experience_batch_size = train_batch_size × accumulation_steps × dp. docs/ppo.md lists
every flag, implementation detail and metric.
"""

from __future__ import annotations

from rlhf_ray.config.base import run_cli
from rlhf_ray.pipelines.rl.config import PPOConfig
from rlhf_ray.pipelines.rl.run import run_rl


def run(cfg: PPOConfig) -> int:
    return run_rl(cfg, "ppo")


def main(argv: list[str] | None = None) -> int:
    return run_cli(PPOConfig, run, argv, prog="rlhf-ray ppo", description=__doc__.split("\n\n")[0])
