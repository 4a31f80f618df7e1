"""Training backends behind one interface (base.TrainEngine); `build_engine` picks one by `--plugin`."""

from rlhf_ray.engines.base import TrainEngine
from rlhf_ray.engines.registry import build_engine, known_engines, register_engine

__all__ = ["TrainEngine", "build_engine", "known_engines", "register_engine"]
