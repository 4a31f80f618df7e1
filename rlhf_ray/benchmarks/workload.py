"""What a rollout benchmark feeds the engines: length distributions, prompt sources, and the decode bound.

Length distributions (`--input_len`, `--output_len`), one value per prompt:
    128                 every prompt 128 tokens
    64:512              uniform integers in [64, 512]
    skewed:32:512:0.1   a long tail: 10% of prompts 512 tokens, the rest 32
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

# Peak memory bandwidth in GB/s of cards people run rollouts on (vendor data sheets); --bandwidth overrides.
KNOWN_BANDWIDTH_GBPS = {
    "H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100 80GB": 1935,
    "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "A10": 600, "RTX 4090": 1008, "MI300X": 5300,
}


@dataclass(frozen=True)
class LengthDist:
    """Token lengths: fixed `low`, uniform in [low, high], or `high` with probability `tail` else `low`."""

    kind: str          # "fixed" | "uniform" | "skewed"
    low: int
    high: int
    tail: float = 0.0

    @classmethod
    def parse(cls, text: str, flag: str) -> LengthDist:
        parts = text.split(":")
        try:
            if len(parts) == 1:
                dist = cls("fixed", int(parts[0]), int(parts[0]))
            elif len(parts) == 2:
                dist = cls("uniform", int(parts[0]), int(parts[1]))
            elif len(parts) == 4 and parts[0] == "skewed":
                dist = cls("skewed", int(parts[1]), int(parts[2]), float(parts[3]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{flag} {text!r}: expected N, LOW:HIGH or skewed:SHORT:LONG:FRACTION "
                             f"(e.g. 128, 64:512, skewed:32:512:0.1)") from None
        if dist.low < 1 or dist.high < dist.low or not 0 <= dist.tail <= 1:
            raise ValueError(f"{flag} {text!r}: lengths must be >= 1 with LOW <= HIGH, FRACTION in [0, 1]")
        return dist

    def sample(self, count: int, rng: random.Random) -> list[int]:
        if self.kind == "fixed":
            return [self.low] * count
        if self.kind == "uniform":
            return [rng.randint(self.low, self.high) for _ in range(count)]
        longs = round(self.tail * count)         # exactly the stated share, at shuffled positions
        lengths = [self.high] * longs + [self.low] * (count - longs)
        rng.shuffle(lengths)
        return lengths

    def describe(self) -> str:
        return {"fixed": f"{self.low}", "uniform": f"uniform {self.low}-{self.high}",
                "skewed": f"{self.low}, {self.tail:.0%} at {self.high}"}[self.kind]


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _token_ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """One user turn through the chat template when the tokenizer has one, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return _token_ids(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                        add_generation_prompt=True, tokenize=True))
    return _token_ids(tokenizer(text, add_special_tokens=True))


def arithmetic_prompts(tokenizer, count: int) -> list[list[int]]:
    """The demo's arithmetic questions, chat-formatted (the default workload)."""
    from rlhf_ray.fixtures.demo_data import make_problems

    return [chat_prompt_ids(tokenizer, p.question) for p in make_problems(count, seed=11)]


def file_prompts(tokenizer, path: str, count: int) -> list[list[int]]:
    """`count` prompts from a file, cycled if it has fewer: JSON lines with "prompt" (text) or "messages" (chat),
    or plain text lines."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--prompts {path!r}: the file has no prompts; give JSON lines with \"prompt\" or "
                         f"\"messages\", or one prompt per line")
    prompts = []
    for line in lines[:count]:
        record = json.loads(line) if line.lstrip().startswith("{") else {"prompt": line}
        if "messages" in record:
            prompts.append(_token_ids(tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True,
                                                                    tokenize=True)))
        else:
            prompts.append(chat_prompt_ids(tokenizer, record["prompt"]))
    return [prompts[i % len(prompts)] for i in range(count)]


def synthetic_prompts(vocab_size: int, lengths: list[int], rng: random.Random) -> list[list[int]]:
    """Random token ids (above the first 16 ids, where tokenizers keep their special tokens)."""
    return [[rng.randrange(16, vocab_size) for _ in range(length)] for length in lengths]


def weight_bytes(model_dir: str) -> int:
    """Bytes of the checkpoint's weight files: what one decode step reads at least once (dense model)."""
    files = list(Path(model_dir).glob("*.safetensors")) or list(Path(model_dir).glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def device_bandwidth_gbps(requested: float | None) -> tuple[float | None, str]:
    """(GB/s, where it came from): --bandwidth, else the first GPU's name in KNOWN_BANDWIDTH_GBPS, else None."""
    if requested:
        return requested, "--bandwidth"
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for card, gbps in KNOWN_BANDWIDTH_GBPS.items():
            if card.lower() in name.lower():
                return float(gbps), f"table ({name})"
        return None, f"{name} is not in the table; pass --bandwidth GBps"
    return None, "CPU: pass --bandwidth GBps (e.g. from a STREAM run) for the bound"


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50/p90/p99 (nearest rank) of values, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return {f"p{q}": ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in (50, 90, 99)}
