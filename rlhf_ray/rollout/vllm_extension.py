"""The vLLM worker extension that receives new policy weights, layer by layer, while the engine keeps running.

vLLM mixes this class into its worker class (`LLM(..., worker_extension_cls=EXTENSION_QUALNAME)`), so its methods
run inside every vLLM worker process (one per tensor-parallel rank; in this process when the engine runs
in-process) and are reached with `llm.collective_rpc("rlhf_<method>", args=...)`.

An update is a session:

    rlhf_begin_weight_update()                 layers go to the meta device; loaders buffer until a layer is whole
    rlhf_load_bucket(meta, buffer)  ...        object-store channel: the bucket travelled with the RPC
    rlhf_receive_bucket(meta)       ...        gloo/NCCL channel: the bucket arrives by broadcast from the trainer
    rlhf_load_ipc_bucket(meta, handle) ...     CUDA IPC channel: a handle to the trainer's GPU buffer (same GPU)
    rlhf_finish_weight_update()                leftover layers processed; untouched layers keep their old weights

It drives vLLM's in-place layerwise reload (vllm.model_executor.model_loader.reload): a plain `load_weights` fails
on CPU because linear weights are repacked into kernel layouts after loading; the layerwise reload restores the
checkpoint layout, loads, re-runs the repacking and copies into the original storage, one layer at a time as soon
as the layer's last part has arrived. Names are HF checkpoint names (q_proj, k_proj, ... before fusing).

Buffers may arrive as numpy arrays, torch tensors or bytes (vLLM's multiprocess RPC serialises with msgpack, where
tensors would turn into lists; bytes travel as they are).
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf_ray.rollout.receiver import WeightReceiver, ipc_bytes_to_tensor
from rlhf_ray.rollout.weight_buckets import unpack_bucket

EXTENSION_QUALNAME = "rlhf_ray.rollout.vllm_extension.WeightSyncExtension"


class WeightSyncExtension:
    """Methods vLLM adds to its worker; `self` is the vLLM worker (model_runner, vllm_config, device)."""

    # ------------------------------------------------------------ session
    def rlhf_begin_weight_update(self) -> bool:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        if getattr(self, "_rlhf_updating", False):
            # a previous session never finished (sender died): close it so the engine is consistent again
            self.rlhf_finish_weight_update()
        initialize_layerwise_reload(self.model_runner.get_model())
        self._rlhf_updating = True
        self._rlhf_loaded = 0
        self._rlhf_names: set[str] = set()
        return True

    def rlhf_finish_weight_update(self) -> int:
        """Finalize the reload; returns how many tensors this session loaded."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        if not getattr(self, "_rlhf_updating", False):
            raise RuntimeError("rlhf_finish_weight_update without rlhf_begin_weight_update")
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            _rebuild_tied_output_layers(model)
            _repack_cpu_moe_experts(model, self._rlhf_names)
        # state derived from the old weights (vLLM's own reload_weights resets the same)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(self.model_runner, reset):
                getattr(self.model_runner, reset)()
        self._rlhf_updating = False
        return self._rlhf_loaded

    def _rlhf_load(self, named: list[tuple[str, torch.Tensor]]) -> int:
        from vllm.config import set_current_vllm_config

        if not getattr(self, "_rlhf_updating", False):
            raise RuntimeError("a weight bucket arrived outside an update session (call rlhf_begin_weight_update)")
        noise = getattr(self, "_rlhf_weight_noise", None)
        if noise is not None:
            named = [(name, add_weight_noise(tensor, *noise)) for name, tensor in named]
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(iter(named))
        self._rlhf_loaded += len(named)
        self._rlhf_names.update(name for name, _ in named)
        return len(named)

    # ------------------------------------------------------------ diagnostic: an injected sampler/trainer mismatch
    def rlhf_set_weight_noise(self, std: float, seed: int, model_path: str) -> int:
        """From now on every floating-point tensor loaded gets N(0, std^2) noise (GeneratorSection.
        sampler_weight_noise_std; fresh seeded draws at each sync), and the weights the engine started with are
        reloaded from model_path's safetensors through the same path. Returns the tensors reloaded."""
        from rlhf_ray.models.meta_loading import CheckpointReader

        reader = CheckpointReader.open(model_path)
        if reader is None:
            raise ValueError(f"sampler_weight_noise_std needs safetensors weights in {model_path}; none found")
        self._rlhf_weight_noise = (float(std), torch.Generator().manual_seed(int(seed)))
        self.rlhf_begin_weight_update()
        self._rlhf_load([(name, reader.read(name, ())) for name in sorted(reader.shapes)])
        return self.rlhf_finish_weight_update()

    # ------------------------------------------------------------ channels
    def rlhf_load_bucket(self, metadata: Sequence[Sequence], buffer) -> int:
        """Object-store channel: the flat bucket came with the call. CPU tensors are moved to the engine's device
        by the loaders."""
        return self._rlhf_load(unpack_bucket(metadata, buffer))

    def rlhf_join_weight_group(self, kind: str, host: str, port: int, rank_offset: int, world_size: int,
                               group_id: str, timeout_s: float) -> int:
        """Join the trainer's broadcast group as rank rank_offset + this worker's tensor-parallel rank."""
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        receiver = getattr(self, "_rlhf_receiver", None) or WeightReceiver()
        self._rlhf_receiver = receiver
        device = self.device if kind == "nccl" else None
        return receiver.join(kind, host, port, rank_offset + get_tensor_model_parallel_rank(), world_size,
                             group_id, timeout_s, device)

    def rlhf_leave_weight_group(self) -> bool:
        receiver = getattr(self, "_rlhf_receiver", None)
        if receiver is not None:
            receiver.leave()
        return True

    def rlhf_weight_group_id(self) -> str | None:
        receiver = getattr(self, "_rlhf_receiver", None)
        return receiver.group_id if receiver is not None else None

    def rlhf_receive_bucket(self, metadata: Sequence[Sequence]) -> int:
        """gloo/NCCL channel: block in the broadcast, then load (gloo buffers live on CPU, NCCL on the GPU)."""
        receiver = getattr(self, "_rlhf_receiver", None) or WeightReceiver()
        group = receiver.group
        device = self.device if group is not None and group.kind == "nccl" else "cpu"
        return self._rlhf_load(receiver.receive(metadata, device))

    def rlhf_load_ipc_bucket(self, metadata: Sequence[Sequence], handle: bytes) -> int:  # pragma: no cover - GPU
        """CUDA IPC channel (trainer and engine on one GPU): map the trainer's buffer and load from a local copy.

        The copy matters: the layerwise loader keeps references to a fused layer's parts until its last part
        arrives (possibly in the next bucket), while the trainer frees its buffer as soon as this call returns.
        """
        shared = ipc_bytes_to_tensor(handle, torch.cuda.current_device())
        flat = shared.clone()
        torch.cuda.synchronize()
        del shared
        return self._rlhf_load(unpack_bucket(metadata, flat))


def add_weight_noise(tensor: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """tensor + N(0, std^2) noise drawn on CPU from `generator` (a new tensor; integer tensors are returned as they
    are). The draw is in float32 and the sum is cast back to the tensor's dtype."""
    if not tensor.is_floating_point():
        return tensor
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.device)
    return (tensor.float() + std * noise).to(tensor.dtype)


def _rebuild_tied_output_layers(model: torch.nn.Module) -> int:
    """Re-run the kernel set-up of output layers whose weight IS an input embedding (tied embeddings).

    A tied model's checkpoint, and so a trainer's sync, carries only the input embedding; the reload writes it into
    the storage lm_head shares, but lm_head itself is never reloaded, and on CPU its kernel keeps the pre-packed copy
    of the weights it was built with (vLLM logs "ParallelLMHead: Failed to load weights"). Rebuilding it makes the
    sampler use the new output layer. Returns the number of layers rebuilt.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    modules = list(model.modules())
    embeddings = {id(m.weight) for m in modules
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    rebuilt = 0
    for module in modules:
        if isinstance(module, ParallelLMHead) and id(module.weight) in embeddings:
            module.quant_method.process_weights_after_loading(module)
            rebuilt += 1
    return rebuilt


def _repack_cpu_moe_experts(model: torch.nn.Module, loaded_names: set[str]) -> int:
    """Re-run the CPU MoE kernel's weight packing on expert layers this session reloaded.

    vLLM 0.32 packs CPU expert weights (CPUUnquantizedExperts.process_weights_after_loading) only when it builds
    the kernel; on a reload it copies the new checkpoint-layout weights into the packed storage and skips the
    packing, so the engine would compute with scrambled experts. Layers left out of the update keep their packed
    weights and are not touched. Returns the number of layers repacked.
    """
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:                                  # a vLLM build without CPU MoE kernels
        return 0
    # HF expert names <block>.experts.<i>.gate_proj.weight; vLLM's module is <block>.experts[.routed_experts]
    reloaded = {name.split(".experts.")[0] for name in loaded_names if ".experts." in name}
    repacked = 0
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and name.split(".experts")[0] in reloaded:
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked
