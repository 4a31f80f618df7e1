"""The typed config: seed flag names, dotted overrides, YAML, and clear refusals."""

import json

import pytest
from pydantic import Field

from rlhf_ray.config.base import ConfigError, JobConfig, Section, parse_config, run_cli
from rlhf_ray.config.sections import CheckpointSection, ModelSection, ParallelSection, TrainSection


class DemoData(Section):
    dataset: list[str] = Field(default_factory=list)
    max_len: int = Field(512, ge=8)


class DemoConfig(JobConfig):
    data: DemoData = DemoData()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()


def test_seed_flags_and_dotted_paths():
    cfg = parse_config(DemoConfig, ["--pretrain", "m", "--batch_size", "8", "--train.lr", "1e-4", "--grad_checkpoint",
                                    "--dataset", "a", "b", "--mixed_precision", "bf16"], "t")
    assert cfg.model.pretrain == "m" and cfg.train.batch_size == 8 and cfg.train.lr == 1e-4
    assert cfg.model.grad_checkpoint is True and cfg.data.dataset == ["a", "b"]
    assert cfg.train.mixed_precision == "bf16"


def test_yaml_then_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  batch_size: 2\nmax_len: 64\n")
    cfg = parse_config(DemoConfig, ["--config", str(path), "--batch_size", "3"], "t")
    assert cfg.train.lr == 0.001 and cfg.train.batch_size == 3 and cfg.data.max_len == 64


def test_bad_value_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_config(DemoConfig, ["--mixed_precision", "fp8"], "t")
    assert "train.mixed_precision" in str(err.value) and "'bf16'" in str(err.value) and "fp8" in str(err.value)


def test_unknown_yaml_key_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="train.lrr"):
        parse_config(DemoConfig, ["--config", str(path)], "t")
    path.write_text("bach_size: 3\n")
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config(DemoConfig, ["--config", str(path)], "t")


def test_unknown_flag_exits_2(capsys):
    assert run_cli(DemoConfig, lambda c: 0, ["--bach_size", "3"], "t") == 2
    assert "--batch_size" in capsys.readouterr().err


def test_tp_must_divide_workers():
    with pytest.raises(ConfigError, match="multiple of tp"):
        parse_config(DemoConfig, ["--num_workers", "3", "--tp", "2"], "t")


def test_resolved_config_saved(tmp_path):
    cfg = parse_config(DemoConfig, ["--lr", "0.5"], "t")
    saved = cfg.save(tmp_path / "resolved.json")
    assert json.loads(saved.read_text())["train"]["lr"] == 0.5
