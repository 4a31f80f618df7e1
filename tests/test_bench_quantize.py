"""bench_quantize on the tiny model: fp32 and int4 in one run, the JSON a reader (and README) relies on."""

import json

import pytest

from rlhf_ray.benchmarks.bench_quantize import main


def test_int4_weights_are_smaller_than_fp32_and_every_field_is_written(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is installed by the colossalai extra (make install)")
    assert main(["--quick", "--modes", "fp32", "int4", "--held", "4", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quantize.json").read_text())
    fp32, int4 = report["results"]
    assert (fp32["mode"], int4["mode"]) == ("fp32", "int4") and report["held_texts"] == 4
    for row in (fp32, int4):
        assert row["weight_bytes"] > 0 and row["tokens_per_s"] > 0 and row["held_tokens"] > 0
        assert row["perplexity"] == pytest.approx(2.718281828 ** row["mean_nll"], rel=1e-6)
        assert 0 <= row["greedy_match_fp32"] <= 1 and "rss_delta_bytes" in row
    assert fp32["weight_ratio"] == fp32["speed_ratio"] == fp32["perplexity_ratio"] == fp32["greedy_match_fp32"] == 1
    assert int4["weight_bytes"] < 0.5 * fp32["weight_bytes"]          # NF4 linear layers; embeddings stay fp32
    assert int4["weight_ratio"] == pytest.approx(int4["weight_bytes"] / fp32["weight_bytes"])
