"""The supervised jobs as a user types them: `python -m rlhf_ray.cli sft ...` in a subprocess that joins an existing
cluster through RAY_ADDRESS (as inside `ray job submit`) with 2 ranks, and the seed's (ColossalChat) flag names on
all three jobs."""

import os
import subprocess
import sys

import pytest

from rlhf_ray.config.base import parse_config
from rlhf_ray.pipelines import dpo, rm, sft

SEED_FLAGS = {
    "--pretrain": "m", "--tokenizer_dir": "t", "--dataset": "d", "--eval_dataset": "e", "--plugin": "fsdp",
    "--tp": "1", "--batch_size": "2", "--max_epochs": "3", "--accumulation_steps": "4", "--lr": "1e-5",
    "--max_len": "256", "--lora_rank": "8", "--grad_checkpoint": None, "--use_flash_attn": None,
    "--mixed_precision": "bf16", "--save_interval": "10", "--save_path": "out", "--config_file": "c.yaml",
    "--use_wandb": None, "--log_dir": "logs", "--grad_clip": "0.5", "--weight_decay": "0.01", "--warmup_steps": "5",
    "--checkpoint_path": "ckpt", "--merge_lora_weights": "false",
}


@pytest.mark.parametrize("job", [sft.SFTConfig, rm.RMConfig, dpo.DPOConfig], ids=["sft", "rm", "dpo"])
def test_every_seed_flag_is_accepted(job):
    argv = []
    for flag, value in SEED_FLAGS.items():
        argv += [flag] if value is None else [flag, value]
    cfg = parse_config(job, argv, "rlhf-ray")
    assert cfg.model.pretrain == "m" and cfg.model.tokenizer_dir == "t" and cfg.data.dataset == ["d"]
    assert cfg.parallel.plugin == "fsdp" and cfg.train.accumulation_steps == 4 and cfg.data.max_len == 256
    assert cfg.model.grad_checkpoint and cfg.model.use_flash_attn and cfg.logging.use_wandb
    assert cfg.model.merge_lora_weights is False and cfg.train.warmup_steps == 5
    assert cfg.checkpoint.checkpoint_path == "ckpt" and cfg.checkpoint.config_file == "c.yaml"


@pytest.mark.ray
def test_sft_cli_in_a_subprocess_with_two_ranks(ray_cluster, tiny_model_dir, tmp_path):
    from supervised_data import sft_data
    from transformers import AutoModelForCausalLM

    train_dir, eval_dir = sft_data(tmp_path / "data", n_train=64, n_eval=16)
    out = tmp_path / "sft-model"
    # Join the session's cluster the way a job inside `ray job submit` does (no RAY_ADDRESS: it would start its own).
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1",
           "RLHF_RAY_NO_PROGRESS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "rlhf_ray.cli", "sft", "--pretrain", str(tiny_model_dir),
               "--dataset", str(train_dir), "--eval_dataset", str(eval_dir), "--num_workers", "2",
               "--cpus_per_worker", "0.5", "--batch_size", "4", "--max_steps", "3", "--lr", "1e-3",
               "--save_path", str(out), "--config_file", str(tmp_path / "resolved.json")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "global batch = batch_size 4 × dp 2 × accumulation_steps 1 = 8 rows" in done.stdout
    assert "resource plan:" in done.stdout and "eval_loss=" in done.stdout   # the console line names it eval_loss
    assert "Connecting to existing Ray cluster" in done.stdout + done.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert (tmp_path / "resolved.json").is_file()
