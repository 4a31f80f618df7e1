"""GeneratorGroup: the driver-side handle of N generator actors (one engine each).

    group = GeneratorGroup(section, model_path="runs/sft")               # places N GeneratorWorkers, waits ready
    result = group.generate(prompt_ids_list)                             # RolloutResult, ordered by prompt index
    group.sync_weights_from(policy_group, version=step)                  # trainer -> engines, stamped with step
    group.shutdown()

generate():
  1. prompts are checked against max_prompt_len (left-truncated and counted, or refused: prompt_truncation);
  2. split into chunks of contiguous prompt indices (dispatch_chunk_size; default one chunk per engine);
  3. each chunk goes to the ready engine with the fewest outstanding prompts (at most max_inflight_per_engine
     queued per engine);
  4. results are stored by prompt index. A chunk whose engine dies (RayActorError) is put back at the front of
     the queue and retried on another engine, or on the same one once Ray has restarted it; a restarted engine
     that no longer holds the group's policy version is 'stale' and gets no work until the next weight sync.
     Each index is filled exactly once (asserted), so nothing is lost or duplicated.

Generation and weight sync exclude each other (one lock): an engine never samples from half-updated weights. With
partial_rollout on, generate() runs in segments of at most partial_rollout_segment_tokens per sample
(rollout/partial.py) and lets a waiting weight sync take the lock between two segments; the unfinished samples then
continue from prompt + response so far under the new weights. (vLLM's offline LLM.generate blocks the actor until
every request of the call is done, so requests cannot be aborted mid-call; the interruption point is the segment.)
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import ray
import torch
from ray.exceptions import RayActorError

from rlhf_ray.config.base import ConfigError
from rlhf_ray.rollout.config import GeneratorSection
from rlhf_ray.rollout.dispatch import (DEAD, READY, RECOVERING, STALE, EngineLoad, chunk_size_for, pick_engine,
                                       split_into_chunks)
from rlhf_ray.rollout.partial import PartialBatch
from rlhf_ray.rollout.types import PromptChunk, PromptRollout, RolloutResult, apply_prompt_limit
from rlhf_ray.rollout.weight_sync import ObjectStoreChannel, WeightSender, resolve_channel
from rlhf_ray.workers.generator import GeneratorWorker
from rlhf_ray.placement.groups import GroupSpec
from rlhf_ray.workers.group import WorkerGroup

ChunkCallback = Callable[[list[PromptRollout]], None]     # a chunk's finished rollouts, as they arrive


class GeneratorGroup:
    def __init__(self, section: GeneratorSection, model_path: str, *, tokenizer_dir: str | None = None,
                 name: str = "generator", placement=None, bundle_indices: Sequence[int] | None = None,
                 gpus_per_engine: float | None = None, env_vars: dict[str, str] | None = None,
                 ready_timeout_s: float = 600.0, workers: WorkerGroup | None = None) -> None:
        """workers: engines that already run, inside the trainer's ranks (PolicyGeneratorWorker, whose module is
        the policy's own): this group neither starts nor stops them, and a weight sync sends nothing."""
        self.section = section
        self.name = name
        self.ready_timeout_s = ready_timeout_s
        self.shares_trainer_weights = workers is not None
        if workers is None:
            if gpus_per_engine is None:
                gpus_per_engine = float(section.tensor_parallel_size) if ray.cluster_resources().get("GPU") else 0.0
            threads = str(section.resolved_cpu_threads())
            spec = GroupSpec(num_workers=section.num_engines, cpus_per_worker=section.cpus_per_engine,
                             gpus_per_worker=gpus_per_engine,
                             env_vars={"OMP_NUM_THREADS": threads, **(env_vars or {})})
            # Generators share no process group (setup_distributed=False): each owns a whole engine. Ray restarts a
            # crashed one (max_restarts); calls are never retried by Ray (the group retries chunks itself).
            workers = WorkerGroup(GeneratorWorker, spec, name=name, placement=placement,
                                  bundle_indices=bundle_indices, setup_distributed=False,
                                  max_restarts=section.max_restarts,
                                  worker_kwargs={"generator": section.model_dump(), "model_path": str(model_path),
                                                 "tokenizer_dir": tokenizer_dir})
        elif len(workers.workers) != section.num_engines:
            raise ValueError(f"{len(workers.workers)} trainer ranks cannot be {section.num_engines} engines")
        self.workers = workers
        self.engines = [EngineLoad(rank) for rank in range(section.num_engines)]
        self._probes: dict[int, ray.ObjectRef] = {}
        self._lock = threading.RLock()
        self._turn = threading.Condition(self._lock)     # partial rollouts: generate waits here while syncs run
        self._waiting = threading.Lock()
        self._syncs_waiting = 0
        self._calls = 0
        self.policy_version = 0
        self._channel_key: tuple | None = None
        self._group_id: str | None = None
        states = ray.get(self.workers.call_all_async("state"), timeout=ready_timeout_s)
        self.max_model_len = min(s["max_model_len"] for s in states)

    # ------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Sequence[int]], *, sampling: dict[str, Any] | None = None,
                 seed_offset: int | None = None,
                 on_chunk: ChunkCallback | None = None) -> RolloutResult:
        """Generate for token-id prompts; result.rollouts[i] belongs to prompts[i].

        sampling: per-call overrides of the section's sampling fields (e.g. {"temperature": 0}).
        seed_offset: mixed into every prompt's sampling seed (default: a per-group call counter), so repeated
            calls sample differently while a retried prompt samples identically.
        on_chunk: called (on this thread) with each chunk's finished rollouts as soon as they arrive, while later
            chunks still generate, so that scoring can start (every prompt exactly once; with partial rollouts
            once, with the whole batch, since samples only finish in the last segments). Keep it quick.
        """
        with self._lock:
            params = self.section.sampling(sampling)
            if self.section.max_prompt_len + params["max_new_tokens"] > self.max_model_len:
                raise ConfigError(f"max_prompt_len ({self.section.max_prompt_len}) + max_new_tokens "
                                  f"({params['max_new_tokens']}) exceeds the engines' max_model_len "
                                  f"({self.max_model_len}); lower max_new_tokens or restart with a larger "
                                  f"max_model_len")
            prompt_ids, truncated = apply_prompt_limit(prompts, self.section.max_prompt_len,
                                                       self.section.prompt_truncation)
            offset = self._calls if seed_offset is None else seed_offset
            self._calls += 1
            start = time.perf_counter()
            if self.section.partial_rollout:
                result = self._generate_partial(prompt_ids, truncated, params, offset)
                if on_chunk is not None:
                    on_chunk(result.rollouts)
            else:
                result = self._run_chunks(prompt_ids, truncated, params, offset, on_chunk)
            result.generate_seconds = time.perf_counter() - start
            return result

    def _generate_partial(self, prompt_ids: list[list[int]], truncated: list[bool], params: dict,
                          seed_offset: int) -> RolloutResult:
        """Partial rollouts: segments of one sample per request; between two, a waiting weight sync runs."""
        batch = PartialBatch(prompt_ids, truncated, params["n_samples_per_prompt"], params["max_new_tokens"],
                             self.section.partial_rollout_segment_tokens, self.section.partial_rollout_max_resumes)
        retried, failed, crossed = 0, [], 0
        while batch.unfinished:
            prompts, max_tokens = batch.next_segment()
            segment = self._run_chunks(prompts, [False] * len(prompts),
                                       {**params, "n_samples_per_prompt": 1, "max_new_tokens": max_tokens},
                                       seed_offset * 1_009 + batch.segments)
            batch.absorb(segment.rollouts)
            retried, failed = retried + segment.retried_chunks, failed + segment.failed_engines
            if batch.unfinished and self._syncs_waiting and batch.may_cross_sync():
                version = self.policy_version
                self._turn.wait_for(lambda: not self._syncs_waiting)     # releases the lock meanwhile
                crossed += self.policy_version != version
        return RolloutResult(batch.rollouts(self._decode), retried_chunks=retried, failed_engines=failed,
                             segments=batch.segments, syncs_crossed=crossed)

    def _decode(self, responses: list[list[int]]) -> list[str]:
        rank = next(e.rank for e in self.engines if e.status in (READY, STALE))
        return self.workers.call_rank(rank, "decode", responses)

    def _run_chunks(self, prompt_ids: list[list[int]], truncated: list[bool], params: dict,
                    seed_offset: int, on_chunk: ChunkCallback | None = None) -> RolloutResult:
        size = chunk_size_for(len(prompt_ids), len(self.engines), self.section.dispatch_chunk_size)
        pending = deque(PromptChunk(ix, [prompt_ids[i] for i in ix], [truncated[i] for i in ix], params, seed_offset)
                        for ix in split_into_chunks(list(range(len(prompt_ids))), size))
        inflight: dict[ray.ObjectRef, tuple[EngineLoad, PromptChunk]] = {}
        try:
            return self._dispatch(pending, inflight, len(prompt_ids), on_chunk)
        finally:
            for engine, chunk in inflight.values():    # an error left chunks behind: forget their load
                engine.inflight_chunks -= 1
                engine.inflight_prompts -= len(chunk)

    def _dispatch(self, pending: deque, inflight: dict, num_prompts: int,
                  on_chunk: ChunkCallback | None) -> RolloutResult:
        filled: list[PromptRollout | None] = [None] * num_prompts
        retried, failed = 0, []
        while pending or inflight:
            self._poll_probes()
            while pending:
                engine = pick_engine(self.engines, self.section.max_inflight_per_engine)
                if engine is None:
                    break
                chunk = pending.popleft()
                ref = self.workers.call_rank_async(engine.rank, "generate", chunk)
                inflight[ref] = (engine, chunk)
                engine.inflight_chunks += 1
                engine.inflight_prompts += len(chunk)
            waitable = list(inflight) + list(self._probes.values())
            if not waitable:
                raise RuntimeError(f"generator group {self.name!r}: no engine can take work "
                                   f"({self._describe()}); stale engines come back with the next weight sync")
            done, _ = ray.wait(waitable, num_returns=1)
            for ref in done:
                if ref not in inflight:
                    continue                             # a probe: handled by _poll_probes next round
                engine, chunk = inflight.pop(ref)
                engine.inflight_chunks -= 1
                engine.inflight_prompts -= len(chunk)
                try:
                    rollouts = ray.get(ref)
                except RayActorError:
                    engine.failures += 1
                    failed.append(engine.rank)
                    self._start_probe(engine)
                    pending.appendleft(chunk)            # retried first, on whichever engine is usable
                    retried += 1
                    continue
                engine.completed_chunks += 1
                for rollout in rollouts:
                    assert filled[rollout.prompt_index] is None, f"prompt {rollout.prompt_index} filled twice"
                    filled[rollout.prompt_index] = rollout
                if on_chunk is not None:
                    on_chunk(rollouts)
        missing = [i for i, r in enumerate(filled) if r is None]
        assert not missing, f"prompts {missing[:8]} got no rollout"
        return RolloutResult(filled, retried_chunks=retried, failed_engines=failed)

    # ------------------------------------------------------------ engine health
    def _start_probe(self, engine: EngineLoad) -> None:
        """After a failure: ask the actor for its state. With retries on, Ray resubmits the call until a restart
        finishes (ActorUnavailableError meanwhile), and fails it with ActorDiedError when the actor is gone for
        good."""
        engine.status = RECOVERING
        self._probes[engine.rank] = self.workers.actor(engine.rank).state.options(max_task_retries=-1).remote()

    def _poll_probes(self, timeout: float = 0.0) -> None:
        if not self._probes:
            return
        ready, _ = ray.wait(list(self._probes.values()), num_returns=len(self._probes), timeout=timeout)
        for rank, ref in list(self._probes.items()):
            if ref not in ready:
                continue
            del self._probes[rank]
            engine = self.engines[rank]
            try:
                state = ray.get(ref)
            except RayActorError:
                engine.status = DEAD
                continue
            engine.status = READY if state["policy_version"] == self.policy_version else STALE
            engine.extra = state

    def wait_until_settled(self, timeout_s: float | None = None) -> list[dict]:
        """Block until no engine is recovering (restarts finished or failed); returns engine_states()."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.ready_timeout_s)
        while self._probes and time.monotonic() < deadline:
            self._poll_probes(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        return self.engine_states()

    def engine_states(self) -> list[dict]:
        self._poll_probes()
        return [{"rank": e.rank, "status": e.status, "completed_chunks": e.completed_chunks, "failures": e.failures,
                 "policy_version": e.extra.get("policy_version")} for e in self.engines]

    def _describe(self) -> str:
        return ", ".join(f"engine {e.rank}: {e.status}" for e in self.engines)

    def _usable(self) -> list[EngineLoad]:
        return [e for e in self.engines if e.status in (READY, STALE)]

    # ------------------------------------------------------------ weight sync
    def sync_weights_from(self, trainer_group, version: int, channel: str | None = None,
                          timeout_s: float = 300.0) -> dict[str, float]:
        """Stream the trainer group's weights (its workers mix in WeightSyncSourceMixin) into every live engine
        and stamp them with `version`. Stale engines (restarted) are brought up to date too."""
        if self.shares_trainer_weights:
            return self._adopt_version(version, timeout_s)
        with self._weight_update_turn():
            for attempt in range(len(self.engines)):
                targets, states = self._answering_targets()
                try:
                    stats = self._send_from(trainer_group, targets, states, version, channel, timeout_s)
                except Exception:
                    self._mark_stale(targets)                # they may hold a mix of old and new layers
                    # an engine lost mid-sync (its host gone) breaks the broadcast for all: drop it and resend to
                    # the others; with every engine answering, the failure is the trainer's and is raised
                    if len(self._states_of(targets)) == len(targets) or attempt == len(self.engines) - 1:
                        raise
                    continue
                self._mark_synced(targets, version)
                return {**stats, "weight_sync/engines": float(len(targets))}
        raise AssertionError("unreachable")

    def _adopt_version(self, version: int, timeout_s: float) -> dict[str, float]:
        """The engines generate with the trainer's own tensors: stamp the version, send nothing."""
        with self._weight_update_turn():
            start, targets = time.perf_counter(), self._sync_targets()
            ray.get([self.workers.call_rank_async(e.rank, "adopt_policy_version", version) for e in targets],
                    timeout=timeout_s)
            self._mark_synced(targets, version)
            return {"weight_sync/bytes": 0.0, "weight_sync/seconds": time.perf_counter() - start,
                    "weight_sync/version": float(version), "weight_sync/engines": float(len(targets))}

    def _send_from(self, trainer_group, targets: list[EngineLoad], states: list[dict], version: int,
                   channel: str | None, timeout_s: float) -> dict[str, float]:
        """One sync attempt to `targets`: (re)connect the channel when needed, then stream."""
        handles = [self.workers.actor(e.rank) for e in targets]
        kind = resolve_channel(channel or self.section.weight_sync_channel,
                               trainer_group.call_rank(0, "weight_sync_placement"), states)
        # (Re)connect when the trainer, channel or set of engines changed, or when an engine lost its place in
        # the broadcast group (a restarted actor starts outside it).
        key = (id(trainer_group), kind, tuple(e.rank for e in targets))
        rejoin = kind in ("gloo", "nccl") and any(s["weight_group_id"] != self._group_id for s in states)
        if key != self._channel_key or rejoin:
            self._group_id = f"{self.name}-{uuid.uuid4().hex[:8]}"
            self._channel_key = None                 # a failed connect must not look connected
            trainer_group.call_all("connect_weight_receivers", kind, handles,
                                   [s["ranks_per_engine"] for s in states],
                                   int(self.section.weight_sync_bucket_mb * (1 << 20)), self._group_id, timeout_s)
            self._channel_key = key
        return trainer_group.call_all("send_weights", version)[0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int,
                     timeout_s: float = 300.0) -> dict[str, float]:
        """Stream weights held by this (driver) process to every live engine through the object store, e.g. a
        checkpoint read from disk. Same session protocol as a trainer sync; timeout_s bounds each wait."""
        if self.shares_trainer_weights:
            raise ValueError(f"generator group {self.name!r} generates with the trainer's own weights: load them "
                             f"into the trainer")
        with self._weight_update_turn():
            targets = self._sync_targets()
            channel = ObjectStoreChannel()
            channel.connect([self.workers.actor(e.rank) for e in targets], [1] * len(targets), "driver", timeout_s)
            try:
                stats = WeightSender(channel, int(self.section.weight_sync_bucket_mb * (1 << 20))).send(weights,
                                                                                                         version)
            except Exception:
                self._mark_stale(targets)
                raise
            self._mark_synced(targets, version)
            return stats

    @contextmanager
    def _weight_update_turn(self):
        """The lock for a weight update. Announced first, so that a partial-rollout generate hands the lock over at
        its next segment boundary instead of finishing the whole batch."""
        with self._waiting:
            self._syncs_waiting += 1
        with self._lock:
            try:
                yield
            finally:
                with self._waiting:
                    self._syncs_waiting -= 1
                self._turn.notify_all()

    def _sync_targets(self) -> list[EngineLoad]:
        """The engines a weight sync goes to: the usable ones. Recovering engines are waited for only when no other
        is usable: a restart can wait for a node that is gone (its bundle has nowhere to go) while the job goes on
        with the engines it has; one that comes back later is stale and joins the next sync."""
        self._poll_probes()
        if not self._usable():
            self.wait_until_settled()
        if not self._usable():
            raise RuntimeError(f"generator group {self.name!r}: no live engine to sync ({self._describe()})")
        return self._usable()

    def _answering_targets(self) -> tuple[list[EngineLoad], list[dict]]:
        """The sync targets that answer a state call, and their states. An engine lost since its last chunk (its
        host killed between a generate and this sync) is left out."""
        while True:
            targets = self._sync_targets()
            states = self._states_of(targets)
            if len(states) == len(targets):
                return targets, [states[e.rank] for e in targets]

    def _states_of(self, targets: list[EngineLoad], timeout_s: float = 30.0) -> dict[int, dict]:
        """Each target's state, by rank. One that does not answer within timeout_s (or whose actor is gone) is
        probed like an engine that failed a chunk, so it is left out until it comes back."""
        refs = {engine.rank: self.workers.call_rank_async(engine.rank, "state") for engine in targets}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        states = {}
        for engine in targets:
            try:
                if refs[engine.rank] in ready:
                    states[engine.rank] = ray.get(refs[engine.rank])
                    continue
            except RayActorError:
                pass
            engine.failures += 1
            self._start_probe(engine)
        return states

    def _mark_stale(self, targets: list[EngineLoad]) -> None:
        """A sync failed part-way: no engine it touched may generate until a sync succeeds."""
        for engine in targets:
            if engine.status == READY:
                engine.status = STALE

    def _mark_synced(self, targets: list[EngineLoad], version: int) -> None:
        self.policy_version = version
        for engine in targets:
            engine.status = READY
            engine.extra["policy_version"] = version
        for engine in self.engines:
            if engine.status == READY and engine not in targets:
                engine.status = STALE

    # ------------------------------------------------------------ lifetime
    def inject_crash_on_next_generate(self, rank: int) -> None:
        """Fault drill: engine `rank` kills its own process when its next chunk arrives."""
        self.workers.call_rank(rank, "inject_crash_on_next_generate")

    def shutdown(self) -> None:
        if not self.shares_trainer_weights:         # engines inside trainer ranks stop with their group
            self.workers.shutdown()

