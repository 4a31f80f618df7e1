"""The typed config: seed flag names, dotted overrides, YAML, and clear refusals; every job's alias table against
the docs, the README and the demo."""

import json
import re
from pathlib import Path

import pytest
from pydantic import Field

from rlhf_ray.config.base import ConfigError, JobConfig, Section, parse_config, run_cli
from rlhf_ray.config.sections import CheckpointSection, ModelSection, ParallelSection, TrainSection
from rlhf_ray.pipelines import dpo, prepare, rm, sft
from rlhf_ray.pipelines.rl.config import GRPOConfig, PPOConfig


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


@pytest.mark.parametrize("text, message", [
    ("train:\n  lrr: 0.1\n", "unknown key 'train.lrr'. Did you mean: train.lr"),
    ("bach_size: 3\n", "unknown key 'bach_size'. Did you mean: batch_size"),
    ("train:\n  lr: -1\n", "train.lr: Input should be greater than 0"),
    ("batch_size: zero\n", "batch_size: Input should be a valid integer"),
])
def test_yaml_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        parse_config(DemoConfig, ["--config", str(path)], "t")


def test_a_bad_flag_over_a_file_is_named_as_typed(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"--batch_size \(train.batch_size\): Input should be a valid integer"):
        parse_config(DemoConfig, ["--config", str(path), "--batch_size", "x"], "t")
    with pytest.raises(ConfigError, match=r"  --train.batch_size: Input should be a valid integer"):
        parse_config(DemoConfig, ["--config", str(path), "--train.batch_size=x"], "t")


def test_unknown_flag_exits_2(capsys):
    assert run_cli(DemoConfig, lambda c: 0, ["--bach_size", "3"], "t") == 2
    assert capsys.readouterr().err.startswith("t: unknown flag '--bach_size'. Did you mean: --batch_size")
    assert run_cli(DemoConfig, lambda c: 0, ["--lr"], "t") == 2               # argparse's own errors: one line too
    assert capsys.readouterr().err == "t: argument --lr/--train.lr: expected one argument\n"


def test_tp_must_divide_workers():
    with pytest.raises(ConfigError, match="multiple of tp"):
        parse_config(DemoConfig, ["--num_workers", "3", "--tp", "2"], "t")


def test_resolved_config_saved(tmp_path):
    cfg = parse_config(DemoConfig, ["--lr", "0.5"], "t")
    saved = cfg.save(tmp_path / "resolved.json")
    assert json.loads(saved.read_text())["train"]["lr"] == 0.5


# ---------------------------------------------------------------- every job: the seed's flat names as explicit aliases

ROOT = Path(__file__).resolve().parent.parent
JOBS = {"prepare": prepare.PrepareConfig, "sft": sft.SFTConfig, "rm": rm.RMConfig, "dpo": dpo.DPOConfig,
        "ppo": PPOConfig, "grpo": GRPOConfig}
# `rlhf-ray <job> ...` in the docs, with its `\` continuation lines
COMMAND = re.compile(r"rlhf-ray (prepare|sft|rm|dpo|ppo|grpo)((?:\\\n|[^`\n])*)")
FLAG = re.compile(r"(?<![\w-])--([a-z][\w.]*)")


def _resolves(job: str, flag: str) -> bool:
    cls = JOBS[job]
    return flag in cls.flag_names() or flag in cls.field_paths() or flag in ("config", "help")


@pytest.mark.parametrize("job", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_seed_reaches_every_training_job(job):
    cfg = parse_config(JOBS[job], ["--seed", "7", "--dataset", "d"] if job in ("sft", "rm", "dpo") else
                       ["--seed", "7"], f"rlhf-ray {job}")
    assert cfg.train.seed == 7
    if job in ("ppo", "grpo"):                       # the generator's own seed stays reachable by its dotted path
        assert parse_config(JOBS[job], ["--generator.seed", "3"], job).generator.seed == 3


def test_a_jobs_default_section_instance_keeps_its_values():
    cfg = parse_config(sft.SFTConfig, ["--dataset", "d", "--save_interval", "5"], "rlhf-ray sft")
    assert (cfg.checkpoint.save_path, cfg.checkpoint.save_interval) == ("output/sft", 5)


def test_readme_seed_flags_resolve_in_their_jobs():
    readme = (ROOT / "README.md").read_text()
    supervised = readme[readme.index("The seed's (ColossalChat) flag names work"):readme.index("every field is also")]
    pools = readme[readme.index("each role is put on a pool"):].split("\n")[0]
    checked = [(job, flag) for job in ("sft", "rm", "dpo") for flag in FLAG.findall(supervised)]
    checked += [("ppo", flag) for flag in FLAG.findall(pools)]
    assert len(checked) > 50 and [c for c in checked if not _resolves(*c)] == []


def test_every_documented_command_uses_known_flags():
    checked, unknown = 0, []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for job, args in COMMAND.findall(path.read_text()):
            for flag in FLAG.findall(args):
                checked += 1
                if not _resolves(job, flag):
                    unknown.append(f"{path.name}: rlhf-ray {job} --{flag}")
    assert checked > 100 and unknown == []


def test_demo_commands_parse(tmp_path):
    from rlhf_ray.demo import stage_commands

    for job, commands in stage_commands(tmp_path).items():
        for argv in commands:
            assert argv[3] == job
            parse_config(JOBS[job], argv[4:], f"rlhf-ray {job}")


def test_a_field_name_two_sections_share_needs_an_owner():
    class Sampling(Section):
        seed: int = 0

    with pytest.raises(TypeError, match="need their owner in `aliases`.*'seed'"):
        class Clash(JobConfig):
            train: TrainSection = TrainSection()
            sampling: Sampling = Sampling()

    class Settled(JobConfig):
        train: TrainSection = TrainSection()
        sampling: Sampling = Sampling()
        aliases = {"seed": "train.seed", "sampling_seed": "sampling.seed"}

    cfg = parse_config(Settled, ["--seed", "1", "--sampling_seed", "2"], "t")
    assert (cfg.train.seed, cfg.sampling.seed) == (1, 2)
    with pytest.raises(TypeError, match="point at no field"):
        class Dangling(JobConfig):
            train: TrainSection = TrainSection()
            aliases = {"learning_rate": "train.learning_rate"}


def test_help_lists_every_flag_with_its_description(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(PPOConfig, ["--help"], "rlhf-ray ppo")
    text = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0
    for dotted, field in PPOConfig.field_paths().items():
        assert f"--{dotted}" in text and " ".join(field.description.replace("%%", "%").split()) in text, dotted
    for name in PPOConfig.flag_names():
        assert f"--{name}" in text
    assert "(default: 9e-06)" in text                # the job's own default, not TrainSection's
