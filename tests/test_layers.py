"""The package layers: import-linter's contract in pyproject.toml (lazy imports count), and the pure layers stay
free of Ray and vLLM when imported alone."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_packages_import_only_downward():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency (pip install -e .[dev])"
    result = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_pure_layers_load_neither_ray_nor_vllm():
    code = ("import sys; import rlhf_ray.algorithms, rlhf_ray.buffer.experience, rlhf_ray.rollout, "
            "rlhf_ray.utils; print(sorted(m for m in ('ray', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
