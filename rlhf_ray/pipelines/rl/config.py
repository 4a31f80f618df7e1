"""The RL job's typed config: PPO and GRPO share every section; GRPO has no critic and other defaults.

Sections (each field is a flag `--section.field`, and `--field` under its own name or the job's alias):

    model       the policy (and reference) model: --pretrain --tokenizer_dir --grad_checkpoint, LoRA
    data        --prompt_dataset --pretrain_dataset --ptx_batch_size --conversation_template_config
    rl          the episode schedule: --num_episodes --num_collect_steps --num_update_steps --experience_batch_size,
                async mode and its --max_staleness
    train       policy optimiser and batches, the supervised jobs' TrainSection with RL defaults:
                --train_batch_size (= train.batch_size) --accumulation_steps --lr --mixed_precision --seed ...
    algorithm   estimator, policy loss, clipping, KL (in the reward or as a loss; fixed/adaptive), entropy, ptx
    parallel    the policy group's layout and resources: --plugin --num_workers --tp --cpus_per_worker ... --pool
    critic      PPO only: --critic_pretrain --critic_lr and each rank's resources (it mirrors the policy's ranks)
    reference   the reference group's resources (ResourcesSection): --ref_num_workers --ref_cpus_per_worker ...
    reward      where rewards come from (model | rule | gsm8k | arithmetic | remote) and the reward-model group's
                resources: --reward_num_workers --reward_cpus_per_worker ...
    placement   colocation (policy+reference, critic+reward, everything) and the generators' node pool
    generator   the vLLM (or HF) generator group and sampling (rollout/config.py)
    checkpoint, logging

`check_rl_config` runs the checks that span sections, once, before any actor starts: above all the seed's buffer
arithmetic (`BufferPlan`), refused with every number when it does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from rlhf_ray.algorithms.masking import LossAggMode
from rlhf_ray.config.base import ConfigError, JobConfig, Section
from rlhf_ray.config.sections import (CheckpointSection, LoggingSection, ModelSection, ParallelSection,
                                      ResourcesSection, TrainSection, WorkerResources)
from rlhf_ray.rollout.config import GeneratorSection

RewardSourceName = Literal["model", "rule", "gsm8k", "arithmetic", "remote"]


class RLDataSection(Section):
    """Prompts to roll out (prepared --type prompt) and, for the ptx loss, pretraining rows (--type ptx)."""

    prompt_dataset: list[str] = Field(default_factory=list,
                                      description="required: prepared prompt data directories (`rlhf-ray prepare "
                                                  "--type prompt`)")
    pretrain_dataset: list[str] | None = Field(None, description="prepared ptx data (`--type ptx`) for the "
                                                                 "pretraining loss; used when --ptx_coef > 0")
    ptx_batch_size: int = Field(4, ge=1, description="ptx rows per micro-batch on each data-parallel rank")
    conversation_template_config: str | None = Field(
        None, description="the template JSON used by prepare; its stop_ids are added to the generators' stop "
                          "tokens (the model's EOS always stops)")
    shuffle: bool = Field(True, description="shuffle prompts each pass (order depends only on seed and pass)")


class RLScheduleSection(Section):
    """Episodes: collect experience, then update on it, then sync weights to the generators."""

    num_episodes: int = Field(1, ge=1, description="episodes; each = collect, update, weight sync")
    num_collect_steps: int = Field(1, ge=1, description="generation batches per episode")
    num_update_steps: int = Field(1, ge=1, description="optimizer steps per episode, each over the whole buffer "
                                                       "(PPO epochs)")
    experience_batch_size: int = Field(8, ge=1, description="prompts per collect step on each data-parallel rank")
    async_mode: bool = Field(False, description="generate the next episode's batch while the current one trains")
    max_staleness: int = Field(1, ge=1, description="async mode: experience may be at most this many policy "
                                                    "versions older than the policy that trains on it")
    old_logprobs_source: Literal["policy", "rollout"] = Field(
        "policy", description="policy: the policy group recomputes old log-probs (sync: while scoring; async: at "
                              "the start of the update); rollout: use the generators' own log-probs")
    recompute_old_logprobs: bool | Literal["auto"] = Field(
        "auto", description="with --old_logprobs_source policy: true = a separate policy forward pass while scoring; "
                            "false = taken, detached, from the update's own forward pass (ratio exactly 1), which "
                            "needs sync mode, --num_update_steps 1 and no --rollout_is / --rollout_rs; auto = false "
                            "exactly when that gives the same loss (and the reward's KL does not read them)")
    forward_batch_size: int = Field(16, ge=1, description="rows per forward pass when scoring (log-probs, "
                                                          "values, rewards)")
    simulated_trainer_step_s: float | None = Field(
        None, ge=0, description="benchmarking: the policy group is a stand-in whose optimizer step takes this many "
                                "seconds (it only syncs the initial weights; old and reference log-probs are the "
                                "sampler's; no reference group, no checkpoint, no export); generation, rewards, "
                                "buffer, async mode, partial rollouts and weight syncs run for real")


class AlgorithmSection(Section):
    """Advantages, losses and KL. Defaults are PPO's (GAE, KL in the reward); GRPOConfig sets GRPO's."""

    advantage_estimator: str = Field("gae", description="gae | grpo | grpo_no_std | rloo | reinforce_plus_plus | "
                                                        "reinforce_plus_plus_baseline")
    norm_adv_by_std: bool = Field(True, description="divide advantages by their (group or batch) std")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    policy_loss: str = Field("ppo", description="ppo (clipped surrogate, optional dual clip) | gspo | cispo")
    clip_ratio_low: float = Field(0.2, ge=0, lt=1, description="ratio clipped below at 1 - clip_ratio_low")
    clip_ratio_high: float = Field(0.2, ge=0, description="ratio clipped above at 1 + clip_ratio_high")
    dual_clip: float | None = Field(None, gt=1, description="dual-clip bound c > 1 for negative advantages; "
                                                            "unset disables")
    value_clip: float | None = Field(0.2, gt=0, description="critic value clip range; unset = plain MSE")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    ptx_coef: float = Field(0.0, ge=0, description="pretraining (ptx) loss coefficient")
    kl_mode: Literal["reward", "loss"] = Field("reward", description="reward: per-token penalty in the reward; "
                                                                     "loss: a KL term in the policy loss")
    kl_coef: float = Field(0.1, ge=0, description="initial KL coefficient; 0 = no KL and no reference group")
    kl_estimator: str | None = Field(None, description="k1 | k2 | k3 | low_var_kl | abs; default k1 in the "
                                                       "reward, low_var_kl as a loss")
    kl_ctrl_type: Literal["fixed", "adaptive"] = Field("fixed", description="fixed or adaptive (Ziegler et al.) "
                                                                            "KL coefficient")
    target_kl: float | None = Field(None, gt=0, description="adaptive: target summed KL per sequence")
    kl_horizon: float = Field(10000.0, gt=0, description="adaptive: controller horizon in samples")
    loss_agg_mode: LossAggMode = Field(
        "token-mean", description="how token losses reduce to a scalar over the global batch; "
                                  "seq-mean-token-sum-norm: sum / (sequences × max_new_tokens), Dr. GRPO")
    score_clip: float | None = Field(None, gt=0, description="clip sequence scores to [-c, c] before shaping")
    reward_normalization: bool = Field(False, description="standardise scores with the running mean and std of "
                                                          "every score so far (before --score_clip and the KL)")
    # --- off-policy / sampler-mismatch correction (algorithms/off_policy.py; names as in veRL)
    rollout_is: Literal["auto", "none", "token", "sequence"] = Field(
        "auto", description="importance weight min(pi_old / pi_sampler, C) on each token's policy loss, per token "
                            "or per sequence; auto = token in async mode (the decoupled objective), none in sync")
    rollout_is_threshold: float = Field(2.0, gt=0, description="the cap C of the importance weight")
    rollout_rs: Literal["none", "token", "sequence", "geometric"] = Field(
        "none", description="drop tokens (token, IcePop) or whole responses (sequence: product of ratios; "
                            "geometric: their geometric mean) whose pi_old / pi_sampler leaves the band")
    rollout_rs_threshold: float = Field(2.0, gt=0, description="upper edge of the rejection band")
    rollout_rs_threshold_lower: float | None = Field(None, ge=0, description="lower edge of the rejection band; "
                                                                             "default 1 / rollout_rs_threshold")
    shared_prompt_forward: bool = Field(
        True, description="run each distinct prompt of a batch once, its KV cache copied to its samples, in the "
                          "policy update and in the reference and old logprob passes (GRPO's n samples share one); "
                          "the same numbers to float rounding. Only where exact: a plain transformers model on one "
                          "rank, full attention, no gradient checkpointing; elsewhere the full sequences run")
    # --- DAPO (Yu et al. 2025): dynamic sampling and overlong handling (names as in veRL)
    filter_groups: bool = Field(False, description="dynamic sampling: drop groups whose rewards are all equal and "
                                                   "generate more prompts until the batch is full")
    max_num_gen_batches: int = Field(4, ge=1, description="dynamic sampling: at most this many generation rounds "
                                                          "per collect step; a shortfall is filled with groups "
                                                          "whose loss mask is all zero")
    overlong_filter: bool = Field(False, description="truncated responses (cut at max_new_tokens) leave the loss")
    overlong_buffer_len: int = Field(0, ge=0, description="soft overlong punishment over the last N tokens before "
                                                          "max_new_tokens (linear, down to -overlong_penalty_factor); "
                                                          "0 = off")
    overlong_penalty_factor: float = Field(1.0, ge=0, description="the largest overlong penalty")

    @field_validator("advantage_estimator")
    @classmethod
    def _known_estimator(cls, value: str) -> str:
        from rlhf_ray.algorithms.advantages import ADVANTAGE_ESTIMATORS

        ADVANTAGE_ESTIMATORS.get(value)        # ValueError listing the known names
        return value

    @field_validator("policy_loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        from rlhf_ray.algorithms.policy_loss import POLICY_LOSSES

        POLICY_LOSSES.get(value)
        return value

    @field_validator("kl_estimator")
    @classmethod
    def _known_kl(cls, value: str | None) -> str | None:
        from rlhf_ray.algorithms.kl import KL_ESTIMATORS

        if value is not None:
            KL_ESTIMATORS.get(value)
        return value

    @property
    def resolved_kl_estimator(self) -> str:
        return self.kl_estimator or ("k1" if self.kl_mode == "reward" else "low_var_kl")

    @property
    def needs_critic(self) -> bool:
        from rlhf_ray.algorithms.advantages import CRITIC_ESTIMATORS

        return self.advantage_estimator in CRITIC_ESTIMATORS

    @property
    def needs_groups(self) -> bool:
        from rlhf_ray.algorithms.advantages import GROUP_ESTIMATORS

        return self.advantage_estimator in GROUP_ESTIMATORS


class CriticSection(WorkerResources):
    """The critic (PPO with GAE). It has the policy's ranks (num_workers, tp, plugin) so that its data-parallel
    shards line up with the replay buffer; its model, learning rate and what each rank reserves are its own."""

    pretrain: str | None = Field(None, description="critic init; default the reward model "
                                                   "(--rm_checkpoint_path / --rm_pretrain), else --pretrain")
    lr: float = Field(9e-6, gt=0, description="critic peak learning rate")


class RewardSection(ResourcesSection):
    """Where rewards come from, and the reward-model group's resources when it is a model."""

    reward_source: RewardSourceName | None = Field(
        None, description="model | rule | gsm8k | arithmetic | remote; default: rule with --reward_fn, remote with "
                          "--reward_url, model with --rm_pretrain / --rm_checkpoint_path")
    rm_pretrain: str | None = Field(None, description="reward model directory (HF; a `rlhf-ray rm` output loads "
                                                      "with its head)")
    rm_checkpoint_path: str | None = Field(None, description="trained reward model (`rlhf-ray rm --save_path`); "
                                                             "its weights win over --rm_pretrain")
    rm_append_end: bool = Field(True, description="score prompt + response + the template's assistant line end "
                                                  "(a trailing stop token replaced), as prepare rendered the reward "
                                                  "model's training pairs; false: the tokens as generated")
    reward_fn: str | None = Field(None, description="rule reward: path/to/file.py:function(prompt, response, "
                                                    "gt_answer)")
    reward_url: str | None = Field(None, description="remote reward: the scoring endpoint (http://...)")
    reward_timeout_s: float = Field(60.0, gt=0, description="remote reward: seconds per request")
    reward_retries: int = Field(3, ge=0, description="remote reward: retries after a failed request")

    @field_validator("reward_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        # checked with the config, before Ray starts, not when the source is built inside the run
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("the remote reward server is reached over HTTP: give http://host:port/path or https://...")
        return value

    @property
    def rm_path(self) -> str | None:
        return self.rm_checkpoint_path or self.rm_pretrain

    def resolved_source(self) -> str:
        if self.reward_source is not None:
            return self.reward_source
        if self.reward_fn:
            return "rule"
        if self.reward_url:
            return "remote"
        if self.rm_path:
            return "model"
        raise ConfigError("no reward source: give --reward_fn file.py:function (rule), --rm_checkpoint_path DIR "
                          "(reward model), --reward_url URL (remote), or --reward_source gsm8k / arithmetic")


class RLCheckpointSection(CheckpointSection):
    """Where and when to save (per episode), and what to resume from."""

    save_path: str = Field("output/rl", description="directory for the final HF-format policy (the critic goes "
                                                    "to <save_path>-critic)")
    save_interval: int = Field(0, ge=0, description="save a resumable checkpoint every N episodes; 0 = only at "
                                                    "the end")


class PlacementSection(Section):
    """Colocation of roles on shared placement-group bundles, and the generators' node pool."""

    colocate_policy_reference: bool = Field(False, description="policy and reference share bundles "
                                                               "(time-share the same CPUs/GPUs)")
    colocate_critic_reward: bool = Field(False, description="critic and reward model share bundles")
    colocate_all: bool = Field(False, description="every role, generators included, on the same bundles")
    reference_in_policy: bool | None = Field(
        None, description="the frozen reference model inside the policy's processes (one copy per policy rank) "
                          "instead of a reference group of its own: no actors to start, no batches to send; default "
                          "(auto): on when policy and reference are colocated, sync mode, one reference worker per "
                          "policy worker, no other pool")
    generator_in_policy: bool | None = Field(
        None, description="the policy's rank generates with its own module (transformers backend): no generator "
                          "actor, no weight transfer; default (auto): on for --backend hf under --colocate_all with one "
                          "unsharded CPU policy rank and one engine, sync mode; for small models")
    generator_pool: str | None = Field(None, description="node pool of the generator engines (pool=<name> label "
                                                         "or accelerator_type:<T>, as --pool)")


# The seed's flat flag names (ColossalChat train_ppo.py, and this project's earlier flags) that are not a field's
# own unique name, and the field each one sets. JobConfig refuses a field name shared by sections that has no entry.
RL_ALIASES = {
    "seed": "train.seed", "train_batch_size": "train.batch_size",
    "num_workers": "parallel.num_workers", "cpus_per_worker": "parallel.cpus_per_worker",
    "gpus_per_worker": "parallel.gpus_per_worker", "pool": "parallel.pool",
    "ref_num_workers": "reference.num_workers", "ref_cpus_per_worker": "reference.cpus_per_worker",
    "ref_gpus_per_worker": "reference.gpus_per_worker", "ref_pool": "reference.pool",
    "reward_num_workers": "reward.num_workers", "reward_cpus_per_worker": "reward.cpus_per_worker",
    "reward_gpus_per_worker": "reward.gpus_per_worker", "reward_pool": "reward.pool",
    "max_restarts": "checkpoint.max_restarts", "generator_max_restarts": "generator.max_restarts",
}
PPO_ALIASES = {
    **RL_ALIASES, "pretrain": "model.pretrain", "lr": "train.lr",
    "critic_pretrain": "critic.pretrain", "critic_lr": "critic.lr", "critic_cpus_per_worker": "critic.cpus_per_worker",
    "critic_gpus_per_worker": "critic.gpus_per_worker", "critic_pool": "critic.pool",
}


class PPOConfig(JobConfig):
    model: ModelSection = ModelSection()
    data: RLDataSection = RLDataSection()
    rl: RLScheduleSection = RLScheduleSection()
    train: TrainSection = TrainSection(accumulation_steps=2, lr=9e-6)
    algorithm: AlgorithmSection = AlgorithmSection()
    parallel: ParallelSection = ParallelSection()
    critic: CriticSection = CriticSection()
    reference: ResourcesSection = ResourcesSection()
    reward: RewardSection = RewardSection()
    placement: PlacementSection = PlacementSection()
    generator: GeneratorSection = GeneratorSection()
    checkpoint: RLCheckpointSection = RLCheckpointSection()
    logging: LoggingSection = LoggingSection()

    aliases = PPO_ALIASES


class GRPOConfig(JobConfig):
    """PPO's sections without the critic, with GRPO's defaults: 4 samples per prompt, group-normalised advantages,
    KL as a loss term, 16-sample micro-batches."""

    model: ModelSection = ModelSection()
    data: RLDataSection = RLDataSection()
    rl: RLScheduleSection = RLScheduleSection()
    train: TrainSection = TrainSection(batch_size=16, accumulation_steps=2, lr=9e-6)
    algorithm: AlgorithmSection = AlgorithmSection(advantage_estimator="grpo", kl_mode="loss", kl_coef=0.01)
    parallel: ParallelSection = ParallelSection()
    reference: ResourcesSection = ResourcesSection()
    reward: RewardSection = RewardSection()
    placement: PlacementSection = PlacementSection()
    generator: GeneratorSection = GeneratorSection(n_samples_per_prompt=4)
    checkpoint: RLCheckpointSection = RLCheckpointSection()
    logging: LoggingSection = LoggingSection()

    aliases = RL_ALIASES


RLConfig = PPOConfig | GRPOConfig


# ---------------------------------------------------------------- cross-section checks


@dataclass(frozen=True)
class BufferPlan:
    """The seed's buffer arithmetic, per episode:

        experience buffer = dp × num_collect_steps × experience_batch_size × n_samples_per_prompt
                          = train_batch_size × accumulation_steps × dp

    (n_samples_per_prompt is 1 in the seed's PPO). dp = num_workers / tp, the data-parallel groups of the policy.
    One update step is one optimizer step over the whole buffer, so both sides must be equal.
    """

    dp: int
    tp: int
    num_collect_steps: int
    experience_batch_size: int
    n_samples_per_prompt: int
    train_batch_size: int
    accumulation_steps: int

    @classmethod
    def from_config(cls, cfg: RLConfig) -> "BufferPlan":
        return cls(dp=cfg.parallel.dp, tp=cfg.parallel.tp, num_collect_steps=cfg.rl.num_collect_steps,
                   experience_batch_size=cfg.rl.experience_batch_size,
                   n_samples_per_prompt=cfg.generator.n_samples_per_prompt,
                   train_batch_size=cfg.train.batch_size, accumulation_steps=cfg.train.accumulation_steps)

    @property
    def prompts_per_collect(self) -> int:
        """Prompts one collect step sends to the generators (all dp ranks together)."""
        return self.dp * self.experience_batch_size

    @property
    def samples_per_collect(self) -> int:
        return self.prompts_per_collect * self.n_samples_per_prompt

    @property
    def buffer_samples(self) -> int:
        return self.samples_per_collect * self.num_collect_steps

    @property
    def train_samples(self) -> int:
        return self.train_batch_size * self.accumulation_steps * self.dp

    @property
    def samples_per_rank(self) -> int:
        return self.train_batch_size * self.accumulation_steps

    def equation(self) -> str:
        n = f" × n_samples_per_prompt ({self.n_samples_per_prompt})" if self.n_samples_per_prompt > 1 else ""
        return (f"experience buffer = dp ({self.dp}) × num_collect_steps ({self.num_collect_steps}) × "
                f"experience_batch_size ({self.experience_batch_size}){n} = {self.buffer_samples} samples; "
                f"train batch = train_batch_size ({self.train_batch_size}) × accumulation_steps "
                f"({self.accumulation_steps}) × dp ({self.dp}) = {self.train_samples} samples "
                f"(dp = num_workers / tp = {self.dp * self.tp} / {self.tp})")

    def check(self) -> None:
        if self.buffer_samples == self.train_samples:
            return
        per_rank = self.num_collect_steps * self.experience_batch_size * self.n_samples_per_prompt
        fixes = [f"--accumulation_steps {per_rank // self.train_batch_size}"
                 if per_rank % self.train_batch_size == 0 else None,
                 f"--train_batch_size {per_rank // self.accumulation_steps}"
                 if per_rank % self.accumulation_steps == 0 else None]
        fix = " or ".join(f for f in fixes if f) or "change num_collect_steps / experience_batch_size"
        raise ConfigError(f"the buffer arithmetic does not hold: {self.equation()}; they must be equal (one update "
                          f"step is one optimizer step over the whole buffer). Try {fix}")


def rollout_correction_settings(cfg: RLConfig) -> dict:
    """The RLLossSettings fields of the off-policy correction, with "auto" resolved: in async mode with the
    trainer's own old log-probs (the decoupled objective), token-level truncated IS; otherwise off."""
    algo = cfg.algorithm
    decoupled = cfg.rl.async_mode and cfg.rl.old_logprobs_source == "policy"
    level = ("token" if decoupled else None) if algo.rollout_is == "auto" else algo.rollout_is
    return {"rollout_is": None if level == "none" else level, "rollout_is_threshold": algo.rollout_is_threshold,
            "rollout_rs": None if algo.rollout_rs == "none" else algo.rollout_rs,
            "rollout_rs_threshold": algo.rollout_rs_threshold,
            "rollout_rs_threshold_lower": algo.rollout_rs_threshold_lower}


def old_logprobs_from_update(cfg: RLConfig) -> tuple[bool, str]:
    """Whether the policy's old log-probs are the update's own log-probs, detached, instead of a separate forward
    pass while scoring; and the reason, logged once at start. Exact when every sample is trained on once by the
    weights that generated it (sync mode, one optimizer step per episode) and nothing reads the old log-probs
    before the update (no off-policy correction; auto also keeps the separate pass for a KL in the reward).
    Raises ConfigError for --recompute_old_logprobs false where it would change the loss."""
    rl, algo = cfg.rl, cfg.algorithm
    if rl.old_logprobs_source == "rollout":
        return False, "old log-probs: the sampler's (--old_logprobs_source rollout); no policy pass"
    correction = rollout_correction_settings(cfg)
    blockers = [reason for reason, on in (
        ("--async_mode (the trainer's weights are newer than the sampler's)", rl.async_mode),
        (f"--num_update_steps {rl.num_update_steps} (steps after the first train on moved weights)",
         rl.num_update_steps > 1),
        ("--rollout_is / --rollout_rs (they compare the old log-probs with the sampler's before the update)",
         bool(correction["rollout_is"] or correction["rollout_rs"]))) if on]
    if rl.recompute_old_logprobs is False and blockers:
        raise ConfigError(f"--recompute_old_logprobs false takes the old log-probs from the update itself, which "
                          f"changes the loss with {'; '.join(blockers)}; use --recompute_old_logprobs auto")
    if rl.recompute_old_logprobs == "auto" and algo.kl_coef > 0 and algo.kl_mode == "reward":
        blockers.append("--kl_mode reward (the reward's KL reads them before the update)")
    if rl.recompute_old_logprobs is True or blockers:
        why = "--recompute_old_logprobs true" if rl.recompute_old_logprobs is True else "; ".join(blockers)
        return False, f"old log-probs: a separate policy forward pass ({why})"
    return True, ("old log-probs: from the update's own forward pass, detached (on-policy, one optimizer step per "
                  "episode); no separate policy pass")


def reference_in_policy(cfg: RLConfig) -> bool:
    """Whether the policy's ranks hold the reference model themselves (no reference group). Auto: when the two
    share bundles anyway and the policy is idle while experience is scored (sync mode; in async mode the policy
    trains meanwhile, and a reference group scores beside it)."""
    if cfg.algorithm.kl_coef == 0 or cfg.rl.simulated_trainer_step_s is not None:
        return False                                    # no reference at all
    if cfg.placement.reference_in_policy is not None:
        return cfg.placement.reference_in_policy
    placement = cfg.placement
    return ((placement.colocate_all or placement.colocate_policy_reference) and not cfg.rl.async_mode
            and cfg.reference.num_workers == cfg.parallel.num_workers and cfg.reference.pool in (None, cfg.parallel.pool))


def generator_in_policy_blockers(cfg: RLConfig) -> list[str]:
    """What keeps the engine out of the policy's process (empty: it can live there)."""
    gen, parallel = cfg.generator, cfg.parallel
    return [reason for reason, on in (
        (f"--backend {gen.backend} (only the transformers backend can share the policy's module)", gen.backend != "hf"),
        ("no --colocate_all", not cfg.placement.colocate_all),
        (f"--num_engines {gen.num_engines}", gen.num_engines != 1),
        (f"--num_workers {parallel.num_workers} (one policy rank)", parallel.num_workers != 1),
        (f"--plugin {parallel.plugin} (the module must be whole: ddp)", parallel.plugin != "ddp"),
        ("--gpus_per_worker > 0 (the policy's fp32 weights; a GPU engine samples in its own dtype)",
         parallel.gpus_per_worker > 0),
        ("--async_mode (generation runs while the policy trains)", cfg.rl.async_mode),
        ("--partial_rollout", gen.partial_rollout),
        ("--simulated_trainer_step_s", cfg.rl.simulated_trainer_step_s is not None)) if on]


def generator_in_policy(cfg: RLConfig) -> bool:
    """Whether the policy's rank is also the generation engine (workers/policy_generator.py). Auto: wherever it can
    be; ConfigError when asked for where it cannot."""
    blockers = generator_in_policy_blockers(cfg)
    if cfg.placement.generator_in_policy and blockers:
        raise ConfigError(f"--generator_in_policy true cannot be: {'; '.join(blockers)}")
    return not blockers if cfg.placement.generator_in_policy is None else cfg.placement.generator_in_policy


def sampler_logprobs_feed_training(cfg: RLConfig) -> str | None:
    """Why the sampler's log-probs enter the loss or the KL (the setting that makes them), or None."""
    correction = rollout_correction_settings(cfg)
    if cfg.rl.old_logprobs_source == "rollout":
        return "--old_logprobs_source rollout"
    if correction["rollout_is"] or correction["rollout_rs"]:
        return "the off-policy correction (--rollout_is / --rollout_rs; on by default in async mode)"
    if cfg.algorithm.kl_coef > 0 and cfg.algorithm.kl_mode == "reward" and (
            cfg.rl.async_mode or cfg.rl.recompute_old_logprobs is False):
        return "--kl_mode reward with async mode or --recompute_old_logprobs false (the reward's KL then uses the " \
               "sampler's log-probs)"
    return None


def check_sampler_logprobs(cfg: RLConfig) -> None:
    """Refuse sampling settings whose log-probs the trainer cannot reproduce when those log-probs are trained on.
    The trainer computes log_softmax(logits / temperature) over the whole vocabulary; the sampler's log-probs are
    that only with logprobs_mode processed (or temperature 1) and no top-p / top-k truncation."""
    gen = cfg.generator
    truncated = [flag for flag, on in (
        (f"--top_p {gen.top_p}", gen.top_p < 1), (f"--top_k {gen.top_k}", gen.top_k > 0),
        (f"--temperature {gen.temperature} with --logprobs_mode raw",
         gen.logprobs_mode == "raw" and gen.temperature != 1)) if on]
    reason = sampler_logprobs_feed_training(cfg) if truncated else None
    if reason:
        raise ConfigError(f"{', '.join(truncated)}: the sampler's log-probs then differ from the trainer's "
                          f"log_softmax(logits / temperature) over the full vocabulary, and {reason} trains on them; "
                          f"sample with --top_p 1 --top_k -1 (and --logprobs_mode processed), or turn that off")


def check_simulated_trainer(cfg: RLConfig) -> str | None:
    """--simulated_trainer_step_s: refuse what a stand-in policy cannot do (train a critic, resume, write
    checkpoints); returns the note to print, or None when the trainer is real."""
    step_s = cfg.rl.simulated_trainer_step_s
    if step_s is None:
        return None
    refused = [flag for flag, on in (
        (f"--advantage_estimator {cfg.algorithm.advantage_estimator} (it trains a critic)",
         cfg.algorithm.needs_critic),
        (f"--checkpoint_path {cfg.checkpoint.checkpoint_path} (there is no trained state to resume)",
         bool(cfg.checkpoint.checkpoint_path)),
        (f"--save_interval {cfg.checkpoint.save_interval} (a checkpoint would hold untrained weights)",
         cfg.checkpoint.save_interval > 0)) if on]
    if refused:
        raise ConfigError(f"--simulated_trainer_step_s {step_s} replaces the policy by a stand-in that does not "
                          f"train, which rules out {'; '.join(refused)}; drop those flags, or drop "
                          f"--simulated_trainer_step_s to train for real")
    return (f"simulated trainer: each optimizer step of the policy takes {step_s:g} s (a stand-in that only syncs the "
            f"initial weights); old and reference log-probs are the sampler's (ratio 1, KL 0), no reference group; "
            f"no checkpoint and no model are written to --save_path {cfg.checkpoint.save_path}")


def check_rl_config(cfg: RLConfig, job: str) -> list[str]:
    """Checks across sections; raises ConfigError naming the flags. Returns derived decisions to print."""
    notes: list[str] = []
    if not cfg.model.pretrain:
        raise ConfigError("--pretrain is required: the initial policy (an HF model directory)")
    for flag, path in (("--pretrain", cfg.model.pretrain), ("--rm_checkpoint_path", cfg.reward.rm_checkpoint_path),
                       ("--rm_pretrain", cfg.reward.rm_pretrain),
                       ("--critic_pretrain", getattr(getattr(cfg, "critic", None), "pretrain", None))):
        if path and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{flag} {path}: no config.json there; give an HF model directory (a `rlhf-ray sft` / "
                              f"`rlhf-ray rm` --save_path works)")
    if not cfg.data.prompt_dataset:
        raise ConfigError("--prompt_dataset is required: prepared prompts (`rlhf-ray prepare --type prompt`)")
    algo, gen = cfg.algorithm, cfg.generator
    if algo.needs_critic and not hasattr(cfg, "critic"):
        raise ConfigError(f"advantage_estimator={algo.advantage_estimator!r} needs a critic, which `rlhf-ray {job}` "
                          f"does not run; use `rlhf-ray ppo`, or --advantage_estimator grpo / rloo / "
                          f"reinforce_plus_plus")
    if algo.needs_groups and gen.n_samples_per_prompt < 2:
        raise ConfigError(f"advantage_estimator={algo.advantage_estimator!r} needs n_samples_per_prompt > 1 (got "
                          f"{gen.n_samples_per_prompt}); set --n_samples_per_prompt 4 or more")
    if gen.temperature <= 0:
        raise ConfigError(f"--temperature {gen.temperature}: RL needs sampled rollouts whose log-probs the policy "
                          f"can recompute; set a temperature > 0 (1.0 is usual)")
    if algo.kl_ctrl_type == "adaptive" and algo.target_kl is None:
        raise ConfigError("--kl_ctrl_type adaptive needs --target_kl (e.g. 6.0, summed KL per sequence)")
    if algo.kl_ctrl_type == "adaptive" and algo.kl_mode != "reward":
        raise ConfigError("--kl_ctrl_type adaptive steers the KL penalty in the reward; use it with --kl_mode reward")
    simulated = check_simulated_trainer(cfg)
    source = cfg.reward.resolved_source()
    if source == "model" and not cfg.reward.rm_path:
        raise ConfigError("--reward_source model needs --rm_checkpoint_path (a `rlhf-ray rm` output) or --rm_pretrain")
    if source == "rule" and not cfg.reward.reward_fn:
        raise ConfigError("--reward_source rule needs --reward_fn path/to/file.py:function")
    if source == "remote" and not cfg.reward.reward_url:
        raise ConfigError("--reward_source remote needs --reward_url http://host:port/path")
    if source != "model" and cfg.placement.colocate_critic_reward:
        raise ConfigError(f"--colocate_critic_reward needs a reward-model group, but --reward_source is {source!r}")
    if algo.ptx_coef > 0 and not cfg.data.pretrain_dataset:
        raise ConfigError(f"--ptx_coef {algo.ptx_coef} needs --pretrain_dataset (prepared with --type ptx)")
    BufferPlan.from_config(cfg).check()
    if algo.filter_groups and not algo.needs_groups:
        raise ConfigError(f"--filter_groups drops groups of equal rewards, which needs a group estimator; "
                          f"--advantage_estimator {algo.advantage_estimator} has no groups (use grpo, rloo, ...)")
    if algo.overlong_buffer_len > gen.max_new_tokens:
        raise ConfigError(f"--overlong_buffer_len {algo.overlong_buffer_len} exceeds --max_new_tokens "
                          f"{gen.max_new_tokens}; the buffer is the last part of the allowed length")
    if gen.partial_rollout and not cfg.rl.async_mode:
        raise ConfigError("--partial_rollout lets generation continue across a weight sync, which happens during "
                          "generation only in async mode; add --async_mode, or drop --partial_rollout")
    explicit = [f"--{name} {getattr(algo, name)}" for name in ("rollout_is", "rollout_rs")
                if getattr(algo, name) not in ("auto", "none")]
    if explicit and cfg.rl.old_logprobs_source == "rollout":
        raise ConfigError(f"{' '.join(explicit)} compares the trainer's old log-probs with the sampler's, but "
                          f"--old_logprobs_source rollout makes them the same; use --old_logprobs_source policy")
    if simulated is None:                   # a stand-in trains on nothing: any sampling settings will do
        check_sampler_logprobs(cfg)
    notes.append(simulated or old_logprobs_from_update(cfg)[1])
    if cfg.data.pretrain_dataset and algo.ptx_coef == 0:
        notes.append("--pretrain_dataset is given but --ptx_coef is 0: no ptx loss is computed")
    if algo.kl_coef == 0:
        notes.append("kl_coef is 0: no KL term and no reference group")
    elif reference_in_policy(cfg):
        notes.append("reference model: inside the policy's processes, a copy per rank (no reference group; "
                     "--reference_in_policy false gives it its own)")
    if generator_in_policy(cfg):
        notes.append("generation: the policy's rank samples with its own module (transformers backend); no generator "
                     "actor, a weight sync sends nothing (--generator_in_policy false gives it its own)")
    if cfg.rl.async_mode and cfg.rl.old_logprobs_source == "policy" and simulated is None:
        notes.append("async mode: the policy recomputes old log-probs at the start of each update (the policy is "
                     "busy training while the next batch is scored)")
        if algo.rollout_is == "auto":
            notes.append(f"async mode: decoupled objective, token-level importance weights min(pi_old / "
                         f"pi_sampler, {algo.rollout_is_threshold}) on the policy loss (--rollout_is none: off)")
    if hasattr(cfg, "critic") and not algo.needs_critic:
        notes.append(f"advantage_estimator={algo.advantage_estimator!r} needs no critic: no critic group is started")
    if cfg.checkpoint.save_interval == 0 and simulated is None:
        notes.append("save_interval 0: one resumable checkpoint at the end")
    return notes
