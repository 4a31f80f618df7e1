"""`rlhf-ray dpo`: the chosen-over-rejected margin rises on held-back pairs; a reference group on 2 ranks takes
exactly the steps of a colocated reference on 1; loss variants and their settings resolve as documented."""

import pytest

from rlhf_ray.config.base import ConfigError, parse_config
from rlhf_ray.pipelines import dpo
from rlhf_ray.telemetry.tracker import read_jsonl_metrics

STEPS = 24      # 512 pairs / 32 per step: 16 steps per epoch


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from supervised_data import verifiable_pairs

    return verifiable_pairs(tmp_path_factory.mktemp("dpo-data"), n_train=512, n_eval=128)


def _run(model_dir, pairs, out, *extra):
    train_dir, eval_dir = pairs
    status = dpo.main(["--pretrain", str(model_dir), "--dataset", str(train_dir), "--eval_dataset", str(eval_dir),
                       "--max_epochs", "2", "--max_steps", str(STEPS), "--lr", "2e-3", "--beta", "0.1", "--save_path", str(out / "model"),
                       "--log_dir", str(out / "logs"), *extra])
    assert status == 0
    rows = read_jsonl_metrics(out / "logs" / "metrics.jsonl")
    return {row["step"]: row for row in rows if "loss/eval" in row}, rows


@pytest.fixture(scope="module")
def colocated(ray_cluster, tiny_model_dir, pairs, tmp_path_factory):
    return _run(tiny_model_dir, pairs, tmp_path_factory.mktemp("dpo-colocated"), "--eval_at_start",
                "--batch_size", "32", "--reference_placement", "colocate")


@pytest.mark.ray
def test_dpo_raises_the_margin_on_held_back_pairs(colocated):
    evals, rows = colocated
    start, end = evals[0], evals[STEPS]
    # policy == reference before training: every implicit reward is exactly 0 and the loss is log 2
    assert start["eval/reward_margin"] == 0.0 and start["loss/eval"] == pytest.approx(0.6931, abs=1e-4)
    assert end["eval/reward_margin"] > 0.3 and end["eval/acc"] > 0.7, end
    assert end["eval/reward_chosen"] > end["eval/reward_rejected"]
    keys = set().union(*rows)
    for key in ("loss/train", "dpo/reward_margin", "dpo/acc", "dpo/reward_chosen", "dpo/reward_rejected",
                "dpo/logps_chosen", "dpo/logps_rejected", "lr", "grad_norm", "perf/tokens_per_s"):
        assert key in keys, key


@pytest.mark.ray
def test_reference_group_on_two_ranks_matches_colocated_on_one(colocated, tiny_model_dir, pairs, tmp_path):
    """Same global batch (32 = 16 × dp 2), reference as its own actor group: the first steps' losses agree to float32
    summation order (1e-5), and after 24 steps, where those last-bit differences have compounded, the held-back
    metrics still agree to 1%."""
    evals, rows = _run(tiny_model_dir, pairs, tmp_path, "--batch_size", "16", "--num_workers", "2",
                       "--cpus_per_worker", "0.5", "--reference_placement", "group")
    reference_evals, reference_rows = colocated
    train = {row["step"]: row["loss/train"] for row in rows if "loss/train" in row}
    reference_train = {row["step"]: row["loss/train"] for row in reference_rows if "loss/train" in row}
    for step in (1, 2, 3):
        assert train[step] == pytest.approx(reference_train[step], rel=1e-5), step
    for key in ("loss/eval", "eval/reward_margin", "eval/acc"):
        assert evals[STEPS][key] == pytest.approx(reference_evals[STEPS][key], rel=1e-2), key


def test_loss_variants_resolve_their_settings():
    def cfg(*argv):
        return parse_config(dpo.DPOConfig, ["--dataset", "d", *argv], "rlhf-ray dpo")

    plain = dpo.build_job(cfg())
    assert plain.reference == "colocate" and plain.objective["beta"] == 0.1
    assert plain.objective["length_normalization"] is False
    simpo = cfg("--loss_type", "simPO", "--gamma", "0.5")          # the seed's spelling
    assert simpo.dpo.loss_type == "simpo" and simpo.dpo.beta == 2.0 and simpo.dpo.length_normalization
    job = dpo.build_job(simpo)
    assert job.reference is None and job.objective["use_reference"] is False
    ipo = dpo.build_job(cfg("--loss_type", "ipo", "--beta", "0.5", "--reference_placement", "group"))
    assert ipo.reference == "group" and ipo.objective["beta"] == 0.5 and ipo.objective["length_normalization"]
    free = dpo.build_job(cfg("--disable_reference_model"))
    assert free.reference is None and free.objective["use_reference"] is False
    with pytest.raises(ConfigError, match="loss_type"):
        cfg("--loss_type", "kto")
    with pytest.raises(ConfigError, match="beta"):
        cfg("--beta", "0")


def test_reference_free_objectives_need_no_reference_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ray.data.collators import PreferenceCollator
    from rlhf_ray.workers.objectives import PreferenceObjective

    rows = [{"chosen_input_ids": [5, 6, 7, 8], "chosen_loss_mask": [0, 0, 1, 1],
             "rejected_input_ids": [5, 6, 9], "rejected_loss_mask": [0, 0, 1]}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for kwargs in ({"loss_type": "simpo", "beta": 2.0, "gamma": 0.5, "length_normalization": True},
                   {"loss_type": "dpo", "use_reference": False}):
        objective = PreferenceObjective(0, **kwargs)
        batch = objective.collate(rows)
        loss, sums = objective.loss(model, batch, scale=1.0)
        assert torch.isfinite(loss) and sums["dpo/logps_chosen"] < 0
    with pytest.raises(RuntimeError, match="no reference log-probs"):
        objective = PreferenceObjective(0, loss_type="dpo")
        objective.loss(model, PreferenceCollator(0)(rows), scale=1.0)
