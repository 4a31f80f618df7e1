"""What a role's `pool` names, and which nodes belong to it.

A pool is written one of two ways in a config (`--pool`, `--ref_pool`, `--generator_pool`, ...):
    train-h100                 the nodes labelled `pool=train-h100` (KubeRay worker group `labels`, `ray start
                               --labels`, `rlhf-ray cluster start --pool`)
    accelerator_type:H100      the nodes whose GPUs Ray detected as H100: Ray sets the node label
                               `ray.io/accelerator-type=H100` and the resource `accelerator_type:H100` by itself,
                               so heterogeneous GPU pools need no custom labels
Ray's type names are its own: H100, A100, L40S, L4, A10G, ... (ray.util.accelerators).
"""

from __future__ import annotations

POOL_LABEL = "pool"
ACCELERATOR_LABEL = "ray.io/accelerator-type"
ACCELERATOR_PREFIX = "accelerator_type:"     # also the name of Ray's per-node accelerator resource
RESOURCE_KEYS = ("CPU", "GPU")               # the resources plans and reports count


def fmt_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{key}={resources.get(key, 0):g}" for key in RESOURCE_KEYS)


def accelerator_of(pool: str | None) -> str | None:
    """The accelerator type a pool names (`accelerator_type:H100` -> "H100"), or None for a label pool."""
    if pool and pool.startswith(ACCELERATOR_PREFIX):
        accelerator = pool[len(ACCELERATOR_PREFIX):]
        if not accelerator:
            raise ValueError(f"pool {pool!r} names no accelerator type; write e.g. {ACCELERATOR_PREFIX}H100")
        return accelerator
    return None


def label_selector(pool: str) -> dict[str, str]:
    """The node-label selector of one placement-group bundle on `pool`."""
    accelerator = accelerator_of(pool)
    return {ACCELERATOR_LABEL: accelerator} if accelerator else {POOL_LABEL: pool}


def node_accelerator(labels: dict[str, str], resources: dict[str, float]) -> str | None:
    """A node's accelerator type: its `ray.io/accelerator-type` label, else its `accelerator_type:<T>` resource."""
    if labels.get(ACCELERATOR_LABEL):
        return labels[ACCELERATOR_LABEL]
    return next((key[len(ACCELERATOR_PREFIX):] for key in resources if key.startswith(ACCELERATOR_PREFIX)), None)


def node_pools(pool_label: str | None, accelerator: str | None) -> set[str]:
    """Every pool name a node answers to: its `pool` label and `accelerator_type:<its type>`."""
    return {name for name in (pool_label, accelerator and ACCELERATOR_PREFIX + accelerator) if name}
