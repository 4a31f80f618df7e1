"""Model and optimizer state through torch.distributed.checkpoint (DCP), stored as safetensors.

DCP's default storage pickles its metadata and non-tensor values, and loading it unpickles them. This module
uses DCP's HuggingFace storage instead: every rank writes its own shards as `.safetensors` files whose header
records each shard's offset (JSON), and reading rebuilds the layout from those headers, so nothing is unpickled.
Only tensors go through DCP; the optimizer's hyper-parameters (`param_groups`) are written as JSON beside them.

DCP re-shards on load, so a checkpoint saved by 2 FSDP ranks loads into 1 process or 4, and one saved by DDP
loads into FSDP/TP. Works without a process group too (single process).

    model/       shard-0000r-model-0000r-of-0000N.safetensors   (names: the unwrapped module's state dict)
    optimizer/   the same for exp_avg / exp_avg_sq / step, keyed state.<param name>.<key>
    optimizer_param_groups.json
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

PARAM_GROUPS_FILE = "optimizer_param_groups.json"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes a single process' each time it runs without a process group: that is intended."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _writer(path: Path) -> HuggingFaceStorageWriter:
    # save_distributed: each rank writes its own shard file(s); DCP de-duplicates replicated tensors.
    return HuggingFaceStorageWriter(str(path), save_distributed=dist.is_initialized())


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters registered under several names (tied input/output embeddings:
    `lm_head.weight` -> `model.embed_tokens.weight`). One tensor is one entry on disk: safetensors refuses two
    names for the same memory, and a second copy would untie the weights on load."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in first:
            aliases[_state_name(name)] = _state_name(first[key])
        else:
            first[key] = name
    return aliases


def _state_name(name: str) -> str:
    # named_parameters and get_model_state_dict agree except for wrappers' prefixes, which the state dict drops.
    for prefix in ("_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name


def save_model_state(directory: Path, model: nn.Module) -> None:
    """Collective: every rank writes its shards of the model's state dict under directory (a tied parameter once,
    under its first name)."""
    state = get_model_state_dict(model)
    for alias in tied_aliases(model):
        state.pop(alias, None)
    with _quiet_single_process():
        dcp.save(state, storage_writer=_writer(directory))


def load_model_state(directory: Path, model: nn.Module) -> None:
    """Collective: fill the (possibly sharded) model in place from a checkpoint written by save_model_state. A tied
    parameter is read once and stays one parameter."""
    state = get_model_state_dict(model)
    aliases = tied_aliases(model)
    for alias in aliases:
        state.pop(alias, None)
    with _quiet_single_process():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(directory)))
    for alias, name in aliases.items():
        if name in state:
            state[alias] = state[name]
    set_model_state_dict(model, state)


def save_optimizer_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                         is_writer: bool) -> None:
    """Collective: tensors through DCP; param_groups (floats, tuples, names) as JSON by the writer rank."""
    state = get_optimizer_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"state": state["state"]}, storage_writer=_writer(directory))
    if is_writer:
        (directory.parent / PARAM_GROUPS_FILE).write_text(json.dumps(state["param_groups"], indent=1))


def load_optimizer_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: restore the optimizer's moments and step counts, and its hyper-parameters from JSON."""
    template = get_optimizer_state_dict(model, optimizer)          # initialises empty state with the right shards
    tensors = {"state": template["state"]}
    with _quiet_single_process():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(directory)))
    saved_groups = json.loads((directory.parent / PARAM_GROUPS_FILE).read_text())
    groups = template["param_groups"]
    # Layouts group parameters differently (TP splits DTensor and plain tensors), so match groups by name.
    saved_by_param = {name: group for group in saved_groups for name in group["params"]}
    current = {name for group in groups for name in group["params"]}
    if current != set(saved_by_param):
        raise ValueError(f"checkpoint {directory.parent}: its optimizer covers other parameters than this model's "
                         f"(e.g. {sorted(current ^ set(saved_by_param))[:3]}); was it written for another model "
                         f"or LoRA setting?")
    for group in groups:
        saved = saved_by_param[group["params"][0]]
        for key, value in saved.items():
            if key != "params":
                group[key] = tuple(value) if isinstance(value, list) else value
    set_optimizer_state_dict(model, optimizer, {"state": tensors["state"], "param_groups": groups})
