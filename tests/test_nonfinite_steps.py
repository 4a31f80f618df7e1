"""A non-finite loss on any rank: every rank skips the optimizer step (weights untouched) and counts it, and
TrainSection.max_consecutive_bad_steps skipped steps in a row stop the run with a message naming the step."""

import pytest
import ray

from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.utils import split_evenly
from rlhf_ray.workers.group import WorkerGroup
from rlhf_ray.workers.trainer import TrainerWorker

pytestmark = pytest.mark.ray
GLOBAL_BATCH = 4


class PoisonableTrainer(TrainerWorker):
    """A trainer rank whose loss can be made NaN for one step (what a bad batch or a diverging run produces)."""

    def train_step_poisoned(self, rows: list[dict], poison: bool) -> dict:
        if not poison:
            return self.train_step(rows)
        clean = self.objective.loss

        def nan_loss(model, batch, scale):
            loss, sums = clean(model, batch, scale)
            return loss * float("nan"), sums

        self.objective.loss = nan_loss
        try:
            return self.train_step(rows)
        finally:
            del self.objective.loss


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from supervised_data import sft_data

    from rlhf_ray.data.loading import load_prepared

    train_dir, _ = sft_data(tmp_path_factory.mktemp("nan-data"))
    return load_prepared(train_dir, "sft").to_list()[:GLOBAL_BATCH]


def test_nan_steps_are_skipped_on_every_rank_counted_and_stop_the_run(ray_cluster, tiny_model_dir, rows):
    kwargs = {"model": ModelSection(pretrain=str(tiny_model_dir)).model_dump(),
              "train": TrainSection(batch_size=2, lr=1e-3, max_consecutive_bad_steps=3).model_dump(),
              "parallel": ParallelSection(num_workers=2, cpus_per_worker=0.5).model_dump(),
              "objective": {"kind": "sft", "max_len": 64}}
    group = WorkerGroup(PoisonableTrainer, GroupSpec(num_workers=2, cpus_per_worker=0.5), name="poisonable",
                        worker_kwargs=kwargs)
    try:
        group.call_all("build", 10)
        shards = split_evenly(rows, 2)

        def step(*poison: bool) -> list[dict]:
            return group.call_split("train_step_poisoned", shards, list(poison))

        assert [r["skipped"] for r in step(False, False)] == [0.0, 0.0]
        before = group.call_all("weight_checksum")
        results = step(False, True)                               # NaN on rank 1 only
        assert [(r["skipped"], r["skipped_steps"]) for r in results] == [(1.0, 1.0), (1.0, 1.0)]
        assert group.call_all("weight_checksum") == before         # the bad step changed no weight on any rank
        results = step(False, False)
        assert [(r["skipped"], r["skipped_steps"]) for r in results] == [(0.0, 1.0), (0.0, 1.0)]
        assert group.call_all("weight_checksum") != before
        step(True, True)                                          # NaN on both ranks
        step(True, False)                                         # two bad steps in a row: still running
        refs = group.call_split_async("train_step_poisoned", shards, [False, True])
        for ref in refs:                                          # the third stops every rank alike
            with pytest.raises(Exception, match=r"optimizer step 6: 3 steps in a row were skipped because the loss "
                                                r"or gradient norm was not finite .* --max_consecutive_bad_steps"):
                ray.get(ref)
    finally:
        group.shutdown()


def test_supervised_jobs_log_the_skipped_steps():
    from rlhf_ray.pipelines.supervised_loop import train_metrics

    merged = {"loss": 1.0, "tokens": 8.0, "time_s": 1.0, "grad_norm": float("nan"), "lr": 1e-3, "skipped": 1.0,
              "skipped_steps": 2.0}
    metrics = train_metrics(merged, wall_s=1.0)
    assert metrics["train/skipped_steps"] == 2.0 and metrics["train/skipped_step"] == 1.0
    assert "train/skipped_steps" not in train_metrics({**merged, "skipped": 0.0, "skipped_steps": 0.0}, 1.0)


def test_the_stop_reaches_the_driver_as_its_own_message(ray_cluster):
    """The jobs catch NonFiniteStepsError around training and print its message alone (no Ray traceback): Ray
    re-raises a rank's exception on the driver as an instance of its class, with the original as `cause`."""
    import ray

    from rlhf_ray.workers.trainer import NonFiniteStepsError

    @ray.remote(num_cpus=0)
    def bad_rank():
        raise NonFiniteStepsError("3 optimizer steps in a row were non-finite (step 7)")

    with pytest.raises(NonFiniteStepsError) as caught:
        ray.get(bad_rank.remote())
    assert NonFiniteStepsError.message(caught.value) == "3 optimizer steps in a row were non-finite (step 7)"
