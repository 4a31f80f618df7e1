"""A checkpoint write that really fails (its directory path is taken by a file) never costs the trained model: the
job still writes its HF export, leaves no half-written checkpoint, and exits 1 with one line naming the checkpoint,
the cause and where the model went."""

import pytest

from rlhf_ray.checkpoint.hf_export import CheckpointWriteError, export_despite

pytestmark = pytest.mark.ray


def test_sft_exports_the_model_when_its_final_checkpoint_cannot_be_written(ray_cluster, tiny_model_dir, tmp_path,
                                                                           capsys):
    from supervised_data import sft_data
    from transformers import AutoModelForCausalLM

    from rlhf_ray.pipelines import sft

    train_dir, _ = sft_data(tmp_path / "data", n_train=32, n_eval=8)
    blocked = tmp_path / "checkpoints"
    blocked.write_text("a file where the checkpoint directory should be\n")
    out = tmp_path / "model"
    status = sft.main(["--pretrain", str(tiny_model_dir), "--dataset", str(train_dir), "--batch_size", "8",
                       "--num_workers", "1", "--cpus_per_worker", "0.5", "--max_steps", "2", "--lr", "1e-3",
                       "--save_path", str(out), "--save_dir", str(blocked), "--log_dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1, err
    assert f"writing the checkpoint {blocked / 'step_2'} failed" in err[0] and "Error" in err[0]
    assert f"exported to {out}" in err[0]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "data", "logs", "model"]  # no half-written


def test_the_message_says_when_the_export_failed_too(tmp_path):
    failure = CheckpointWriteError(tmp_path / "step_3", 3, OSError(28, "No space left on device"))

    def export():
        raise OSError(28, "No space left on device")

    message = export_despite(failure, export)
    assert message.startswith(f"writing the checkpoint {tmp_path / 'step_3'} failed (OSError: [Errno 28] No space")
    assert "the HF export failed too (OSError" in message and "\n" not in message
