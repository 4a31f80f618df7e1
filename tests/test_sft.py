"""`rlhf-ray sft` through its main() on the session's Ray cluster: loss falls on held-back data, metrics,
resumable checkpoints that continue exactly, HF output, and clear errors for bad input."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlhf_ray.pipelines import sft
from rlhf_ray.telemetry.tracker import read_jsonl_metrics

pytestmark = pytest.mark.ray
STEPS = 12      # 192 rows / (batch 8 × dp 2) = 12 steps, one epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from supervised_data import sft_data

    return sft_data(tmp_path_factory.mktemp("sft-data"))


def _argv(model_dir, data, out: Path, *extra: str) -> list[str]:
    train_dir, eval_dir = data
    return ["--pretrain", str(model_dir), "--dataset", str(train_dir), "--eval_dataset", str(eval_dir),
            "--batch_size", "8", "--num_workers", "2", "--cpus_per_worker", "0.5", "--lr", "1e-3",
            "--save_path", str(out / "model"), "--log_dir", str(out / "logs"), *extra]


@pytest.fixture(scope="module")
def first_run(ray_cluster, tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-run")
    status = sft.main(_argv(tiny_model_dir, data, out, "--eval_at_start", "--eval_interval", "6",
                            "--save_interval", "4", "--config_file", str(out / "resolved.yaml")))
    assert status == 0
    return out, read_jsonl_metrics(out / "logs" / "metrics.jsonl")


def _series(rows, key):
    return {row["step"]: row[key] for row in rows if row.get(key) is not None}


def test_sft_loss_falls_on_the_held_back_split(first_run):
    _, rows = first_run
    eval_loss = _series(rows, "loss/eval")
    assert sorted(eval_loss) == [0, 6, 12]
    assert eval_loss[12] < eval_loss[6] < eval_loss[0] - 1.0, eval_loss
    assert len(_series(rows, "loss/train")) == STEPS


def test_sft_logs_the_documented_metrics(first_run):
    _, rows = first_run
    keys = set().union(*rows)
    for key in ("loss/train", "loss/eval", "lr", "grad_norm", "perf/tokens_per_s", "perf/tokens",
                "timing/train_step", "timing/data", "timing/eval", "timing/save", "timing/startup", "timing/export"):
        assert key in keys, key
    lr = _series(rows, "lr")
    assert lr[STEPS] < lr[2]    # warmup then cosine decay


def test_sft_writes_config_checkpoints_and_a_transformers_model(first_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = first_run
    resolved = yaml.safe_load((out / "resolved.yaml").read_text())
    assert resolved["train"]["lr"] == 1e-3 and resolved["parallel"]["num_workers"] == 2
    assert sft.SFTConfig.model_validate(resolved).data.eval_interval == 6
    checkpoints = sorted(p.name for p in (out / "model-checkpoints").iterdir())
    assert checkpoints == ["step_12", "step_4", "step_8"]
    state = json.loads((out / "model-checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state == {"step": 4, "epoch": 0, "batch_in_epoch": 4, "global_batch": 16, "seed": 42}

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_resume_continues_exactly_like_the_uninterrupted_run(first_run, tiny_model_dir, data, tmp_path):
    """Stop after step 4 (its checkpoint; step_8 and step_12 beside it are made to look unfinished and corrupted, so
    resume from the directory must pick step_4), resume in a new job: steps 5-6 match the uninterrupted run's losses to
    float64 printing precision (same data order, weights, AdamW moments, schedule and RNG)."""
    out, uninterrupted = first_run
    saved = tmp_path / "saved"
    shutil.copytree(out / "model-checkpoints", saved)
    (saved / "step_8" / "COMPLETE").unlink()
    with (saved / "step_12" / "engine_state.json").open("r+b") as handle:
        handle.write(b" ")
    status = sft.main(_argv(tiny_model_dir, data, tmp_path, "--max_steps", "6", "--save_interval", "1",
                            "--save_total_limit", "1", "--checkpoint_path", str(saved)))
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "model-checkpoints").iterdir()) == ["step_6"]    # step_5 rotated out
    resumed = read_jsonl_metrics(tmp_path / "logs" / "metrics.jsonl")
    resumed_loss = _series(resumed, "loss/train")
    assert sorted(resumed_loss) == [5, 6]
    reference = _series(uninterrupted, "loss/train")
    for step in (5, 6):
        assert resumed_loss[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7)
    assert _series(resumed, "lr")[5] == pytest.approx(_series(uninterrupted, "lr")[5], rel=1e-9)


def test_a_killed_trainer_rank_resumes_on_its_own_with_the_same_losses(first_run, tiny_model_dir, data, tmp_path,
                                                                        monkeypatch, capsys):
    """Rank 1 is SIGKILLed as step 6 starts (step_4 is the newest checkpoint, step 5 is done and logged): rank 0 is
    left in the step's all-reduce with a dead peer. The job tears down, restarts once from step_4 by itself and
    finishes; every step's loss (step 5 twice) equals the uninterrupted run's (--max_restarts, tests/test_auto_resume.py)."""
    import os
    import signal

    import ray

    from rlhf_ray.pipelines.supervised_loop import SupervisedRun

    _, uninterrupted = first_run
    killed, train_step = [], SupervisedRun.train_step

    def kill_rank_1_at_step_6(self, order, batch_index):
        if batch_index == 5 and not killed:
            killed.append(ray.get(self.policy.actor(1).__ray_call__.remote(lambda actor: os.getpid())))
            os.kill(killed[0], signal.SIGKILL)
        return train_step(self, order, batch_index)

    monkeypatch.setattr(SupervisedRun, "train_step", kill_rank_1_at_step_6)
    status = sft.main(_argv(tiny_model_dir, data, tmp_path, "--eval_at_start", "--eval_interval", "6",
                            "--save_interval", "4", "--max_restarts", "1", "--collective_timeout_s", "60"))
    assert status == 0 and killed
    step_4 = tmp_path / "model-checkpoints" / "step_4"
    logged = capsys.readouterr().out
    assert f"lost sft rank 1; restart 1/1 from checkpoint {step_4}" in logged
    assert f"resumed from {step_4}: step 4, epoch 0, batch 4" in logged
    losses = [(row["step"], row["loss/train"]) for row in read_jsonl_metrics(tmp_path / "logs" / "metrics.jsonl")
              if "loss/train" in row]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5] + list(range(5, STEPS + 1))
    reference = _series(uninterrupted, "loss/train")
    for step, loss in losses:
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert (tmp_path / "model" / "config.json").is_file()


def test_bad_input_exits_with_one_clear_message(tiny_model_dir, data, tmp_path, capsys):
    train_dir, _ = data
    base = ["--pretrain", str(tiny_model_dir), "--save_path", str(tmp_path / "m")]
    assert sft.main(base + ["--dataset", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sft.main(base + ["--dataset", str(train_dir), "--batch_size", "500"]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
    assert sft.main(["--pretrain", str(tmp_path), "--dataset", str(train_dir)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert sft.main(base + ["--dataset", str(train_dir), "--checkpoint_path", str(tmp_path)]) == 2
    assert "neither a complete checkpoint" in capsys.readouterr().err
    assert sft.main(base + ["--dataset", str(train_dir), "--num_workers", "3", "--tp", "2"]) == 2
    assert "multiple of tp" in capsys.readouterr().err
