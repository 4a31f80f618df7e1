"""Export to a plain HF directory (config.json + safetensors [+ tokenizer]) that transformers and vLLM load.

The weights arrive as an iterator of (hf_name, full_tensor) — the engines gather one parameter at a time — and
every rank must drain it (gathering is collective) while only the writer rank keeps and writes tensors, in
shards of at most `max_shard_bytes`, with `model.safetensors.index.json` when there is more than one shard:

    write_hf_directory(out, engine.iter_weights(), config=model.config, tokenizer=tok, is_writer=rank == 0,
                       barrier=barrier)

LoRA adapters that are not merged are written in peft's layout instead (`write_peft_adapter`), loadable with
`PeftModel.from_pretrained(base_model, out)`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import save_file

from rlhf_ray.checkpoint.atomic import _no_barrier, atomic_directory

DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3
SAFETENSORS_METADATA = {"format": "pt"}     # transformers refuses safetensors files without it


def _write_shards(directory: Path, weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None,
                  keep: bool, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal size
        if shards[-1]:
            name = f"model-part{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], str(directory / name), metadata=SAFETENSORS_METADATA)
            files.append(name)
            weight_map.update({key: name for key in shards[-1]})
        shards[-1] = {}
        size = 0

    weight_map: dict[str, str] = {}
    for name, tensor in weights:
        if not keep:
            continue            # non-writer ranks only take part in the gathers
        tensor = tensor.detach().to("cpu", dtype=dtype if dtype is not None and tensor.is_floating_point() else None)
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = tensor.contiguous().clone()
        size += nbytes
    if not keep:
        return
    flush()
    if len(files) == 1:
        (directory / files[0]).rename(directory / "model.safetensors")
        return
    renamed = {old: f"model-{i:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files, start=1)}
    for old, new in renamed.items():
        (directory / old).rename(directory / new)
    total = sum((directory / new).stat().st_size for new in renamed.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_hf_directory(directory: str | Path, weights: Iterable[tuple[str, torch.Tensor]], *, config: Any,
                       generation_config: Any = None, tokenizer: Any = None, dtype: torch.dtype | None = None,
                       is_writer: bool = True, barrier: Callable[[], None] = _no_barrier,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Atomically write an HF model directory; collective over the ranks that produce `weights`."""
    directory = Path(directory)
    with atomic_directory(directory, is_writer=is_writer, barrier=barrier, seal=False) as tmp:
        _write_shards(tmp, weights, dtype, keep=is_writer, max_shard_bytes=max_shard_bytes)
        if is_writer:
            config = copy.deepcopy(config)
            if dtype is not None:
                config.dtype = dtype
            config.save_pretrained(str(tmp))
            if generation_config is not None:
                generation_config.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    return directory


def write_peft_adapter(directory: str | Path, adapter_weights: Iterable[tuple[str, torch.Tensor]], *, lora_config: Any,
                       tokenizer: Any = None, is_writer: bool = True,
                       barrier: Callable[[], None] = _no_barrier) -> Path:
    """Write LoRA adapters in peft's layout: adapter_config.json + adapter_model.safetensors with keys
    `base_model.model.<module>.lora_A.weight` (adapter name dropped), as PeftModel.save_pretrained does."""
    directory = Path(directory)
    with atomic_directory(directory, is_writer=is_writer, barrier=barrier, seal=False) as tmp:
        tensors = {}
        for name, tensor in adapter_weights:
            if is_writer:
                key = "base_model.model." + name.replace(".default.", ".")
                tensors[key] = tensor.detach().to("cpu").contiguous().clone()
        if is_writer:
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=SAFETENSORS_METADATA)
            lora_config.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    return directory
