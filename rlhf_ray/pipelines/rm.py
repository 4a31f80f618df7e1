"""`rlhf-ray rm`: train a reward model (a causal-LM backbone with a scalar value head) on prepared preference pairs.

    rlhf-ray prepare --type preference --input data/preference.jsonl --tokenizer_dir MODEL \
        --conversation_template_config rlhf_ray/assets/templates/tiny.json --output runs/data/pref
    rlhf-ray rm --pretrain runs/sft --dataset runs/data/pref --eval_dataset runs/data/pref-eval \
        --loss_fn log_sig --batch_size 8 --lr 5e-6 --save_path runs/rm

The reward of a sequence is the value head's output at its last real token; the head starts N(0, 1/(d_model+1))
(ColossalChat's init). The output loads with transformers' AutoModelForSequenceClassification. docs/rm.md lists
every flag and metric.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_ray.config.base import Section, run_cli
from rlhf_ray.config.sections import CheckpointSection
from rlhf_ray.pipelines.supervised import SupervisedConfig, SupervisedJob, run_supervised


class RewardSection(Section):
    """The pairwise loss of the reward model."""

    loss_fn: Literal["log_sig", "log_exp"] = Field(
        "log_sig", description="log_sig: -log sigmoid(r_chosen - r_rejected); log_exp: log(1 + exp(r_rejected - "
                               "r_chosen)) (the seed's two names; equal in exact arithmetic)")


class RMConfig(SupervisedConfig):
    rm: RewardSection = RewardSection()
    checkpoint: CheckpointSection = CheckpointSection(save_path="output/rm")


def build_job(cfg: RMConfig) -> SupervisedJob:
    return SupervisedJob(name="rm", data_kind="preference", model_kind="value",
                         objective={"kind": "rm", "max_len": cfg.data.max_len, "loss_fn": cfg.rm.loss_fn},
                         headline=("loss/train", "rm/acc"))


def run(cfg: RMConfig) -> int:
    return run_supervised(cfg, build_job(cfg))


def main(argv: list[str] | None = None) -> int:
    return run_cli(RMConfig, run, argv, prog="rlhf-ray rm", description=__doc__.split("\n\n")[0])
