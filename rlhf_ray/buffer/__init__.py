"""The distributed replay buffer: `Experience` (the per-sample tensors), `ReplayShard` actors (one per trainer
data-parallel rank, holding object refs with their policy version) and the driver-side `ReplayBuffer`."""

from rlhf_ray.buffer.experience import Experience, balanced_sizes
from rlhf_ray.buffer.replay_buffer import ReplayBuffer, sample_experience, take_experience

__all__ = ["Experience", "ReplayBuffer", "balanced_sizes", "sample_experience", "take_experience"]
