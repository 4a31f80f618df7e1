"""Apply parallelism to an HF decoder model from the outside: the device mesh, DTensor TP, FSDP2, DDP.

Order (as torchtitan does it): tensor parallelism first (it rewrites Linear weights into DTensor shards), then
FSDP2 over the data-parallel dimension (it shards what TP left, making 2-D DTensors), or DDP when there is no TP.
The model code is never edited; only its module tree is walked.

Rank layout: rank = dp_rank * tp + tp_rank (WorkerGroup's layout), i.e. a (dp, tp) mesh in row-major order, so
the ranks of one TP group are adjacent.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

#: Megatron-style plan for Llama-family blocks (Llama, Mistral, Qwen2/3): column-parallel q/k/v and gate/up,
#: row-parallel o and down, so each block does one all-reduce after attention and one after the MLP.
LLAMA_TP_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def build_mesh(device_type: str, dp: int, tp: int) -> DeviceMesh:
    """A (dp, tp) mesh over the default process group; dims named 'dp' and 'tp'."""
    world = dist.get_world_size()
    if dp * tp != world:
        raise ValueError(f"dp ({dp}) × tp ({tp}) = {dp * tp} must equal the world size ({world}); "
                         f"set --num_workers {dp * tp} or change --tp")
    if dp > 1 and tp > 1:
        # Gathering a 2-D (dp, tp) DTensor takes two collectives and torch warns about it for every tensor; that
        # is expected here (full_tensor in iter_weights/export), so keep the warning out of every sync's log.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the first ModuleList named `layers` (HF Llama/Qwen/Mistral: model.layers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return list(module)
    raise ValueError(f"{type(model).__name__}: no `layers` ModuleList found; the FSDP/TP backends support HF "
                     f"decoder models whose blocks live in `model.layers` (Llama, Qwen, Mistral, ...)")


def check_tp_fits(config, tp: int) -> None:
    """Heads, KV heads and the MLP width must split evenly over the TP ranks."""
    sizes = {"num_attention_heads": getattr(config, "num_attention_heads", None),
             "num_key_value_heads": getattr(config, "num_key_value_heads", None)
             or getattr(config, "num_attention_heads", None),
             "intermediate_size": getattr(config, "intermediate_size", None)}
    bad = {k: v for k, v in sizes.items() if v is None or v % tp}
    if bad:
        raise ValueError(f"--tp {tp} does not divide the model: {bad}; choose a tp that divides "
                         f"{', '.join(f'{k}={v}' for k, v in sizes.items())}")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard every block's attention and MLP projections over tp_mesh (in place)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_tp_fits(model.config, tp_mesh.size())
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for block in find_decoder_layers(model):
        plan = {}
        for path, style in LLAMA_TP_PLAN.items():
            target = block.get_submodule(path) if _has_submodule(block, path) else None
            if not isinstance(target, nn.Linear):
                raise ValueError(f"--tp: {type(block).__name__}.{path} is {type(target).__name__}, not a Linear; "
                                 f"the Llama TP plan covers Llama/Qwen/Mistral blocks without LoRA adapters")
            plan[path] = styles[style]()
        parallelize_module(block, tp_mesh, plan)


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, cpu_offload: bool = False,
               param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 (`fully_shard`, ZeRO-3-like): each block is one all-gather unit, then the root (embeddings, head).

    cpu_offload keeps sharded parameters, gradients and optimizer state in host memory (CPUOffloadPolicy).
    param_dtype, when given, all-gathers and computes in that dtype while gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    # pin_memory needs an accelerator; on a CPU-only host the offload policy keeps plain host memory.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    kwargs = {"mesh": dp_mesh, "offload_policy": offload}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in find_decoder_layers(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_mean_grads(parameters: list[nn.Parameter], group) -> None:
    """Average gradients over a data-parallel group in one flat all-reduce (TP + plain data parallelism).

    DTensor gradients are reduced through their local shards: TP ranks at the same tp position in different dp
    groups hold the same shard, so averaging locals is averaging the shards.
    """
    from torch.distributed.tensor import DTensor

    locals_ = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in parameters if p.grad is not None]
    if not locals_:
        return
    flat = torch._utils._flatten_dense_tensors(locals_)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(dist.get_world_size(group))
    for tensor, synced in zip(locals_, torch._utils._unflatten_dense_tensors(flat, locals_)):
        tensor.copy_(synced)


def materialize_from_checkpoint(model: nn.Module, reader, device: torch.device, fresh: dict[str, torch.Tensor],
                                buffers: dict[str, torch.Tensor]) -> None:
    """Allocate a parallelised meta-device model on `device` and fill each rank's local shards (in place).

    reader: a models.meta_loading.CheckpointReader; each parameter reads only its local region from it (its
    DTensor shard under FSDP2/TP, the whole tensor where it is replicated). fresh: full tensors by parameter name
    for what the checkpoint lacks (LoRA adapters, a new value head), sliced the same way. buffers: their values by
    name (to_empty leaves them uninitialised). Parameters shared by several modules (tied embeddings) stay one.
    """
    from rlhf_ray.models.lora import hf_name

    aliases = _parameter_aliases(model)
    model.to_empty(device=device)
    for alias, name in aliases.items():                 # to_empty gives each owner module its own new tensor
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(name))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
        for name, param in model.named_parameters():
            local, region = _local_region(param)
            local.copy_(fresh[name][region] if name in fresh else reader.read(hf_name(name), region))


def _parameter_aliases(model: nn.Module) -> dict[str, str]:
    """{alias name: first name} for every parameter reachable under more than one name (lm_head tied to embed)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.update({name: first[id(param)]} if id(param) in first else {})
        first.setdefault(id(param), name)
    return aliases


def _local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's local tensor, the region of the full tensor it holds): a DTensor's shard, else everything."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param, tuple(slice(0, size) for size in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(slice(start, start + size) for start, size in zip(offset, shape))
