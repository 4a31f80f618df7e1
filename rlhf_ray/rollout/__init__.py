"""Rollout generation inside one engine process: generator backends (vLLM, transformers), the rollout types,
least-loaded dispatch policy, and the receiving and sending ends of trainer -> generator weight sync.

The Ray actors and their driver-side group live one layer up, in `rlhf_ray.workers`:

    from rlhf_ray.workers.generator_group import GeneratorGroup
    group = GeneratorGroup(GeneratorSection(num_engines=2, n_samples_per_prompt=4), model_path)
    result = group.generate(prompt_ids)              # RolloutResult: per prompt index, samples with logprobs
    group.sync_weights_from(policy_group, version=1)

Importing this package loads neither vLLM nor Ray.
"""

from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.rollout.types import PromptRollout, RolloutResult, Sample, apply_prompt_limit

__all__ = ["GeneratorSection", "PromptRollout", "RolloutResult", "Sample", "apply_prompt_limit"]
