"""Rollout generation: generator backends (vLLM, transformers), the generator group, and trainer -> generator
weight sync.

    from rlhf_ray.rollout import GeneratorGroup, GeneratorSection
    group = GeneratorGroup(GeneratorSection(num_engines=2, n_samples_per_prompt=4), model_path)
    result = group.generate(prompt_ids)              # RolloutResult: per prompt index, samples with logprobs
    group.sync_weights_from(policy_group, version=1)

Importing this package loads neither vLLM nor Ray-side actors' engines; `GeneratorGroup` is imported lazily.
"""

from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.rollout.types import PromptRollout, RolloutResult, Sample, apply_prompt_limit

__all__ = ["GeneratorGroup", "GeneratorSection", "PromptRollout", "RolloutResult", "Sample", "apply_prompt_limit"]


def __getattr__(name: str):
    if name == "GeneratorGroup":
        from rlhf_ray.rollout.group import GeneratorGroup

        return GeneratorGroup
    raise AttributeError(name)
