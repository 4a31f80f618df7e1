"""`rlhf-ray bench rollout|sync` on a user's model: the workload flags, the report's fields, and the CLI dispatch
(run from a directory outside the checkout, as an installed wheel would be)."""

import json
import random

import pytest

from rlhf_ray.benchmarks.bench_rollout import engine_counts
from rlhf_ray.benchmarks.workload import LengthDist, percentiles
from rlhf_ray.cli import main as cli


def test_length_distributions_parse_and_draw_the_stated_shape():
    rng = random.Random(0)
    assert LengthDist.parse("128", "--output_len").sample(3, rng) == [128] * 3
    uniform = LengthDist.parse("64:512", "--output_len").sample(200, rng)
    assert min(uniform) >= 64 and max(uniform) <= 512 and len(set(uniform)) > 50
    skewed = LengthDist.parse("skewed:32:512:0.1", "--output_len").sample(40, rng)
    assert sorted(set(skewed)) == [32, 512] and skewed.count(512) == 4
    for bad in ("x", "512:64", "skewed:32:512:2", "skewed:32"):
        with pytest.raises(ValueError, match=f"--input_len '{bad}'"):
            LengthDist.parse(bad, "--input_len")


def test_percentiles_and_engine_counts():
    assert percentiles([]) is None
    assert percentiles([float(v) for v in range(1, 101)]) == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert percentiles([3.0]) == {"p50": 3.0, "p90": 3.0, "p99": 3.0}
    assert engine_counts(1) == [1] and engine_counts(2) == [1, 2] and engine_counts(6) == [1, 2, 4, 6]


@pytest.mark.ray
@pytest.mark.vllm
def test_bench_rollout_on_a_model_with_a_skewed_synthetic_workload(ray_cluster, tiny_model_dir, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                           # nothing may depend on being run from the checkout
    assert cli(["bench", "rollout", "--model", str(tiny_model_dir), "--synthetic", "--input_len", "8:16",
                "--output_len", "skewed:4:24:0.25", "--num_prompts", "8", "--engines", "1", "--n", "2",
                "--repeats", "1", "--min_seconds", "0", "--bandwidth", "20", "--kv_cache_gib", "0.25",
                "--out", "bench"]) == 0
    assert "engines 1: group" in capsys.readouterr().out
    report = json.loads((tmp_path / "bench" / "bench_rollout.json").read_text())
    assert report["workload"]["generated_tokens"] == (6 * 4 + 2 * 24) * 2 and report["group_length_classes"] == 2
    (row,) = report["rows"]
    for mode in ("group", "raw"):
        stats = row[mode]
        assert stats["tokens"] == report["workload"]["generated_tokens"] and stats["tokens_per_s"] > 0
        assert stats["prompts_per_s"] == pytest.approx(8 / stats["seconds"])
        lat = stats["latency_s"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= stats["seconds"]
    ttft = row["raw"]["ttft_s"]
    assert 0 < ttft["p50"] <= ttft["p99"] < row["raw"]["latency_s"]["p99"]     # first tokens come before the last
    summary = report["summary"]
    assert summary["group_over_raw_1_engine"] == pytest.approx(row["group"]["tokens_per_s"] /
                                                               row["raw"]["tokens_per_s"])
    bound = summary["decode_bound"]
    assert bound["steps_per_s_per_engine"] == pytest.approx(20e9 / report["workload"]["weight_bytes"])
    assert (tmp_path / "bench" / "bench_rollout.png").stat().st_size > 0


@pytest.mark.ray
@pytest.mark.vllm
def test_bench_sync_on_a_model(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["bench", "sync", "--model", str(tiny_model_dir), "--engines", "1", "--channels", "object_store",
                "--repeats", "1", "--out", "bench"]) == 0
    (row,) = json.loads((tmp_path / "bench" / "bench_weight_sync.json").read_text())["rows"]
    assert row["model"] == str(tiny_model_dir) and row["channel"] == "object_store" and row["bytes"] > 0
    assert row["sync_seconds"] > 0 and row["raw_seconds"] > 0
    assert row["sync_gb_per_s"] == pytest.approx(row["bytes"] / row["sync_seconds"] / 1e9)
    assert row["sync_over_raw"] == pytest.approx(row["raw_seconds"] / row["sync_seconds"])
