"""load_prepared_rows (pyarrow alone) reads what load_prepared (datasets) reads, refuses what it refuses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf_ray.data.loading import load_prepared, load_prepared_rows
from rlhf_ray.fixtures.tiny import TOKENIZER_DIR

from rl_data import prepare_prompts, prepare_ptx


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    return (prepare_prompts(TOKENIZER_DIR, root / "a", count=40, seed=1),
            prepare_prompts(TOKENIZER_DIR, root / "b", count=24, seed=2),
            prepare_ptx(TOKENIZER_DIR, root / "ptx", count=16))


def test_rows_equal_the_datasets_rows_in_order(prepared):
    a, b, ptx = prepared
    rows = load_prepared_rows([a, b], "prompt")
    assert len(rows) > 40 and rows == load_prepared([a, b], "prompt").to_list()
    assert load_prepared_rows(ptx, "ptx") == load_prepared(ptx, "ptx").to_list()
    assert load_prepared_rows(a / "arrow") == load_prepared(a / "arrow").to_list()     # <dir>/arrow itself


def test_the_same_refusals(prepared, tmp_path):
    a, _, ptx = prepared
    for path, kind in ((ptx, "prompt"), (tmp_path / "absent", "prompt"), (tmp_path, "prompt"), (a, "nope")):
        with pytest.raises(ValueError) as datasets_way:
            load_prepared(path, kind)
        with pytest.raises(ValueError) as pyarrow_way:
            load_prepared_rows(path, kind)
        assert str(pyarrow_way.value) == str(datasets_way.value)


def test_rows_load_without_importing_datasets(prepared):
    code = (f"import sys; from rlhf_ray.data.loading import load_prepared_rows; "
            f"rows = load_prepared_rows({str(prepared[0])!r}, 'prompt'); print(len(rows), 'datasets' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["40", "False"], done.stdout
