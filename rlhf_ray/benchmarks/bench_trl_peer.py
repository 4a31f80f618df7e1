"""Peer benchmark: TRL's GRPOTrainer against `rlhf-ray grpo`, the same GRPO job on the same machine.

    python -m rlhf_ray.benchmarks.bench_trl_peer --setup              # pip-installs the pinned trl (make bench-trl)
    python -m rlhf_ray.benchmarks.bench_trl_peer --sizes demo heavy

TRL is a benchmark-only dependency: --setup installs TRL_PIN into this interpreter's environment with the
installed torch / transformers / accelerate / datasets as constraints, so nothing of ours is replaced; `make test`
never installs it.

Both sides run the same job: the demo's arithmetic prompts (chat-formatted; rlhf-ray through its tiny template,
TRL through the tokenizer's chat template), the same tiny Llama, P prompts x n samples per step, exactly T new
tokens per sample (rlhf-ray --ignore_eos, TRL min_new_tokens = max_completion_length), one optimizer step per step
over all P x n completions (TRL in one forward/backward; rlhf-ray in micro-batches of the size's micro_batch rows,
the whole batch on demo), AdamW at the same lr (no weight decay, cosine decay, no warm-up, grad clip 1.0),
KL coefficient 0.001 against a reference model, clip 0.2, token-mean loss, group-normalised advantages, the
number_only rule reward, a final save. rlhf-ray runs as the demo's GRPO stage does (--colocate_all, one vLLM
engine; rlhf_ray_hf: the same with --backend hf, whose lean KV-cache decode loop runs on the policy's own module);
TRL in one process with transformers generate. Every core is used by both: TRL's torch at its default threads,
each colocated rlhf-ray role at --cpus_per_worker/--cpus_per_engine = the core count (the roles take turns in sync
mode).
--ignore_eos in rlhf-ray also ignores the template's end-of-turn id, so both generate exactly T tokens per sample
(checked from rlhf-ray's metrics). Sizes (default steps, repeats, systems):
    demo    'debug' tiny Llama (the demo's model, 0.46M params), 4 prompts x 8 samples x 32 tokens; 50 steps, 2
            repeats, trl / rlhf_ray / rlhf_ray_hf
    heavy   'bench' tiny Llama (13M params), 32 prompts x 8 samples x 256 tokens (generation dominates); 3 steps,
            1 repeat (a TRL step takes minutes here), trl / rlhf_ray
Each run is a fresh process (rlhf-ray: the CLI with its own local Ray), the systems alternate (rotated order each
repeat). Measured per run: end-to-end wall time (process start to exit), start-up (to the first step), s/step
(median over the steps after the first), generated tokens/s over the steps, and peak memory (the largest sum of
RSS over the run's process tree, sampled every 0.25 s; pages shared between processes count once per process).
Start-up: TRL from its worker's start (before importing trl) to the first step; rlhf-ray from the job's start
(before Ray starts) to the first generation.
Ratios are rlhf-ray's advantage: TRL s/step / rlhf-ray s/step (= steps/s ratio), TRL wall / rlhf-ray wall,
tokens/s ratio, and rlhf-ray memory / TRL memory. Writes <--out>/trl_peer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, results_dir, write_report

TRL_PIN = "trl==1.16.0"
CONSTRAINED = ("torch", "transformers", "accelerate", "datasets")
# Per size: the job, and the default steps, repeats and systems (a heavy TRL step takes minutes here).
# micro_batch: rlhf-ray's rows per training micro-batch and per scoring pass. TRL trains and scores the whole batch
# at once (per_device_train_batch_size = P x n); the demo matches it, the heavy size keeps 16 (memory).
SIZES = {"demo": {"flavour": "debug", "prompts": 4, "n": 8, "tokens": 32, "steps": 50, "kv_cache_gib": 0.25,
                  "micro_batch": 32, "repeats": 2, "systems": ["trl", "rlhf_ray", "rlhf_ray_hf"]},
         # the KV cache holds the whole batch: 256 sequences x 3 blocks of 128 tokens (vLLM's CPU block; prompt
         # <= 64 + 256 new) x 16 KiB per token (fp32, 4 layers, 8 KV heads x 64) = 1.5 GiB; 1 GiB ran ~170 at once
         "heavy": {"flavour": "bench", "prompts": 32, "n": 8, "tokens": 256, "steps": 3, "kv_cache_gib": 2.0,
                   "micro_batch": 16, "repeats": 1, "systems": ["trl", "rlhf_ray"]}}
LR, KL_COEF = 5e-3, 0.001
# Both systems may use every core: TRL's one process runs torch with its default threads (one per core); rlhf-ray's
# colocated roles take turns in sync mode, so each gets every core for its phase (threads = its reserved CPUs).
CPUS = os.cpu_count() or 1


def setup_trl() -> int:
    """pip install TRL_PIN next to the installed torch/transformers/accelerate/datasets, which stay as they are."""
    import tempfile
    from importlib.metadata import version

    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("".join(f"{name}=={version(name)}\n" for name in CONSTRAINED))
        constraints.flush()
        return subprocess.call([sys.executable, "-m", "pip", "install", "-c", constraints.name, TRL_PIN])


class PeakTreeRSS:
    """Samples the summed RSS of a process and its descendants in a thread; .peak is the largest sum, bytes."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        import psutil

        self.root, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak tree RSS bytes, exit status) of one command, its output to `log`."""
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        sampler = PeakTreeRSS(proc.pid)
        status = proc.wait()
    return time.perf_counter() - start, sampler.stop(), status


def prepare_inputs(work: Path, size: dict, env: dict) -> tuple[Path, Path, list[str]]:
    """The model, rlhf-ray's prepared prompt data and the same questions as text for TRL."""
    from rlhf_ray.fixtures.demo_data import make_problems, prompt_rows, write_jsonl
    from rlhf_ray.fixtures.tiny import build_tiny_model

    model = build_tiny_model(work / f"model-{size['flavour']}", flavour=size["flavour"], seed=0)
    problems = make_problems(1024, seed=0, max_operand=10)[512:768]       # the demo's RL prompts
    write_jsonl(prompt_rows(problems), work / "prompt.jsonl")
    data = work / "data-prompt"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "prepare", "--type", "prompt", "--input",
                        str(work / "prompt.jsonl"), "--tokenizer_dir", str(model), "--conversation_template_config",
                        str(assets() / "templates" / "tiny.json"), "--output", str(data), "--max_length", "128"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    return model, data, [p.question for p in problems]


def assets() -> Path:
    return Path(__file__).resolve().parent.parent / "assets"          # shipped inside the package


# The systems: TRL, and rlhf-ray with each generation backend (vLLM, its default, and transformers generate, which
# has no per-step engine overhead and no vLLM import: the choice for a very small model).
SYSTEMS = {"trl": None, "rlhf_ray": "vllm", "rlhf_ray_hf": "hf"}


def rlhf_ray_command(size: dict, model: Path, data: Path, log_dir: Path, backend: str = "vllm") -> list[str]:
    batch, micro = size["prompts"] * size["n"], size["micro_batch"]
    return [sys.executable, "-m", "rlhf_ray.cli", "grpo", "--pretrain", str(model), "--prompt_dataset", str(data),
            "--conversation_template_config", str(assets() / "templates" / "tiny.json"),
            "--reward_fn", f"{assets() / 'rewards' / 'number_only.py'}:number_only",
            "--num_episodes", str(size["steps"]), "--experience_batch_size", str(size["prompts"]),
            "--n_samples_per_prompt", str(size["n"]), "--max_new_tokens", str(size["tokens"]), "--ignore_eos",
            "--max_prompt_len", "64", "--kv_cache_gib", str(size["kv_cache_gib"]),
            "--train_batch_size", str(min(micro, batch)), "--accumulation_steps", str(max(1, batch // micro)),
            "--forward_batch_size", str(micro), "--num_update_steps", "1", "--lr", str(LR), "--kl_coef", str(KL_COEF),
            "--warmup_steps", "0", "--weight_decay", "0", "--grad_clip", "1.0", "--colocate_all",
            *[flag for name in ("--cpus_per_worker", "--ref_cpus_per_worker", "--cpus_per_engine")
              for flag in (name, str(CPUS))],
            "--tensorboard", "false", "--progress", "false", "--save_path", str(log_dir / "ckpt"),
            "--log_dir", str(log_dir), "--backend", backend]


def rlhf_ray_steps(log_dir: Path) -> tuple[list[float], float | None, set[float]]:
    """(seconds of each step, start-up seconds, the steps' mean response lengths) from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["timing/episode"] for r in rows if "timing/episode" in r]
    # start-up as TRL's is measured: from the job's start (before Ray) to the first generation
    startup = next((r["startup/to_first_generation_s"] for r in rows if "startup/to_first_generation_s" in r), None)
    lengths = {r["rollout/response_len_mean"] for r in rows if "rollout/response_len_mean" in r}
    return steps, startup, lengths


def phase_medians(log_dir: Path) -> dict[str, float]:
    """Median seconds of each phase of an rlhf-ray step (generate, score, update, weight_sync) over the steps."""
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {phase: statistics.median(r[f"timing/{phase}"] for r in rows if f"timing/{phase}" in r)
            for phase in ("generate", "score", "update", "weight_sync")}


def trl_worker(spec_path: str) -> int:
    """Body of the TRL process: GRPOTrainer on the spec's job; step end times to spec['out']."""
    born = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ray.rewards import load_rule_function

    number_only = load_rule_function(f"{assets() / 'rewards' / 'number_only.py'}:number_only")   # the job's reward

    def reward(completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [number_only("", text, None)["reward"] for text in texts]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks = []

        def on_train_begin(self, *args, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            self.marks.append(time.perf_counter())

    size, batch = spec["size"], spec["size"]["prompts"] * spec["size"]["n"]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in spec["questions"]])
    config = GRPOConfig(
        output_dir=spec["work"], per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=size["n"], max_completion_length=size["tokens"],
        generation_kwargs={"min_new_tokens": size["tokens"]}, steps_per_generation=1, num_iterations=1,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=KL_COEF, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        max_steps=size["steps"], logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    clock = StepClock()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=config, train_dataset=dataset,
                          callbacks=[clock])
    trainer.train()
    trainer.save_model(spec["work"] + "/final")
    marks = clock.marks
    Path(spec["out"]).write_text(json.dumps({"startup_s": marks[0] - born,
                                             "steps": [b - a for a, b in zip(marks, marks[1:])]}))
    return 0


def summarise(wall: float, peak: int, steps: list[float], startup: float | None, size: dict) -> dict:
    tokens = size["prompts"] * size["n"] * size["tokens"]
    assert len(steps) == size["steps"], (len(steps), size["steps"])
    return {"wall_s": wall, "startup_s": startup, "s_per_step": statistics.median(steps[1:] or steps),
            "first_step_s": steps[0], "steps_s_total": sum(steps), "generated_tokens_per_s": tokens * len(steps) /
            sum(steps), "peak_rss_gib": peak / 2**30}


def run_size(name: str, size: dict, repeats: int, work: Path, env: dict, systems: list[str]) -> dict:
    model, data, questions = prepare_inputs(work, size, env)
    runs = {system: [] for system in systems}
    for repeat in range(repeats):
        order = systems[repeat % len(systems):] + systems[:repeat % len(systems)]      # rotated each repeat
        for system in order:
            run_dir = work / f"{system}-{repeat}"
            run_dir.mkdir(parents=True, exist_ok=True)
            if system == "trl":
                spec = {"size": size, "model": str(model), "questions": questions, "work": str(run_dir),
                        "out": str(run_dir / "steps.json")}
                (run_dir / "spec.json").write_text(json.dumps(spec))
                cmd = [sys.executable, "-m", "rlhf_ray.benchmarks.bench_trl_peer", "--trl_worker",
                       str(run_dir / "spec.json")]
            else:
                cmd = rlhf_ray_command(size, model, data, run_dir, SYSTEMS[system])
            wall, peak, status = run_measured(cmd, env, run_dir / "output.log")
            if status:
                raise RuntimeError(f"{system} exited with {status}; see {run_dir / 'output.log'}")
            if system == "trl":
                measured = json.loads((run_dir / "steps.json").read_text())
                steps, startup = measured["steps"], measured["startup_s"]
            else:
                steps, startup, lengths = rlhf_ray_steps(run_dir)
                if lengths != {float(size["tokens"])}:             # the same job: exactly T tokens per sample
                    raise RuntimeError(f"{system} generated mean lengths {sorted(lengths)}, not {size['tokens']}")
            runs[system].append(summarise(wall, peak, steps, startup, size))
            if system != "trl":
                runs[system][-1]["phases_s"] = phase_medians(run_dir)
            row = runs[system][-1]
            print(f"{name} {system:8s} repeat {repeat}: {row['s_per_step']:.3f} s/step, wall {row['wall_s']:.1f} s "
                  f"(start-up {row['startup_s'] or float('nan'):.1f} s), {row['generated_tokens_per_s']:.0f} tok/s, "
                  f"peak {row['peak_rss_gib']:.2f} GiB", flush=True)
    best = {s: min(rs, key=lambda r: r["s_per_step"]) for s, rs in runs.items()}
    median = lambda key, s: statistics.median(r[key] for r in runs[s])  # noqa: E731
    ratios = {}
    for ours in (s for s in systems if s != "trl"):
        ratios[ours] = {"steps_per_s_over_trl": median("s_per_step", "trl") / median("s_per_step", ours),
                        "wall_trl_over_ours": median("wall_s", "trl") / median("wall_s", ours),
                        "tokens_per_s_over_trl": median("generated_tokens_per_s", ours) /
                        median("generated_tokens_per_s", "trl"),
                        "peak_memory_over_trl": median("peak_rss_gib", ours) / median("peak_rss_gib", "trl")}
        print(f"{name} {ours}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios[ours].items()), flush=True)
    return {"workload": {**size, "model": f"tiny-{size['flavour']}"}, "runs": runs, "best": best,
            "ratios_of_medians": ratios}   # per rlhf-ray system, against TRL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_trl_peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help=f"pip install {TRL_PIN} (constrained) and exit")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["demo"], help="workloads to run")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 50 demo, 3 heavy)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per system and size, alternating "
                                                                  "(default: 2 demo, 1 heavy)")
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=None,
                        help="what to run: trl, rlhf_ray (vLLM generation), rlhf_ray_hf (--backend hf); default: "
                             "all three on demo, trl and rlhf_ray on heavy")
    parser.add_argument("--trl_worker", default=None, help=argparse.SUPPRESS)
    add_out_flag(parser)
    args = parser.parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    if args.setup:
        return setup_trl()
    try:
        from importlib.metadata import version

        trl_version = version("trl")
    except Exception:
        parser.error(f"trl is not installed; run `python -m rlhf_ray.benchmarks.bench_trl_peer --setup` "
                     f"(or `make bench-trl`), which installs {TRL_PIN}")
    results = results_dir(args.out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}      # rlhf-ray starts its own local Ray
    env.pop("OMP_NUM_THREADS", None)                                     # torch's default: a thread per core
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="offline", RAY_USAGE_STATS_ENABLED="0", TRANSFORMERS_VERBOSITY="error")
    sizes = {}
    if args.systems and "trl" not in args.systems:
        parser.error("--systems must include trl (the ratios are against it)")
    for name in args.sizes:
        size = {**SIZES[name], **{key: value for key, value in (("steps", args.steps), ("repeats", args.repeats),
                                                                ("systems", args.systems)) if value}}
        sizes[name] = run_size(name, size, size["repeats"], results / "trl_peer" / name, env, size["systems"])
    write_report(results, "trl_peer.json", {
        "benchmark": "trl_peer", "trl": trl_version, "sizes": sizes,
        "cores": CPUS, "threads": f"TRL: torch default ({CPUS}); rlhf-ray: {CPUS} per colocated role",
        "load_average_at_end": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
