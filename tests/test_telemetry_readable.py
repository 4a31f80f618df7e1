"""What a person sees of a run: a compact console line, sampled responses on disk, plots, quiet known warnings,
and HF exports without checkpoint markers."""

import json
import logging
import struct
import warnings

import pytest

from rlhf_ray.cli import main as cli_main
from rlhf_ray.config.sections import LoggingSection
from rlhf_ray.telemetry.plots import draw_curves, draw_timing, read_rows
from rlhf_ray.telemetry.tracker import ConsoleSink, build_tracker, compact_line

RL_STEP = {"reward/mean": 0.5, "reward/std": 0.1, "reward/kl": 0.01, "loss/policy": -0.2, "policy/clip_frac": 0.05,
           "rollout/response_len_mean": 12.0, "perf/rollout_tokens_per_s": 900.0, "advantages/max": 2.0,
           "timing/generate": 1.0, "timing/score": 0.5, "timing/update": 2.0, "timing/weight_sync": 0.25,
           "timing/episode": 4.0}


def test_console_shows_the_headline_numbers_and_the_time_split(capsys):
    line = compact_line(RL_STEP)
    assert line.startswith("reward=0.5  kl=0.01  pg_loss=-0.2  clip=0.05  len=12  gen_tok/s=900")
    assert line.endswith("| 4.00s: gen 1.00 score 0.50 update 2.00 sync 0.25 other 0.25")
    assert "std" not in line and "advantages" not in line
    sft = compact_line({"loss/train": 1.25, "lr": 1e-3, "grad_norm": 2.0, "perf/tokens_per_s": 5000.0,
                        "perf/tokens": 300.0, "timing/train_step": 0.03})
    assert sft == "loss=1.25  lr=0.001  grad_norm=2  tok/s=5000"
    sink = ConsoleSink(prefix="[sft] ")
    sink.log({"timing/save": 0.1, "timing/export": 0.01}, step=64)    # after the last step: nothing to repeat
    sink.log({"loss/train": 1.0}, step=64)
    ConsoleSink(prefix="[sft] ", verbose=True).log({"loss/train": 1.0, "perf/tokens": 300.0}, step=64)
    assert capsys.readouterr().out.splitlines() == ["[sft] step 64: loss=1",
                                                    "[sft] step 64: loss/train=1  perf/tokens=300"]


def test_samples_reach_jsonl_and_tensorboard(tmp_path):
    samples = [{"prompt": "1+1=", "response": "2 | two", "reward": 1.0, "length": 2},
               {"prompt": "1+1=", "response": "3", "reward": 0.0, "length": 1}]
    with build_tracker(LoggingSection(log_dir=str(tmp_path)), run_name="t", console=False) as tracker:
        tracker.log(RL_STEP, step=1)
        tracker.log_samples(samples, step=1)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, **sample} for sample in samples]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| prompt | response | reward | length |" in text and "2 \\| two" in text
    assert (tmp_path / "plots" / "curves.png").is_file()          # every job draws its plots when it ends


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _write_run(directory, reward_slope: float) -> None:
    directory.mkdir()
    with (directory / "metrics.jsonl").open("w") as handle:
        handle.write(json.dumps({"step": 0, "timing/startup": 3.0}) + "\n")
        for step in range(1, 9):
            handle.write(json.dumps({**RL_STEP, "step": step, "reward/mean": reward_slope * step,
                                     "loss/value": 1.0 / step, "reward/kl": None}) + "\n")


def test_plot_command_overlays_runs(tmp_path, capsys):
    _write_run(tmp_path / "a", 0.1)
    _write_run(tmp_path / "b", 0.2)
    assert cli_main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    for name in ("curves.png", "timing.png"):
        path = tmp_path / "out" / name
        width, height = _png_size(path)
        assert width > 300 and height > 150 and path.stat().st_size > 10_000
        assert f"plot -> {path}" in printed
    runs = {"a": read_rows(tmp_path / "a"), "b": read_rows(tmp_path / "b" / "metrics.jsonl")}
    curves = draw_curves(runs)
    titles = [ax.get_title() for ax in curves.axes]
    assert not curves.axes[1].get_lines()
    # KL was logged, but only as NaN (None in the JSONL): its panel is there, without lines
    assert titles == ["reward", "KL", "policy loss", "value loss", "response length", "clip fraction", "tokens/s"]
    reward_lines = curves.axes[0].get_lines()
    assert [line.get_label() for line in reward_lines] == ["a", "b"]
    assert list(reward_lines[1].get_ydata())[-1] == 0.2 * 8
    timing = draw_timing(runs)
    assert len(timing.axes) == 2
    assert [t.get_text() for t in timing.axes[0].get_legend().get_texts()] == ["generate", "score", "update",
                                                                              "weight_sync"]


def test_plot_refuses_a_directory_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["plot", str(tmp_path)])
    assert exited.value.code == 2 and "no metrics.jsonl there" in capsys.readouterr().err


def test_known_harmless_warnings_are_dropped_and_real_ones_still_show():
    from rlhf_ray.rollout.backends.vllm_backend import quiet_known_warnings

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_warnings()
            quiet_known_warnings()                          # idempotent: one filter per rule
            logger.warning("%s: Failed to load weights", "RotaryEmbedding")
            logger.warning("%s: Failed to load weights", "ParallelLMHead")
            logger.warning("%s: Failed to load weights", "LlamaDecoderLayer")      # a real layer: shown
            logger.warning("weights of layer 3 are NaN")
            warnings.warn("`torch.distributed.reduce_op` is deprecated, please use ReduceOp", FutureWarning)
            warnings.warn("`foo` is deprecated", FutureWarning)
    finally:
        logger.removeHandler(handler)
    assert seen == ["LlamaDecoderLayer: Failed to load weights", "weights of layer 3 are NaN"]
    assert [str(w.message) for w in caught] == ["`foo` is deprecated"]
    assert len(logger.filters) == 1


def test_hf_export_carries_no_checkpoint_marker(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.checkpoint.hf_export import write_hf_directory

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = write_hf_directory(tmp_path / "hf", model.state_dict().items(), config=model.config)
    assert not {"COMPLETE", "MANIFEST.json"} & {p.name for p in out.iterdir()}
    AutoModelForCausalLM.from_pretrained(out)


def test_first_samples_take_a_few_prompts_with_their_samples():
    from rlhf_ray.pipelines.rl.controller import first_samples
    from rlhf_ray.rewards.base import RewardBatch

    prompts = [p for p in "abcd" for _ in range(6)]                    # 4 prompts × 6 samples, prompt-major
    texts = RewardBatch(prompts, [f"r{i}" for i in range(24)])
    records = first_samples(texts, [float(i) for i in range(24)], list(range(24)), prompts=3, per_prompt=4)
    assert [(r["prompt"], r["response"]) for r in records] == [(p, f"r{i}") for p, start in (("a", 0), ("b", 6),
                                                                                             ("c", 12))
                                                               for i in range(start, start + 4)]
    assert records[5] == {"prompt": "b", "response": "r7", "reward": 7.0, "length": 7}
