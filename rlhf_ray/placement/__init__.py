"""Resource plans (role -> GroupSpec, capacity check) and connecting a job to its Ray cluster."""

from rlhf_ray.placement.cluster import connect_ray, disconnect_ray
from rlhf_ray.placement.plan import ClusterCapacity, NodeCapacity, ResourcePlan, spec_from_parallel

__all__ = ["ClusterCapacity", "NodeCapacity", "ResourcePlan", "connect_ray", "disconnect_ray", "spec_from_parallel"]
