"""The YAML files shipped under launch/configs/ load into their job's config and pass the start-up arithmetic."""

from pathlib import Path

import pytest

from rlhf_ray.config.base import parse_config
from rlhf_ray.pipelines.rl.config import BufferPlan, GRPOConfig, PPOConfig

CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "configs"
JOBS = {"ppo": PPOConfig, "grpo": GRPOConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    job = path.name.split("-", 1)[0]
    assert job in JOBS, f"{path.name}: name it <job>-....yaml with job in {sorted(JOBS)}"
    cfg = parse_config(JOBS[job], ["--config", str(path)], f"rlhf-ray {job}")
    BufferPlan.from_config(cfg).check()       # the seed's buffer equation holds for the shipped layout
    assert cfg.model.pretrain and cfg.data.prompt_dataset


def test_rayjob_points_at_a_shipped_config():
    rayjob = (CONFIGS.parent.parent / "cluster" / "rayjob-ppo.yaml").read_text()
    assert "launch/configs/ppo-gpu.yaml" in rayjob and (CONFIGS / "ppo-gpu.yaml").is_file()
