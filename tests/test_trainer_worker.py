"""TrainerWorker on the session's real local Ray cluster: exact sharded steps, scoring, weight streaming, HF export."""

import pytest
import torch

from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.utils import split_evenly
from rlhf_ray.workers.group import WorkerGroup
from rlhf_ray.workers.trainer import TrainerWorker, merge_step_results

pytestmark = pytest.mark.ray
STEPS = 3
GLOBAL_BATCH = 12


@pytest.fixture(scope="module")
def uneven_rows(tmp_path_factory):
    """Prepared sft rows where the label-token counts differ a lot between rows (and so between ranks)."""
    from supervised_data import sft_data

    from rlhf_ray.data.loading import load_prepared

    train_dir, _ = sft_data(tmp_path_factory.mktemp("trainer-data"))
    rows = load_prepared(train_dir, "sft").to_list()[:GLOBAL_BATCH * STEPS]
    for i, row in enumerate(rows):
        if i % 4 in (0, 1):  # first half of every rank's shard: also learn the prompt tokens
            row["labels"] = list(row["input_ids"])
    return rows


def _group(model_dir, num_workers: int, batch_size: int, accumulation_steps: int, name: str) -> WorkerGroup:
    kwargs = {"model": ModelSection(pretrain=str(model_dir)).model_dump(),
              "train": TrainSection(batch_size=batch_size, accumulation_steps=accumulation_steps, lr=1e-3,
                                    seed=7).model_dump(),
              "parallel": ParallelSection(num_workers=num_workers, cpus_per_worker=0.5).model_dump(),
              "objective": {"kind": "sft", "max_len": 64}}
    group = WorkerGroup(TrainerWorker, GroupSpec(num_workers=num_workers, cpus_per_worker=0.5), name=name,
                        worker_kwargs=kwargs)
    group.call_all("build", STEPS)
    return group


@pytest.fixture(scope="module")
def one_and_two_ranks(ray_cluster, tiny_model_dir):
    single = _group(tiny_model_dir, 1, batch_size=GLOBAL_BATCH, accumulation_steps=1, name="single")
    double = _group(tiny_model_dir, 2, batch_size=3, accumulation_steps=2, name="double")
    yield single, double
    single.shutdown()
    double.shutdown()


def test_two_ranks_with_accumulation_take_the_same_steps_as_one(one_and_two_ranks, uneven_rows):
    """dp 2 × accumulation 2 × batch 3 vs one rank × batch 12 on the same 12 rows per step: the same token-mean
    loss and the same weights, although the ranks hold different numbers of label tokens (tolerance: float32
    summation order, 1e-5 relative)."""
    single, double = one_and_two_ranks
    for step in range(STEPS):
        rows = uneven_rows[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        one = merge_step_results(single.call_split("train_step", [rows]))
        per_rank = double.call_split("train_step", split_evenly(rows, 2))
        two = merge_step_results(per_rank)
        assert two["units"] == one["units"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        # The test can fail: averaging per-rank token means (what a naive trainer reports) is a different number.
        naive = sum(r["sums"]["loss_sum"] / r["units"] for r in per_rank) / 2
        assert abs(naive - one["loss"]) > 1e-3
    checksums = single.call_all("weight_checksum") + double.call_all("weight_checksum")
    assert checksums[1] == checksums[2]                    # DDP ranks hold identical weights
    assert checksums[1] == pytest.approx(checksums[0], rel=1e-6)


def test_weights_export_and_reference_logprobs_agree_with_transformers(one_and_two_ranks, uneven_rows, tmp_path):
    """The trained ranks stream the weights they export; a frozen RLWorker on the export (PPO's reference role)
    scores the log-probs transformers computes."""
    import ray
    from transformers import AutoModelForCausalLM

    from rlhf_ray.data.collators import SFTCollator
    from rlhf_ray.workers.rl_actor import RLWorker

    _, double = one_and_two_ranks
    streamed = {}
    for ref in double.workers[0].iter_weights.remote():    # a Ray streaming generator: one tensor at a time
        name, tensor = ray.get(ref)
        streamed[name] = tensor

    out = tmp_path / "hf"
    double.call_all("save_hf", str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert set(streamed) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(streamed[name], tensor)

    batch = SFTCollator(pad_token_id=0)(uneven_rows[:4])
    length = batch["input_ids"].shape[1]
    reference = WorkerGroup(RLWorker, GroupSpec(num_workers=1, cpus_per_worker=0.5), name="reference",
                            worker_kwargs={"model": ModelSection(pretrain=str(out)).model_dump(),
                                           "train": TrainSection().model_dump(),
                                           "parallel": ParallelSection(cpus_per_worker=0.5).model_dump(),
                                           "frozen": True, "forward_batch_size": 3})   # 2 chunks: 3 rows + 1
    try:
        reference.call_all("build")
        logprobs = reference.call_rank(0, "compute_response_logprobs",
                                       {"sequences": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                        "response_len": length - 1})
    finally:
        reference.shutdown()
    assert logprobs.shape == (4, length - 1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["attention_mask"][:, 1:].bool()
    torch.testing.assert_close(logprobs[mask], expected[mask], rtol=1e-4, atol=1e-4)


def test_merge_counts_each_tensor_parallel_group_once():
    results = [{"sums": {"loss_sum": 6.0, "rm/acc": 2.0}, "units": 3.0, "tokens": 30, "time_s": 1.0, "lr": 0.1,
                "grad_norm": 2.0},
               {"sums": {"loss_sum": 6.0, "rm/acc": 2.0}, "units": 3.0, "tokens": 30, "time_s": 2.0, "lr": 0.1,
                "grad_norm": 2.0},
               {"sums": {"loss_sum": 2.0, "rm/acc": 1.0}, "units": 1.0, "tokens": 10, "time_s": 1.5, "lr": 0.1,
                "grad_norm": 2.0},
               {"sums": {"loss_sum": 2.0, "rm/acc": 1.0}, "units": 1.0, "tokens": 10, "time_s": 1.5, "lr": 0.1,
                "grad_norm": 2.0}]
    merged = merge_step_results(results, tp_size=2)
    assert merged["loss"] == 2.0 and merged["rm/acc"] == 0.75 and merged["units"] == 4.0
    assert merged["tokens"] == 40 and merged["time_s"] == 2.0 and merged["lr"] == 0.1
