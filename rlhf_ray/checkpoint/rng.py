"""Per-rank random-number-generator state (torch CPU and CUDA, numpy, python), saved without pickle.

Tensors go to safetensors, the rest to JSON: `rng/rank{r}.safetensors` + `rng/rank{r}.json`.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json_data) describing every RNG this process uses."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss_next = random.getstate()
    data = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    return tensors, data


def restore_rng_state(tensors: dict[str, torch.Tensor], data: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    numpy = data["numpy"]
    np.random.set_state((numpy["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = data["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def save_rng(directory: Path, rank: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors, data = capture_rng_state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / f"rank{rank}.safetensors"))
    (directory / f"rank{rank}.json").write_text(json.dumps(data))


def load_rng(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG state; False (with a warning) when the checkpoint has none for this rank."""
    tensor_file, json_file = directory / f"rank{rank}.safetensors", directory / f"rank{rank}.json"
    if not (tensor_file.is_file() and json_file.is_file()):
        log.warning("checkpoint %s has no RNG state for rank %d (saved with another world size?); "
                    "RNG streams continue from this run's seed", directory, rank)
        return False
    restore_rng_state(load_file(str(tensor_file)), json.loads(json_file.read_text()))
    return True
