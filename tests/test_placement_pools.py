"""Pools named by a node label (`pool=train-h100`) or by Ray's accelerator type (`accelerator_type:H100`): which
nodes belong to them, the bundle label selector, and the plan check on a heterogeneous GPU cluster."""

import pytest

from rlhf_ray.placement import ClusterCapacity, NodeCapacity, ResourcePlan
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.placement.pools import accelerator_of, label_selector, node_accelerator, node_pools

H100, L40S = "accelerator_type:H100", "accelerator_type:L40S"


def test_a_pool_is_a_label_or_an_accelerator_type():
    assert accelerator_of("train-h100") is None and accelerator_of(None) is None
    assert accelerator_of(H100) == "H100"
    assert label_selector("train-h100") == {"pool": "train-h100"}
    assert label_selector(H100) == {"ray.io/accelerator-type": "H100"}
    with pytest.raises(ValueError, match="names no accelerator type"):
        accelerator_of("accelerator_type:")


def test_a_node_answers_to_its_label_and_its_accelerator():
    assert node_accelerator({"ray.io/accelerator-type": "H100"}, {}) == "H100"
    assert node_accelerator({}, {"GPU": 8, "accelerator_type:L40S": 1}) == "L40S"   # the resource, no label
    assert node_accelerator({"pool": "cpu"}, {"CPU": 16}) is None
    assert node_pools("train-h100", "H100") == {"train-h100", H100}
    assert node_pools(None, None) == set()


def test_from_ray_reads_labels_and_accelerator_resources(monkeypatch):
    import ray

    nodes = [
        {"NodeID": "a", "Alive": True, "Labels": {"ray.io/accelerator-type": "H100"},
         "Resources": {"CPU": 64, "GPU": 8, "accelerator_type:H100": 1}},
        {"NodeID": "b", "Alive": True, "Labels": {"pool": "gen"}, "Resources": {"CPU": 32, "GPU": 4,
                                                                               "accelerator_type:L40S": 1}},
        {"NodeID": "c", "Alive": False, "Labels": {"pool": "gen"}, "Resources": {"CPU": 32, "GPU": 4}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    cluster = ClusterCapacity.from_ray()
    assert [(n.node_id, n.pool, n.accelerator) for n in cluster.nodes] == [("a", None, "H100"), ("b", "gen", "L40S")]
    assert cluster.pools() == [H100, L40S, "gen"]
    assert cluster.total(H100) == {"CPU": 64, "GPU": 8} and cluster.total("gen") == cluster.total(L40S)


def _hetero():
    return ClusterCapacity([NodeCapacity("h0", {"CPU": 64, "GPU": 8}, accelerator="H100"),
                            NodeCapacity("h1", {"CPU": 64, "GPU": 8}, accelerator="H100"),
                            NodeCapacity("l0", {"CPU": 32, "GPU": 4}, pool="gen", accelerator="L40S"),
                            NodeCapacity("c0", {"CPU": 16, "GPU": 0}, pool="cpu")])


def test_trainers_on_h100_and_generators_on_l40s_fit_without_custom_labels():
    plan = ResourcePlan()
    plan.add("policy", GroupSpec(num_workers=16, cpus_per_worker=4, gpus_per_worker=1, pool=H100))
    plan.add("generator", GroupSpec(num_workers=4, cpus_per_worker=1, gpus_per_worker=1, pool=L40S))
    plan.add("reward", GroupSpec(num_workers=2, cpus_per_worker=2, pool="cpu"))
    plan.check(_hetero())
    assert "pool=accelerator_type:H100" in plan.describe(_hetero())


def test_an_accelerator_pool_is_checked_on_its_own_nodes():
    plan = ResourcePlan()
    plan.add("generator", GroupSpec(num_workers=5, gpus_per_worker=1, pool=L40S))
    with pytest.raises(ValueError, match="pool 'accelerator_type:L40S' has GPU=4 but the plan needs GPU=5"):
        plan.check(_hetero())
    missing = ResourcePlan()
    missing.add("policy", GroupSpec(gpus_per_worker=1, pool="accelerator_type:A100"))
    with pytest.raises(ValueError, match=r"wants pool 'accelerator_type:A100'.*detects as A100"):
        missing.check(_hetero())
