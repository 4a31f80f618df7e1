"""Shared fixtures: one local Ray cluster per test session, tiny models, and ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Small, noisy machine: one BLAS thread per process, no hub, offline wandb, no progress bars in logs.
for key, value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RLHF_RAY_NO_PROGRESS": "1",
}.items():
    os.environ.setdefault(key, value)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RLHF_RAY_SHARED", REPO_ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only beside the developers' and CI's checkouts)")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (address='local' never joins a stranger's cluster)."""
    import ray

    from rlhf_ray.placement.cluster import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=int(os.environ.get("RLHF_RAY_TEST_CPUS", "8")), log_to_driver=False,
                        env_vars={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                  "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 'debug' tiny Llama (head_dim 64) with the bundled tokenizer, HF format."""
    from rlhf_ray.fixtures.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-debug", flavour="debug", seed=0)
