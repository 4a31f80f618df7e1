"""The resource plan: role -> GroupSpec from ParallelSection, and a capacity check that names the numbers."""

import pytest

from rlhf_ray.config.sections import ParallelSection
from rlhf_ray.placement import ClusterCapacity, NodeCapacity, ResourcePlan, spec_from_parallel
from rlhf_ray.placement.groups import GroupSpec


def _cluster(*nodes):
    return ClusterCapacity([NodeCapacity(f"n{i}", {"CPU": cpu, "GPU": gpu}, pool) for i, (cpu, gpu, pool)
                            in enumerate(nodes)])


def test_spec_follows_the_parallel_section():
    spec = spec_from_parallel(ParallelSection(num_workers=4, tp=2, cpus_per_worker=2, gpus_per_worker=1,
                                              pool="gpu"))
    assert (spec.num_workers, spec.tp_size, spec.cpus_per_worker, spec.gpus_per_worker, spec.pool) == \
        (4, 2, 2, 1, "gpu")
    assert spec.bundle() == {"CPU": 2, "GPU": 1}


def test_a_fitting_plan_passes_and_describes_itself():
    plan = ResourcePlan()
    plan.add("policy", GroupSpec(num_workers=2, cpus_per_worker=1))
    plan.add("reference", GroupSpec(num_workers=2, cpus_per_worker=0.5))
    cluster = _cluster((2, 0, None), (2, 0, None))
    plan.check(cluster)
    text = plan.describe(cluster)
    assert "policy" in text and "reference" in text and "CPU=3" in text and "CPU=4" in text
    with pytest.raises(ValueError, match="already in the plan"):
        plan.add("policy", GroupSpec())


def test_too_big_a_plan_prints_the_sum():
    plan = ResourcePlan()
    plan.add("policy", GroupSpec(num_workers=3, cpus_per_worker=1))
    plan.add("reference", GroupSpec(num_workers=3, cpus_per_worker=1))
    with pytest.raises(ValueError, match=r"CPU=4 but the plan needs CPU=6 \(policy 3×1 \+ reference 3×1\)"):
        plan.check(_cluster((2, 0, None), (2, 0, None)))


def test_pools_are_checked_on_their_own_nodes():
    plan = ResourcePlan()
    plan.add("policy", GroupSpec(num_workers=2, gpus_per_worker=1, cpus_per_worker=1, pool="gpu"))
    cluster = _cluster((8, 0, "cpu"), (4, 1, "gpu"))
    with pytest.raises(ValueError, match="pool 'gpu' has GPU=1 but the plan needs GPU=2"):
        plan.check(cluster)
    missing = ResourcePlan()
    missing.add("policy", GroupSpec(pool="tpu"))
    with pytest.raises(ValueError, match="wants pool 'tpu', but the cluster has pools cpu, gpu"):
        missing.check(cluster)


def test_one_rank_must_fit_on_one_node():
    plan = ResourcePlan()
    plan.add("policy", GroupSpec(num_workers=1, cpus_per_worker=3))
    with pytest.raises(ValueError, match="no single node can hold one rank"):
        plan.check(_cluster((2, 0, None), (2, 0, None)))


def test_capacity_is_read_from_the_live_cluster(ray_cluster):
    cluster = ClusterCapacity.from_ray()
    assert cluster.total()["CPU"] >= 1 and len(cluster.nodes) >= 1
