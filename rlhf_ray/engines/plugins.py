"""Every built-in `--plugin` name, its description and its settings check, without importing a backend.

The driver checks the flags before Ray starts (registry.validate_engine_config); importing the backends for that
would cost it torch.distributed's DTensor and dynamo modules (~1 s here) that only the ranks use. torch_native.py
and colossal.py register their factories under these names with these descriptions and checks.
"""

from __future__ import annotations

import importlib.util

#: torch-native name -> description
TORCH_NATIVE = {
    "ddp": "DistributedDataParallel; with --tp N, DTensor TP + replicated data parallelism",
    "fsdp": "FSDP2 fully_shard (ZeRO-3-like); with --tp N, FSDP2 + TP on a 2-D mesh",
    "fsdp_cpu": "FSDP2 with CPU offload of sharded parameters, gradients and optimizer state",
    "tp": "DTensor tensor parallelism (Llama plan); dp groups average gradients",
    "3d": "ColossalAI HybridParallelPlugin's name, served by torch-native FSDP2 + TP",
}


def validate_tp(name, parallel, train) -> None:
    if parallel.tp < 2:
        raise ValueError(f"--plugin tp needs --tp 2 or more (got --tp {parallel.tp}); with --num_workers "
                         f"{parallel.num_workers}, --tp {parallel.num_workers} puts every rank in one TP group")


#: ColossalAI name -> (ColossalAI class, what it shards, torch-native alternative, needs CUDA)
PLUGINS = {
    "colossal_ddp": ("TorchDDPPlugin", "nothing (replicated, like DDP)", "ddp", False),
    "zero2": ("LowLevelZeroPlugin(stage=2)", "gradients and optimizer state", "fsdp", True),
    "zero2_cpu": ("LowLevelZeroPlugin(stage=2, cpu_offload=True)", "gradients and optimizer state, offloaded",
                  "fsdp_cpu", True),
    "gemini": ("GeminiPlugin(placement_policy='static')", "weights, gradients and optimizer state", "fsdp", True),
    "gemini_auto": ("GeminiPlugin(placement_policy='auto')", "weights, gradients and optimizer state, offloaded",
                    "fsdp_cpu", True),
}
INSTALL_HINT = "pip install -e '.[colossalai]' && pip install --no-deps colossalai==0.5.0"


def colossalai_installed() -> bool:
    return importlib.util.find_spec("colossalai") is not None


def check_plugin_config(name: str, parallel, train) -> None:
    """Settings this ColossalAI plugin cannot take, whatever the devices."""
    if name.startswith("gemini") and train.accumulation_steps > 1:
        raise ValueError(f"--plugin {name} does not support gradient accumulation (got --accumulation_steps "
                         f"{train.accumulation_steps}); set --accumulation_steps 1, or use --plugin zero2 or fsdp")
    if parallel.tp > 1:
        raise ValueError(f"--plugin {name} with --tp {parallel.tp}: tensor parallelism is served by the "
                         f"torch-native backends; use --plugin 3d or --plugin fsdp --tp {parallel.tp}")


def check_plugin_usable(name: str, parallel, train, cuda_visible: bool | None = None) -> None:
    """One ValueError naming every reason this ColossalAI plugin cannot run, and the torch-native fix; then the
    settings check.

    cuda_visible: whether this process sees a CUDA device; a rank passes torch.cuda.is_available(). The driver
    passes None: it may run on a node without GPUs while the ranks have them, so it checks only what the flags
    say (--gpus_per_worker), and does so before Ray starts (registry.validate_engine_config).
    """
    cls, shards, alternative, needs_cuda = PLUGINS[name]
    reasons = []
    if not colossalai_installed():
        reasons.append(f"colossalai is not installed ({INSTALL_HINT})")
    if needs_cuda and (parallel.gpus_per_worker == 0 or cuda_visible is False):
        why = "--gpus_per_worker is 0" if parallel.gpus_per_worker == 0 else "no CUDA device is visible"
        reasons.append(f"it needs CUDA GPUs (ColossalAI refuses a CPU accelerator for it) and {why}")
    if reasons:
        raise ValueError(f"--plugin {name} is ColossalAI's {cls}, sharding {shards}; it cannot run here: "
                         f"{'; '.join(reasons)}. Use the torch-native --plugin {alternative} instead "
                         f"(runs on CPU and GPU; see docs/engines.md).")
    check_plugin_config(name, parallel, train)


def colossal_description(name: str) -> str:
    cls, _, alternative, needs_cuda = PLUGINS[name]
    return f"ColossalAI {cls}{' (CUDA only)' if needs_cuda else ''}; CPU alternative: {alternative}"


#: the settings check of each built-in name that has one: validate(name, parallel, train) raises ValueError
VALIDATORS = {"tp": validate_tp, **{name: check_plugin_usable for name in PLUGINS}}
BUILTIN = frozenset(TORCH_NATIVE) | frozenset(PLUGINS)
