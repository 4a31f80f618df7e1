"""The RL stage: one controller over Ray actor groups for PPO and the GRPO family.

    config.py       the job's sections (PPOConfig, GRPOConfig) and the cross-section checks (BufferPlan)
    experience.py   rollouts -> Experience, scores -> advantages (pure, no Ray)
    roles.py        roles -> resource requests, colocation on shared bundles
    groups.py       starting the actor groups (policy, critic, reference, reward model, generators)
    controller.py   the episode: collect (generate, score, advantages, buffer) -> update -> weight sync -> log
    async_mode.py   collecting the next episode while the current one trains, with bounded staleness
    run.py          run_rl(cfg, job): what `rlhf-ray ppo` / `rlhf-ray grpo` run
"""

from rlhf_ray.pipelines.rl.config import BufferPlan, GRPOConfig, PPOConfig, check_rl_config

__all__ = ["BufferPlan", "GRPOConfig", "PPOConfig", "check_rl_config"]
