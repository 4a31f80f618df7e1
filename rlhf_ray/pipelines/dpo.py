"""`rlhf-ray dpo`: direct preference optimisation of a causal LM on prepared preference pairs (DPO, IPO, SimPO).

    rlhf-ray dpo --pretrain runs/sft --dataset runs/data/pref --eval_dataset runs/data/pref-eval \
        --loss_type dpo --beta 0.1 --reference_placement colocate --batch_size 8 --lr 1e-6 --save_path runs/dpo

The frozen reference model (DPO, IPO) is either colocated (a second, frozen copy inside each trainer worker) or a
group of its own (`--reference_placement group`: frozen workers with the trainer's layout that score each shard and
hand the log-probs straight to the trainer rank that needs them). SimPO has no reference model. docs/dpo.md lists
every flag and metric.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf_ray.algorithms.preference import NEEDS_REFERENCE
from rlhf_ray.config.base import Section, run_cli
from rlhf_ray.config.sections import CheckpointSection
from rlhf_ray.pipelines.supervised import SupervisedConfig, SupervisedJob, run_supervised

# The seed's (ColossalChat train_dpo.py) loss names, accepted as written there.
SEED_LOSS_NAMES = {"dpo_loss": "dpo", "simPO": "simpo", "simpo_loss": "simpo", "ipo_loss": "ipo"}
# Per-loss defaults for settings left unset: (beta, length_normalization), from each paper.
LOSS_DEFAULTS = {"dpo": (0.1, False), "ipo": (0.1, True), "simpo": (2.0, True)}


class DPOSection(Section):
    """The preference loss and the reference model."""

    loss_type: Literal["dpo", "ipo", "simpo"] = Field(
        "dpo", description="dpo (Rafailov 2023), ipo (Azar 2023), simpo (Meng 2024, no reference); the seed's "
                           "dpo_loss / simPO are accepted")
    beta: float | None = Field(None, gt=0, description="reward scale beta (IPO: tau); default 0.1 for dpo/ipo, "
                                                       "2.0 for simpo")
    gamma: float = Field(0.0, ge=0, description="SimPO target margin gamma (0.5-1.5 in its paper); simpo only")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: probability a label is flipped")
    length_normalization: bool | None = Field(
        None, description="average the response log-probs over its tokens instead of summing; default false for "
                          "dpo, true for ipo and simpo")
    disable_reference_model: bool = Field(
        False, description="reference-free DPO/IPO: take log pi_ref = 0 (the seed's flag); simpo never has one")
    reference_placement: Literal["colocate", "group"] = Field(
        "colocate", description="colocate: a frozen copy inside each trainer worker; group: its own actors with the "
                                "trainer's layout (more CPUs/GPUs, less memory per trainer)")

    @model_validator(mode="before")
    @classmethod
    def _fill_loss_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        loss_type = SEED_LOSS_NAMES.get(data.get("loss_type"), data.get("loss_type", "dpo"))
        data["loss_type"] = loss_type
        if loss_type in LOSS_DEFAULTS:
            beta, length_normalization = LOSS_DEFAULTS[loss_type]
            if data.get("beta") is None:
                data["beta"] = beta
            if data.get("length_normalization") is None:
                data["length_normalization"] = length_normalization
        return data

    def uses_reference(self) -> bool:
        return NEEDS_REFERENCE[self.loss_type] and not self.disable_reference_model


class DPOConfig(SupervisedConfig):
    dpo: DPOSection = DPOSection()
    checkpoint: CheckpointSection = CheckpointSection(save_path="output/dpo")


def build_job(cfg: DPOConfig) -> SupervisedJob:
    section = cfg.dpo
    reference = section.reference_placement if section.uses_reference() else None
    objective = {"kind": "dpo", "max_len": cfg.data.max_len, "loss_type": section.loss_type, "beta": section.beta,
                 "gamma": section.gamma, "label_smoothing": section.label_smoothing,
                 "length_normalization": section.length_normalization, "use_reference": section.uses_reference()}
    why = ("none (simpo)" if section.loss_type == "simpo" else
           "none (--disable_reference_model: log pi_ref = 0)" if section.disable_reference_model else reference)
    return SupervisedJob(name="dpo", data_kind="preference", model_kind="causal_lm", objective=objective,
                         reference=reference, headline=("loss/train", "dpo/reward_margin", "dpo/acc"),
                         derived={"loss": f"{section.loss_type} beta={section.beta:g} gamma={section.gamma:g} "
                                          f"label_smoothing={section.label_smoothing:g} "
                                          f"length_normalization={section.length_normalization}",
                                  "reference model": why})


def run(cfg: DPOConfig) -> int:
    return run_supervised(cfg, build_job(cfg))


def main(argv: list[str] | None = None) -> int:
    return run_cli(DPOConfig, run, argv, prog="rlhf-ray dpo", description=__doc__.split("\n\n")[0])
