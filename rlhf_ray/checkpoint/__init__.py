"""Resumable checkpoints (atomic directories, DCP shards stored as safetensors, RNG state) and HF export.

Engines call these; see docs/engines.md for the on-disk layout.
"""

from rlhf_ray.checkpoint.atomic import (atomic_directory, is_complete, latest_checkpoint, rotate_checkpoints,
                                        step_directory, verify_checkpoint)

__all__ = ["atomic_directory", "is_complete", "latest_checkpoint", "rotate_checkpoints", "step_directory",
           "verify_checkpoint"]
