"""Automatic resume after a trainer rank dies: the restart loop (which checkpoint, how many times, the messages) and
the skip counters surviving a resume. The end-to-end drill (a rank SIGKILLed mid-run, losses equal to an
uninterrupted run's) is in test_sft.py, and for grpo in test_generator_in_policy.py (the policy rank that also
generates dies mid-generation); ppo/grpo run the same loop (pipelines/rl/run.py)."""

import os
import time

import pytest

from rlhf_ray.checkpoint.atomic import atomic_directory, step_directory
from rlhf_ray.pipelines.restart import RankLostError, newest_checkpoint_since, run_with_restarts


def _checkpoint(save_dir, step):
    with atomic_directory(step_directory(save_dir, step)) as tmp:
        (tmp / "state.json").write_text("{}")


def test_restart_loop_resumes_from_this_jobs_newest_checkpoint_and_gives_up_with_a_message(tmp_path, capsys):
    _checkpoint(tmp_path, 7)                                    # an earlier job's leftover: never resumed from
    old = time.time() - 3600
    os.utime(tmp_path / "step_7" / "COMPLETE", (old, old))
    seen = []

    def attempt(resume_from):
        seen.append(resume_from)
        if len(seen) == 2:
            _checkpoint(tmp_path, 9)                            # this job's own checkpoint, written before it dies
        raise RankLostError("lost policy rank 1")

    assert run_with_restarts(attempt, resume_from=None, save_dir=tmp_path, max_restarts=2, prog="rlhf-ray sft") == 1
    assert seen == [None, None, tmp_path / "step_9"]
    captured = capsys.readouterr()
    assert "[sft] lost policy rank 1; restart 1/2 from the start (no checkpoint yet)" in captured.out
    assert f"restart 2/2 from checkpoint {tmp_path / 'step_9'}" in captured.out
    assert captured.err.strip() == (f"rlhf-ray sft: lost policy rank 1; --max_restarts 2 restart(s) used up. Resume "
                                    f"by hand from checkpoint {tmp_path / 'step_9'} with --checkpoint_path "
                                    f"{tmp_path / 'step_9'}")
    assert newest_checkpoint_since(tmp_path / "none", 0.0) is None

    def job_error(resume_from):
        raise ValueError("the job's own bug")

    with pytest.raises(ValueError, match="own bug"):             # only a lost rank is retried
        run_with_restarts(job_error, resume_from=None, save_dir=tmp_path, max_restarts=3, prog="rlhf-ray sft")


def test_skip_counters_are_saved_with_the_checkpoint_and_restored(tiny_model_dir, tmp_path):
    from rlhf_ray.config.sections import ModelSection, ParallelSection, TrainSection
    from rlhf_ray.workers.trainer import TrainerWorker

    kwargs = {"model": ModelSection(pretrain=str(tiny_model_dir)).model_dump(),
              "train": TrainSection(batch_size=2).model_dump(), "parallel": ParallelSection().model_dump(),
              "objective": {"kind": "sft", "max_len": 64}}
    worker = TrainerWorker(0, 1, **kwargs)
    worker.build(4)
    worker.skipped_steps, worker.bad_steps_in_a_row = 5, 2
    worker.save_checkpoint(str(tmp_path / "step_3"), {"step": 3})
    resumed = TrainerWorker(0, 1, **kwargs)
    resumed.build(4)
    assert resumed.load_checkpoint(str(tmp_path / "step_3")) == {"step": 3}
    assert (resumed.skipped_steps, resumed.bad_steps_in_a_row) == (5, 2)
