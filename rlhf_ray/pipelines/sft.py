"""`rlhf-ray sft`: supervised fine-tuning of a causal LM on prepared sft data (token-mean cross-entropy on the
assistant tokens).

    rlhf-ray prepare --type sft --input data/sft.jsonl --tokenizer_dir MODEL \
        --conversation_template_config rlhf_ray/assets/templates/tiny.json --output runs/data/sft
    rlhf-ray sft --pretrain MODEL --dataset runs/data/sft --eval_dataset runs/data/sft-eval \
        --plugin ddp --num_workers 2 --batch_size 8 --max_epochs 1 --lr 2e-5 --save_path runs/sft

The step loop, checkpoints and metrics are shared with rm and dpo (pipelines/supervised.py); docs/sft.md lists
every flag and metric.
"""

from __future__ import annotations

from rlhf_ray.config.base import run_cli
from rlhf_ray.config.sections import CheckpointSection
from rlhf_ray.pipelines.supervised import SupervisedConfig, SupervisedJob, run_supervised


class SFTConfig(SupervisedConfig):
    checkpoint: CheckpointSection = CheckpointSection(save_path="output/sft")


def build_job(cfg: SFTConfig) -> SupervisedJob:
    return SupervisedJob(name="sft", data_kind="sft", model_kind="causal_lm",
                         objective={"kind": "sft", "max_len": cfg.data.max_len})


def run(cfg: SFTConfig) -> int:
    return run_supervised(cfg, build_job(cfg))


def main(argv: list[str] | None = None) -> int:
    return run_cli(SFTConfig, run, argv, prog="rlhf-ray sft", description=__doc__.split("\n\n")[0])
