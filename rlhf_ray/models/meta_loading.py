"""Building a pretrained model without its weights, and reading slices of its safetensors checkpoint.

Sharded engines (FSDP2, TP) need on each rank only that rank's shard. Inside `defer_weights()`, load_causal_lm and
load_value_model build the model from its config with every checkpoint parameter on the meta device (no memory);
parameters the checkpoint lacks (LoRA adapters, a fresh value head) and buffers (rotary inv_freq) are real CPU
tensors, computed as usual. The engine shards that skeleton, allocates its local shards and fills them from a
`CheckpointReader`, which reads only the requested region of each tensor:

    with defer_weights() as deferred:
        model = load_causal_lm(model_cfg)          # deferred.checkpoint_dir is set when the build was deferred
    ...shard, to_empty...
    reader = CheckpointReader.open(deferred.checkpoint_dir)
    local.copy_(reader.read("model.layers.0.mlp.up_proj.weight", (slice(0, 768), slice(0, 576))))

When the checkpoint cannot serve the model directly (no local safetensors, or names/shapes that transformers
converts on load, e.g. fused MoE experts), the build falls back to `from_pretrained` and says so in the log.
This module never imports torch.distributed: the engines know the shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass
class DeferredWeights:
    """Set by the loaders inside defer_weights(): where the meta parameters' values are (None: not deferred)."""

    checkpoint_dir: str | None = None


_DEFERRED: ContextVar[DeferredWeights | None] = ContextVar("deferred_weights", default=None)


@contextlib.contextmanager
def defer_weights(enabled: bool = True) -> Iterator[DeferredWeights | None]:
    """Inside, load_causal_lm / load_value_model leave checkpoint parameters on the meta device; yields the record
    they fill (None when not enabled)."""
    record = DeferredWeights() if enabled else None
    token = _DEFERRED.set(record)
    try:
        yield record
    finally:
        _DEFERRED.reset(token)


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside move to the meta device as they are created (one at a time, never touched:
    `torch.empty` pages are not resident); buffers stay real, so computed ones keep their values."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def from_pretrained_or_meta(model_class, path: str, config, new_modules: tuple[str, ...] = (), **kwargs) -> nn.Module:
    """`model_class.from_pretrained(path, config=config, **kwargs)`, or inside defer_weights() the same model with
    its checkpoint parameters on the meta device (eval mode and generation config as from_pretrained gives them).

    new_modules: top-level children the checkpoint is not expected to hold (a fresh `score` head); the caller
    initialises them.
    """
    record = _DEFERRED.get()
    reader = CheckpointReader.open(path) if record is not None else None
    if reader is None:
        if record is not None:
            log.info("%s: no local safetensors; loading the full model on this rank instead of its shard", path)
        return model_class.from_pretrained(path, config=config, **kwargs)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    from transformers.initialization import no_init_weights

    # Random init of meta tensors does nothing but costs seconds; transformers' own loader skips it and ties after.
    with _parameters_on_meta(), no_init_weights():
        model = model_class.from_config(config, **kwargs)
    model.tie_weights()
    # every parameter must come from the checkpoint as it is (no renaming or fusing on load), and be on meta
    mismatched = sorted(name for name, p in model.named_parameters() if name.split(".", 1)[0] not in new_modules
                        and (reader.shapes.get(name) != tuple(p.shape) or not p.is_meta))
    if mismatched:
        log.info("%s: checkpoint names or shapes differ from the model's (%s, ...); loading the full model on this "
                 "rank instead of its shard", path, mismatched[0])
        return model_class.from_pretrained(path, config=config, **kwargs)
    if model.can_generate() and (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    record.checkpoint_dir = path
    return model.eval()


class CheckpointReader:
    """Reads regions of tensors from a directory of safetensors files (one file or a sharded index), one slice at
    a time: `read(name, region)` copies only the bytes of that region."""

    def __init__(self, directory: str | Path, files: dict[str, Path]) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        self._files = files                            # tensor name -> file
        #: tensor name -> shape, from the file headers
        self.shapes = {}
        for file in set(files.values()):
            with safe_open(str(file), framework="pt") as handle:
                self.shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})

    @classmethod
    def open(cls, directory: str | Path) -> CheckpointReader | None:
        """A reader for an HF directory, or None when it has no safetensors weights (a hub name, .bin files)."""
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls(directory, {name: directory / file for name, file in weight_map.items()})
        single = directory / "model.safetensors"
        if not single.is_file():
            return None
        with safe_open(str(single), framework="pt") as handle:
            return cls(directory, dict.fromkeys(handle.keys(), single))

    def read(self, name: str, region: tuple[slice, ...]) -> torch.Tensor:
        """Tensor `name` restricted to `region` (one slice per dimension), as stored (dtype of the file).

        The file is mapped for this read only: pages of the mapping count in the process's resident memory for as
        long as it is open, so a handle kept open would add the file's size to the peak."""
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as handle:
            piece = handle.get_slice(name)
            return piece[region] if region else piece[:]
