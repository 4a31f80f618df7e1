"""Export to a plain HF directory (config.json + safetensors [+ tokenizer]) that transformers and vLLM load.

The weights arrive as an iterator of (hf_name, full_tensor) — the engines gather one parameter at a time — and
every rank must drain it (gathering is collective) while only the writer rank keeps and writes tensors, in
shards of at most `max_shard_bytes`, with `model.safetensors.index.json` when there is more than one shard:

    write_hf_directory(out, engine.iter_weights(), config=model.config, tokenizer=tok, is_writer=rank == 0,
                       agree=agree)

LoRA adapters that are not merged are written in peft's layout instead (`write_peft_adapter`), loadable with
`PeftModel.from_pretrained(base_model, out)`.

A failed checkpoint write must not cost the trained model, which is still in the ranks' memory: the jobs raise
CheckpointWriteError from their save and answer it with `export_despite`, which runs the export and words the one
line the user sees (what failed, where, and where the model went):

    except CheckpointWriteError as failure:
        print(f"{prog}: {export_despite(failure, export)}", file=sys.stderr); return 1
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import save_file

from rlhf_ray.checkpoint.atomic import _alone, atomic_directory

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
                       is_writer: bool = True, agree: Callable[[bool], bool] = _alone,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Atomically write an HF model directory; collective over the ranks that produce `weights`."""
    directory = Path(directory)
    with atomic_directory(directory, is_writer=is_writer, agree=agree, seal=False) as tmp:
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
                       agree: Callable[[bool], bool] = _alone) -> Path:
    """Write LoRA adapters in peft's layout: adapter_config.json + adapter_model.safetensors with keys
    `base_model.model.<module>.lora_A.weight` (adapter name dropped), as PeftModel.save_pretrained does."""
    directory = Path(directory)
    with atomic_directory(directory, is_writer=is_writer, agree=agree, seal=False) as tmp:
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


class CheckpointWriteError(RuntimeError):
    """Writing the resumable checkpoint `directory` (for `step`: optimizer steps or episodes) failed; the message
    names it and the cause in one line."""

    def __init__(self, directory: str | Path, step: int, cause: BaseException) -> None:
        super().__init__(f"writing the checkpoint {directory} failed ({_one_line(cause)})")
        self.directory, self.step = Path(directory), step


def _one_line(exc: BaseException) -> str:
    """'OSError: [Errno 28] No space left on device': the root cause, also of an error raised in a Ray actor (whose
    own text carries the remote traceback)."""
    root = getattr(exc, "cause", None)
    root = root if isinstance(root, BaseException) else exc
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[-1]}" if text else type(root).__name__


def export_despite(failure: CheckpointWriteError, export: Callable[[], Any]) -> str:
    """Run `export` (the job's HF export, returning where it wrote) after a failed checkpoint write, and return the
    one-line message for the user: what failed and where the trained model is, or that the export failed too."""
    try:
        where = export()
    except Exception as exc:                 # e.g. the disk is full for both: say so, in the same one line
        return f"{failure}; the HF export failed too ({_one_line(exc)}), so the model of this run is lost"
    return (f"{failure}; the trained model was exported to {where} all the same (transformers and vLLM load it), "
            f"but this point of the run cannot be resumed")
