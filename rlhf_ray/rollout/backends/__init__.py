"""Generation backends behind one interface: 'vllm' (vLLM 0.32, GPU or its CPU build) and 'hf' (transformers)."""

from rlhf_ray.rollout.backends.base import GenerationBackend, backend_names, build_backend, register_backend

__all__ = ["GenerationBackend", "backend_names", "build_backend", "register_backend"]
