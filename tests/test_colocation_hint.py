"""A plan refused for its size says when colocating the roles would make it fit (the 2-core GRPO case)."""

import pytest

from rlhf_ray.placement import ClusterCapacity, NodeCapacity, ResourcePlan
from rlhf_ray.placement.groups import GroupSpec


def _plan(cpus_per_worker: float) -> ResourcePlan:
    plan = ResourcePlan()
    for role in ("policy", "reference", "generator"):
        plan.add(role, GroupSpec(num_workers=1, cpus_per_worker=cpus_per_worker))
    return plan


def test_refusal_suggests_colocation_when_it_would_fit():
    two_cores = ClusterCapacity([NodeCapacity("n0", {"CPU": 2, "GPU": 0})])
    with pytest.raises(ValueError, match=r"needs CPU=3(.|\n)*colocated, the roles would fit: 1 × \{CPU=1, GPU=0\}"
                                         r"(.|\n)*--colocate_all"):
        _plan(1).check(two_cores)
    with pytest.raises(ValueError) as refused:           # one rank alone is too big: colocation cannot help
        _plan(3).check(two_cores)
    assert "colocate" not in str(refused.value)
