"""README's TRL table carries the numbers of the committed reference JSON, not hand-copied ones that drifted."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = {"TRL": "trl", "rlhf-ray (vLLM)": "rlhf_ray", "rlhf-ray (`--backend hf`)": "rlhf_ray_hf"}


def _table_rows() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    start = text.index("| workload | system | s/step | steps/s ÷ TRL |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("*") for cell in line.strip("|").split("|")])
    return rows


def test_the_trl_table_matches_benchmarks_results_trl_peer_json():
    report = json.loads((REPO / "benchmarks/results/trl_peer.json").read_text())
    rows, size = _table_rows(), None
    assert len(rows) == sum(len(s["runs"]) for s in report["sizes"].values())
    for workload, system, per_step, ratio, wall, wall_ratio, tokens, rss in rows:
        size = workload.split(":")[0] if workload else size
        result = report["sizes"][size]
        runs, name = result["runs"], SYSTEMS[system]

        def median(key):
            return statistics.median(run[key] for run in runs[name])

        digits = 3 if median("s_per_step") < 10 else 1
        assert per_step == f"{median('s_per_step'):.{digits}f} s", (size, system)
        assert wall.startswith(f"{median('wall_s'):.{1 if median('wall_s') < 100 else 0}f} s ("), (size, system)
        assert wall.endswith(f"({median('startup_s'):.1f} s)"), (size, system)
        assert tokens == f"{median('generated_tokens_per_s'):.0f}" and rss == f"{median('peak_rss_gib'):.2f} GiB"
        if name == "trl":
            assert ratio == wall_ratio == ""
        else:
            ratios = result["ratios_of_medians"][name]
            assert ratio == f"{ratios['steps_per_s_over_trl']:.2f}" and \
                wall_ratio == f"{ratios['wall_trl_over_ours']:.2f}", (size, system)
