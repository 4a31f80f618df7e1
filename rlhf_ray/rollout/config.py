"""GeneratorSection: how rollouts are generated (engines, sampling, prompt limits) and how weights reach them.

The sampling fields can be overridden per call (`GeneratorGroup.generate(..., sampling={"temperature": 0})`), e.g.
for greedy evaluation; `sampling_overrides` validates such a dict against the same field rules.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from rlhf_ray.config.base import ConfigError, Section, format_validation_error

#: sampling fields a single generate call may override
SAMPLING_FIELDS = ("n_samples_per_prompt", "temperature", "top_p", "top_k", "max_new_tokens", "stop",
                   "stop_token_ids", "ignore_eos", "seed")


class GeneratorSection(Section):
    """The rollout generator group: N engines (vLLM or transformers), sampling settings and weight sync."""

    # ---------------------------------------------------------------- engines
    backend: Literal["vllm", "hf"] = Field("vllm", description="generation backend: vllm (fast) or hf "
                                                               "(transformers: a lean KV-cache decode loop, "
                                                               "generate for stop strings; the reference, and the "
                                                               "fallback where vLLM is absent)")
    num_engines: int = Field(1, ge=1, description="generator actors, each owning one engine")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (tensor parallel); 1 on CPU")
    cpus_per_engine: float = Field(1.0, gt=0, description="CPUs each generator actor reserves")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads per engine on CPU; default: "
                                                             "cpus_per_engine rounded up")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="engine dtype; auto = float32 on CPU (bf16 is ~3x slower there), bfloat16 on GPU")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="fraction of GPU memory a vLLM engine "
                                                                       "may take (GPU only)")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV-cache size per engine on CPU, GiB "
                                                       "(VLLM_CPU_KVCACHE_SPACE)")
    max_model_len: int | None = Field(None, ge=8, description="longest prompt + response an engine accepts; "
                                                              "default max_prompt_len + max_new_tokens")
    enable_prefix_caching: bool = Field(True, description="reuse KV blocks of shared prompt prefixes (vLLM); "
                                                          "reset after every weight update")
    enforce_eager: bool = Field(True, description="no CUDA graphs / torch.compile in vLLM (required on CPU)")
    max_restarts: int = Field(1, ge=0, description="times Ray restarts a crashed generator actor")
    sampler_weight_noise_std: float = Field(
        0.0, ge=0, description="DIAGNOSTIC, for tests and benchmarks of the off-policy correction: add N(0, std^2) "
                               "noise (seeded) to every floating-point weight the vLLM engine loads, at start and at "
                               "every weight sync, so the sampler's log-probs differ from the trainer's; 0 = off")

    # ---------------------------------------------------------------- prompts
    max_prompt_len: int = Field(512, ge=1, description="longest prompt in tokens; longer ones follow "
                                                       "prompt_truncation")
    prompt_truncation: Literal["left", "refuse"] = Field(
        "left", description="left: keep the last max_prompt_len tokens (the generation prompt survives) and "
                            "count it; refuse: raise an error naming the prompt")

    # ---------------------------------------------------------------- sampling
    n_samples_per_prompt: int = Field(1, ge=1, description="completions per prompt (GRPO/RLOO group size)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(-1, ge=-1, description="sample among the k most likely tokens; -1 or 0 = all")
    max_new_tokens: int = Field(256, ge=1, description="response length limit in tokens")
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in the output)")
    stop_token_ids: list[int] = Field(default_factory=list, description="extra stop token ids besides the "
                                                                         "model's EOS (included in the output)")
    ignore_eos: bool = Field(False, description="keep generating past EOS and, in RL jobs, past the template's "
                                                "end-of-turn ids (benchmarks with fixed lengths); stop_token_ids "
                                                "still stop")
    seed: int | None = Field(0, description="base sampling seed; each prompt's seed is derived from it, the "
                                            "call's seed_offset and the prompt index, so a retried prompt "
                                            "samples the same tokens on any engine (vLLM); null = unseeded")
    logprobs_mode: Literal["processed", "raw"] = Field(
        "processed", description="processed: log-probs of the distribution actually sampled from (after "
                                 "temperature, top-k, top-p; what trainers recompute with the same "
                                 "temperature); raw: log_softmax of the model's logits. Fixed per engine")

    # ---------------------------------------------------------------- dispatch and weight sync
    dispatch_chunk_size: int = Field(0, ge=0, description="prompts per dispatched chunk; 0 = "
                                                          "ceil(prompts / num_engines), one chunk per engine")
    max_inflight_per_engine: int = Field(2, ge=1, description="chunks queued on one engine at a time")
    weight_sync_channel: Literal["auto", "object_store", "gloo", "nccl", "cuda_ipc"] = Field(
        "auto", description="trainer -> generator weight channel; auto = cuda_ipc when colocated on one GPU, "
                            "nccl across GPUs, object_store on CPU")
    weight_sync_bucket_mb: float = Field(64.0, gt=0, description="weights are streamed in buckets of about "
                                                                 "this many MiB (one tensor may exceed it)")


    # ---------------------------------------------------------------- partial rollouts (rollout/partial.py)
    partial_rollout: bool = Field(False, description="generate in segments of partial_rollout_segment_tokens so "
                                                     "that a weight sync need not wait for the longest response: "
                                                     "unfinished samples continue under the new weights (async "
                                                     "mode)")
    partial_rollout_segment_tokens: int = Field(32, ge=1, description="partial rollouts: tokens per engine call; "
                                                                      "a weight sync waits at most one segment")
    partial_rollout_max_resumes: int = Field(1, ge=0, description="partial rollouts: weight syncs one sample "
                                                                  "may continue across; a sync waits while an "
                                                                  "unfinished sample has used them all")

    @model_validator(mode="after")
    def _check_lengths(self):
        if self.max_model_len is not None and self.max_prompt_len + self.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"max_prompt_len ({self.max_prompt_len}) + max_new_tokens ({self.max_new_tokens}) = "
                f"{self.max_prompt_len + self.max_new_tokens} exceeds max_model_len ({self.max_model_len}); "
                f"raise max_model_len or lower one of the two")
        if self.partial_rollout and self.stop:
            raise ValueError(f"partial_rollout with stop strings {self.stop}: a stop string split between two "
                             f"segments would be missed; use --stop_token_ids, or turn --partial_rollout off")
        if self.backend == "hf" and self.sampler_weight_noise_std > 0:
            raise ValueError(f"--sampler_weight_noise_std {self.sampler_weight_noise_std} perturbs the weights "
                             f"inside the vLLM engine, but --backend is hf; use --backend vllm, or "
                             f"--sampler_weight_noise_std 0")
        if self.backend == "hf" and self.tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs backend vllm "
                             f"(the hf backend runs one device per engine); set --tensor_parallel_size 1")
        return self

    # ---------------------------------------------------------------- derived
    def resolved_max_model_len(self) -> int:
        return self.max_model_len or self.max_prompt_len + self.max_new_tokens

    def resolved_cpu_threads(self) -> int:
        return self.cpu_threads or max(1, int(-(-self.cpus_per_engine // 1)))

    def sampling(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The sampling fields as a plain dict, with per-call overrides validated by the same rules."""
        base = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        if overrides:
            base.update(sampling_overrides(self, overrides))
        return base


def sampling_overrides(section: GeneratorSection, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate a per-call sampling override dict; unknown keys and bad values raise ConfigError."""
    unknown = sorted(set(overrides) - set(SAMPLING_FIELDS))
    if unknown:
        raise ConfigError(f"sampling overrides: unknown field(s) {unknown}; allowed: {list(SAMPLING_FIELDS)}")
    try:
        checked = GeneratorSection.model_validate({**section.model_dump(), **overrides})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix="")) from None
    return {name: getattr(checked, name) for name in overrides}
