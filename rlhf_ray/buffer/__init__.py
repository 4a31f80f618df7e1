"""Experience and its replay buffer.

    experience.py      Experience: the per-sample tensors (pure torch, no Ray)
    replay_buffer.py   ReplayBuffer: the driver-side store of per-rank object refs; fetch_experience for the ranks

Importing the package loads no Ray: import ReplayBuffer from `rlhf_ray.buffer.replay_buffer`.
"""

from rlhf_ray.buffer.experience import Experience

__all__ = ["Experience"]
