"""The RL controller: one episode reads like the algorithm. PPO and GRPO (RLOO, REINFORCE++) share it; they differ
only in the estimator, the KL placement and whether a critic exists.

    episode e (the policy is at version e: the number of weight syncs so far)
      1. collect, num_collect_steps times:
         1a generate     dp × experience_batch_size prompts -> generator group (vLLM) -> n samples per prompt,
                         token ids + sampler log-probs, stamped with the engines' policy version
         1b experience   padded into an Experience (prompt left-padded | response right-padded)
         1c score        in parallel: reward (one call, whatever the source: model group / rule / remote),
                         reference log-probs, critic values, policy old log-probs (rows split over each group's dp;
                         none when the update takes them from its own forward pass: config old_logprobs_from_update)
         1d advantages   KL (k1/k2/k3...; in the reward or left to the loss; fixed/adaptive coefficient), token
                         rewards, advantages and returns (GAE, GRPO, RLOO, REINFORCE++)
         1e buffer       split per policy dp rank into the replay buffer (each chunk ray.put once, refs kept)
      2. update          the buffer hands out one episode of refs per dp rank; policy (and critic) ranks fetch
                         them and run num_update_steps optimizer steps (clipped PPO loss, dual clip, value clip,
                         entropy, KL loss, ptx)
      3. weight sync     policy -> generators, version e + 1
      4. log             reward, KL, returns, advantages, losses, clip fractions, lengths, buffer/..., staleness,
                         timing/<phase>; startup/<part>_s with the first episode (and a log line at the first
                         generation), memory/peak_rss_mib/<role> with the last (and a log line)
    async mode: stage 1 of episode e + 1 runs in a background thread (async_mode.py) during stages 2-3 of e.
    --simulated_trainer_step_s S: the policy group is a stand-in (workers/simulated_trainer.py) whose update takes
    S s per optimizer step; 1c takes the reference log-probs from the sampler; no checkpoint, no export.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
import torch

from rlhf_ray.algorithms.normalization import RunningMoments
from rlhf_ray.buffer.replay_buffer import ReplayBuffer
from rlhf_ray.checkpoint.atomic import atomic_directory, rotate_checkpoints
from rlhf_ray.checkpoint.hf_export import CheckpointWriteError
from rlhf_ray.checkpoint.layout import CONFIG_BESIDE_CHECKPOINT, checkpoint_dir
from rlhf_ray.config.base import ConfigError
from rlhf_ray.pipelines.rl.async_mode import AsyncCollector
from rlhf_ray.pipelines.rl.chunk_reference import ChunkReference
from rlhf_ray.pipelines.rl.chunk_rewards import ChunkRewards
from rlhf_ray.pipelines.rl.config import BufferPlan, old_logprobs_from_update
from rlhf_ray.pipelines.rl.experience import (AdvantageSettings, EpisodeKLController, build_experience,
                                              fill_informative_groups, finalize_experience, reward_model_inputs,
                                              scoring_batch)
from rlhf_ray.pipelines.rl.metrics import merge_update_results
from rlhf_ray.pipelines.restart import rank_lost
from rlhf_ray.rewards.base import RewardBatch
from rlhf_ray.telemetry.progress import progress
from rlhf_ray.telemetry.timers import Timers
from rlhf_ray.workers.group import get_failing_fast

RL_STATE_FILE = "rl_state.json"


def first_samples(texts: RewardBatch, rewards: list[float], lengths: list[int], prompts: int = 3,
                  per_prompt: int = 4) -> list[dict]:
    """The first `per_prompt` samples of the first `prompts` prompts (rows are prompt-major), as logged records."""
    records, seen = [], []
    for prompt, response, reward, length in zip(texts.prompts, texts.responses, rewards, lengths):
        if not seen or seen[-1][0] != prompt:
            seen.append([prompt, 0])
        if len(seen) > prompts:
            break
        if seen[-1][1] < per_prompt:
            seen[-1][1] += 1
            records.append({"prompt": prompt, "response": response, "reward": float(reward), "length": int(length)})
    return records


class RLController:
    """Runs the episodes over started role groups (groups.py); built by run_rl once every check has passed.

    Owns the replay buffer (refs per policy dp rank, room for max_staleness + 1 episodes in async mode), the KL
    controller and the policy version. `resume` restores a checkpoint; `run` does the episodes; `export` writes
    the HF policy (and critic).
    """

    def __init__(self, cfg, job: str, groups, data, tokenizer, reward_source, tracker, template_ids) -> None:
        self.cfg, self.job, self.groups, self.data = cfg, job, groups, data
        self.template_ids = template_ids
        self.tokenizer, self.reward_source, self.tracker = tokenizer, reward_source, tracker
        self.plan = BufferPlan.from_config(cfg)
        self.settings = AdvantageSettings.from_algorithm(cfg.algorithm, cfg.generator.max_new_tokens)
        self.kl = EpisodeKLController(cfg.algorithm)     # collection may run ahead of training (async)
        self.temperature = cfg.generator.temperature
        self.buffer = ReplayBuffer(self.plan.dp, self.plan.samples_per_rank,
                                   max_staleness=cfg.rl.max_staleness if cfg.rl.async_mode else 0,
                                   name=f"{job}-experience")
        # the policy scores old log-probs while collecting only in sync mode, and only when the update cannot take
        # them from its own forward pass (async mode: the update recomputes them first)
        self.simulated = cfg.rl.simulated_trainer_step_s is not None    # a stand-in policy (--simulated_trainer_step_s)
        self.old_logprobs_pass = (cfg.rl.old_logprobs_source == "policy" and not cfg.rl.async_mode
                                  and not old_logprobs_from_update(cfg)[0] and not self.simulated)
        self.reward_norm = RunningMoments() if cfg.algorithm.reward_normalization else None
        self._reward_norm_after: dict[int, dict] = {}  # its state after collecting episode e (checkpointed with e)
        self.version = 0                   # policy version = weight syncs so far; episode e trains at version e
        self.start_episode = 0
        self.startup_metrics: dict[str, float] = {}   # timing/startup etc., logged with the first episode
        self.startup: dict[str, float] = {}           # run.py: job_start and startup/<part>_s, until reported
        self.last_samples: list[dict] = []            # a few scored responses of the latest collect step

    # ------------------------------------------------------------ 1. collect
    def collect_episode(self, episode: int) -> dict[str, float]:
        timers, sums = Timers(), {}
        steps = self.cfg.rl.num_collect_steps
        for step in range(steps):
            index = episode * steps + step                  # the run's collect-step number: data and seeds
            round_metrics: list[dict] = []

            def make_batch(refill: int):
                prompts = self.plan.prompts_per_collect
                rows = self.data.prompt_rows(index, prompts, refill)
                self._report_startup()
                # a text reward scores each chunk as it arrives, while the rest generates
                chunk_rewards = (None if self.reward_source.reads_tokens else
                                 ChunkRewards(self.reward_source, lambda done: self._texts(done, rows)))
                # and the reference scores each chunk too, where it is idle during generation
                chunk_reference = None if filtering else self._chunk_reference()
                scorers = [scorer for scorer in (chunk_rewards, chunk_reference) if scorer is not None]

                def on_chunk(done) -> None:
                    for scorer in scorers:
                        scorer.submit(done)

                with timers("generate"):                                                # 1a
                    rollouts = self.groups.generators.generate(
                        [row["input_ids"] for row in rows], seed_offset=index + refill * 1_000_003,
                        on_chunk=on_chunk if scorers else None)
                with timers("make_experience"):                                         # 1b
                    batch = build_experience(rollouts.rollouts, self.tokenizer.pad_token_id, refill * prompts)
                with timers("score"):                                                   # 1c
                    round_metrics.append({**rollouts.metrics(),
                                          **self.score(batch, rollouts.rollouts, rows, chunk_rewards,
                                                       model_passes=not filtering,
                                                       chunk_reference=chunk_reference)})
                return batch

            filtering = self.cfg.algorithm.filter_groups        # DAPO dynamic sampling: only groups with a signal
            if filtering:
                experience, sampling_metrics = fill_informative_groups(
                    make_batch, self.plan.prompts_per_collect, self.cfg.algorithm.max_num_gen_batches,
                    self.tokenizer.pad_token_id)
                with timers("score"):                   # the model passes on the kept groups only
                    sampling_metrics.update(self.score_models(experience))
            else:
                experience, sampling_metrics = make_batch(0), {}
            metrics = {key: sum(m.get(key, 0.0) for m in round_metrics) / len(round_metrics)
                       for key in round_metrics[0]}
            metrics.update(sampling_metrics)
            if self.reward_norm is not None:
                experience.scores = self.reward_norm.update_and_normalize(experience.scores)
            with timers("advantage"):                                                   # 1d
                experience, advantage_metrics = finalize_experience(experience, self.settings,
                                                                    self.kl.collecting.value)
                if "reward/kl_sum" in advantage_metrics and self.settings.kl_mode == "reward":
                    self.kl.collecting.update(advantage_metrics["reward/kl_sum"], experience.batch_size)
            with timers("buffer_put"):                                                  # 1e
                self.buffer.put(experience)
            for key, value in {**metrics, **advantage_metrics}.items():
                sums[key] = sums.get(key, 0.0) + value / steps
        self.kl.finish(episode)
        if self.reward_norm is not None:
            self._reward_norm_after[episode] = self.reward_norm.state_dict()
        return {**sums, **timers.metrics()}

    def _report_startup(self) -> None:
        """Once, just before the first generation: the start-up time from the job's start, and its parts."""
        if "job_start" not in self.startup:
            return
        parts = dict(self.startup)
        total = time.perf_counter() - parts.pop("job_start")
        self.startup = {}
        self.startup_metrics.update({**parts, "startup/to_first_generation_s": total})
        seconds = {key.split("/")[1][:-2]: value for key, value in parts.items()}
        overlap = "in parallel" if self.groups.engines_built_beside_trainers else "one after the other"
        parts_of_groups = (f"trainer models {seconds.get('trainers', 0):.1f} s, the policy's ranks generating too"
                           if self.groups.generator_in_policy else
                           f"generator engines {seconds.get('generators', 0):.1f} s and trainer models "
                           f"{seconds.get('trainers', 0):.1f} s, {overlap}")
        print(f"[{self.job}] start-up {total:.1f} s to the first generation: Ray connect "
              f"{seconds.get('ray_connect', 0):.1f} s, role groups {seconds.get('groups', 0):.1f} s "
              f"({parts_of_groups}), the rest (config, data, tokenizer, plan, reward source) "
              f"{total - seconds.get('ray_connect', 0) - seconds.get('groups', 0):.1f} s", flush=True)

    def _report_peak_memory(self) -> dict[str, float]:
        """The peak resident memory per process of each role, as metrics and one log line."""
        peaks = self.groups.peak_rss_mib()
        print(f"[{self.job}] peak RSS per process (MiB): "
              + ", ".join(f"{role} {mib:.0f}" for role, mib in peaks.items()), flush=True)
        return {f"memory/peak_rss_mib/{role}": mib for role, mib in peaks.items()}

    def score(self, experience, rollouts, rows: list[dict], chunk_rewards: ChunkRewards | None = None,
              model_passes: bool = True, chunk_reference: ChunkReference | None = None) -> dict[str, float]:
        """Stage 1c: every scorer starts before any result is awaited. Sets scores and (with `model_passes`)
        ref_logprobs, values, old_logprobs on `experience`; returns the reward metrics. `chunk_rewards`,
        `chunk_reference`: the text rewards and reference passes already started chunk by chunk during generation
        (else the whole batch is scored here)."""
        pending = self._start_model_passes(experience, reference=chunk_reference is None) if model_passes else {}
        if chunk_rewards is None:
            texts = self._reward_batch(experience, rollouts, rows)
            result = self.reward_source.score_async(texts).result()
        else:                                   # scored during generation: the texts come with the results
            result = chunk_rewards.result(rollouts)
            texts = chunk_rewards.texts
        experience.scores = torch.tensor(result.rewards, dtype=torch.float32)
        self.last_samples = first_samples(texts, result.rewards, experience.response_mask.sum(-1).tolist())
        metrics = dict(result.metrics)
        if model_passes:
            if chunk_reference is not None:
                experience.ref_logprobs = chunk_reference.result(rollouts, experience.response_len)
            metrics.update(self._finish_model_passes(experience, pending))
        return metrics

    def score_models(self, experience) -> dict[str, float]:
        """The reference, critic and old-log-prob passes alone (dynamic sampling runs them on the kept groups
        only, once the rewards have chosen them)."""
        return self._finish_model_passes(experience, self._start_model_passes(experience))

    def _start_reference(self, batch: dict) -> list:
        """The reference pass over a scoring batch: its pending results, or [] when the job has no reference."""
        if self.groups.reference is not None:
            return self.groups.reference.call_rows_async("compute_response_logprobs", batch,
                                                         temperature=self.temperature)
        if self.groups.reference_in_policy:
            return self.groups.policy.call_rows_async("compute_reference_logprobs", batch,
                                                      temperature=self.temperature)
        return []

    def _chunk_reference(self) -> ChunkReference | None:
        """Reference passes per finished chunk, where there is a reference and its process is idle while the
        engines generate (not when the policy's rank is the engine: there the passes would only queue)."""
        groups = self.groups
        if (groups.reference is None and not groups.reference_in_policy) or groups.generator_in_policy:
            return None
        return ChunkReference(self._start_reference, self.tokenizer.pad_token_id)

    def _start_model_passes(self, experience, reference: bool = True) -> dict[str, list]:
        groups, batch, pending = self.groups, scoring_batch(experience), {}
        if reference and (refs := self._start_reference(batch)):
            pending["ref_logprobs"] = refs
        if groups.critic is not None:
            pending["values"] = groups.critic.call_rows_async("compute_response_values", batch)
        if self.old_logprobs_pass:
            pending["old_logprobs"] = groups.policy.call_rows_async("compute_response_logprobs", batch,
                                                                    temperature=self.temperature)
        return pending

    def _finish_model_passes(self, experience, pending: dict[str, list]) -> dict[str, float]:
        for name, refs in pending.items():
            setattr(experience, name, torch.cat(ray.get(refs)))
        metrics = {}
        if experience.old_logprobs is not None:
            # The sampler's and the trainer's log-probs of the same tokens: ~0 when both run the same weights.
            gap = (experience.old_logprobs - experience.rollout_logprobs).abs()[experience.response_mask.bool()]
            metrics["rollout/logprob_gap_mean"] = gap.mean().item() if gap.numel() else 0.0
        elif self.cfg.rl.old_logprobs_source == "rollout":
            experience.old_logprobs = experience.rollout_logprobs.clone()
        if self.simulated and self.cfg.algorithm.kl_coef > 0:    # no reference group: the sampler's, so KL 0
            experience.ref_logprobs = experience.rollout_logprobs.clone()
        return metrics

    def _texts(self, rollouts, rows: list[dict]) -> RewardBatch:
        """Prompt text, response text and answer of every sample of `rollouts`, in row order."""
        prompts, responses, answers = [], [], []
        for rollout in rollouts:
            prompt = self.tokenizer.decode(rollout.prompt_ids, skip_special_tokens=True)
            for sample in rollout.samples:
                prompts.append(prompt)
                responses.append(sample.text)
                answers.append(rows[rollout.prompt_index].get("gt_answer"))
        return RewardBatch(prompts, responses, answers)

    def _reward_batch(self, experience, rollouts, rows: list[dict]) -> RewardBatch:
        """Texts and answers for every source; token rows too when the source reads tokens (a reward model)."""
        texts = self._texts(rollouts, rows)
        if not self.reward_source.reads_tokens:
            return texts
        sequences, attention_mask = experience.sequences, experience.attention_mask
        if self.cfg.reward.rm_append_end:
            sequences, attention_mask = reward_model_inputs(experience, self.template_ids.stop_ids,
                                                            self.template_ids.end_ids, self.tokenizer.pad_token_id)
        return RewardBatch(texts.prompts, texts.responses, texts.gt_answers, sequences, attention_mask)

    # ------------------------------------------------------------ 2. update, 3. weight sync
    def update_episode(self, episode: int) -> dict[str, float]:
        timers, policy, critic = Timers(), self.groups.policy, self.groups.critic
        with timers("update"):                                                          # 2
            chunks = self.buffer.take(self.version)
            steps, seed = self.cfg.rl.num_update_steps, self.cfg.train.seed * 1_000 + episode
            refs = policy.call_split_async("ppo_update", chunks, self._ptx_per_dp_rank(episode),
                                           num_update_steps=steps, seed=seed)
            critic_refs = [] if critic is None else critic.call_split_async("critic_update", chunks,
                                                                            num_update_steps=steps, seed=seed)
            metrics = merge_update_results(get_failing_fast(refs), policy.tp_size, "policy")
            if critic is not None:
                metrics.update(merge_update_results(get_failing_fast(critic_refs), critic.tp_size, "critic"))
        metrics.update(self.buffer.metrics())
        with timers("weight_sync"):                                                     # 3
            metrics.update(self.groups.generators.sync_weights_from(policy, version=self.version + 1))
        if episode == self.start_episode:
            print(f"[{self.job}] first weight sync {timers.metrics(reset=False)['timing/weight_sync']:.2f} s",
                  flush=True)
        self.version += 1
        return {**metrics, **timers.metrics()}

    def _ptx_per_dp_rank(self, episode: int) -> list:
        dp = self.plan.dp
        if self.data.ptx is None:
            return [None] * dp
        per_rank = self.cfg.rl.num_update_steps * self.cfg.train.accumulation_steps * self.cfg.data.ptx_batch_size
        return [self.data.ptx_rows(episode, per_rank, rank, dp) for rank in range(dp)]

    # ------------------------------------------------------------ the run
    def run(self) -> None:
        cfg = self.cfg
        collector = None
        if cfg.rl.async_mode:
            collector = AsyncCollector(self.collect_episode, self.start_episode, cfg.rl.num_episodes,
                                       cfg.rl.max_staleness, self.version).start()
        bar = progress(total=cfg.rl.num_episodes, desc=self.job, enabled=cfg.logging.progress, unit="episode")
        bar.update(self.start_episode)
        try:
            for episode in range(self.start_episode, cfg.rl.num_episodes):
                start = time.perf_counter()
                collected = collector.next(episode) if collector else self.collect_episode(episode)
                updated = self.update_episode(episode)
                self.kl.commit(episode)
                if collector:
                    collector.set_version(self.version)
                seconds = time.perf_counter() - start
                metrics = {**collected, **updated, "timing/episode": seconds, "rl/policy_version": self.version,
                           "reward/kl_coef": self.kl.trained.value,
                           "perf/samples_per_s": self.plan.buffer_samples / max(seconds, 1e-9),
                           **self.startup_metrics}
                if episode + 1 == cfg.rl.num_episodes:
                    metrics.update(self._report_peak_memory())
                if (episode + 1) % cfg.logging.log_interval == 0 or episode + 1 == cfg.rl.num_episodes:
                    self.tracker.log(metrics, step=episode + 1)
                    self.tracker.log_samples(self.last_samples, step=episode + 1)
                    self.startup_metrics = {}
                if cfg.checkpoint.save_interval and (episode + 1) % cfg.checkpoint.save_interval == 0:
                    print(f"[{self.job}] checkpoint -> {self.save_checkpoint(episode + 1)}", flush=True)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3g}")
        finally:
            bar.close()
            if collector:
                collector.stop()
        done, interval = cfg.rl.num_episodes, cfg.checkpoint.save_interval
        if self.simulated:
            print(f"[{self.job}] simulated trainer: no checkpoint and no model written (the weights never trained)",
                  flush=True)
        elif self.start_episode < done and not (interval and done % interval == 0):
            print(f"[{self.job}] checkpoint -> {self.save_checkpoint(done)}", flush=True)

    # ------------------------------------------------------------ checkpoints and export
    def checkpoint_dir(self) -> Path:
        return checkpoint_dir(self.cfg.checkpoint.save_path, self.cfg.checkpoint.save_dir)

    def _state(self, episodes_done: int) -> dict:
        return {"episode": episodes_done, "policy_version": self.version, "kl_coef": self.kl.trained.value,
                "job": self.job, "seed": self.cfg.train.seed, "samples_per_rank": self.plan.samples_per_rank,
                "prompts_per_collect": self.plan.prompts_per_collect,
                "reward_norm": self._reward_norm_after.get(episodes_done - 1)}

    def save_checkpoint(self, episodes_done: int) -> Path:
        """step_<episodes>/ {policy/, critic/, rl_state.json, config}: written atomically (manifest, COMPLETE marker);
        then only the newest --save_total_limit step_N directories are kept."""
        directory = self.checkpoint_dir() / f"step_{episodes_done}"
        state = self._state(episodes_done)
        try:
            with atomic_directory(directory) as tmp:
                for name, group in (("policy", self.groups.policy), ("critic", self.groups.critic)):
                    if group is not None:
                        group.call_all("save_checkpoint", str(tmp / name), state)
                (tmp / RL_STATE_FILE).write_text(json.dumps(state, indent=2))
                self.cfg.save(tmp / CONFIG_BESIDE_CHECKPOINT)
            rotate_checkpoints(self.checkpoint_dir(), self.cfg.checkpoint.save_total_limit)
        except Exception as exc:
            if rank_lost(exc, (self.groups.policy, self.groups.critic)) is not None:
                raise                       # a rank died: not a failed write
            raise CheckpointWriteError(directory, episodes_done, exc) from exc
        return directory

    def resume(self, directory: Path) -> None:
        """Restore policy/critic (model, optimizer, scheduler, RNG), KL coefficient and episode; push the restored
        weights to the generators under the saved policy version."""
        state = json.loads((directory / RL_STATE_FILE).read_text())
        now = self._state(state["episode"])
        for key in ("seed", "samples_per_rank", "prompts_per_collect"):
            if state.get(key) != now[key]:
                raise ConfigError(f"--checkpoint_path {directory}: written with {key}={state.get(key)}, this run has "
                                  f"{key}={now[key]}; resume with the same seed and batch layout")
        for name, group in (("policy", self.groups.policy), ("critic", self.groups.critic)):
            if group is not None:
                if not (directory / name).is_dir():
                    raise ConfigError(f"--checkpoint_path {directory}: no {name}/ checkpoint inside")
                group.call_all("load_checkpoint", str(directory / name))
        self.kl.load_state_dict({"value": state["kl_coef"]})
        if self.reward_norm is not None and state.get("reward_norm"):
            self.reward_norm.load_state_dict(state["reward_norm"])
        self.version, self.start_episode = int(state["policy_version"]), int(state["episode"])
        self.groups.generators.sync_weights_from(self.groups.policy, version=self.version)

    def export(self) -> Path:
        """The final policy as a plain HF directory (and the critic beside it, `<save_path>-critic`)."""
        save_path = Path(self.cfg.checkpoint.save_path)
        self.groups.policy.call_all("save_hf", str(save_path))
        if self.groups.critic is not None:
            self.groups.critic.call_all("save_hf", str(save_path.with_name(save_path.name + "-critic")))
        self.cfg.save(save_path / CONFIG_BESIDE_CHECKPOINT)
        return save_path

    def shutdown(self) -> None:
        self.reward_source.close()
