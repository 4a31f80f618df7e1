"""Built-in verifiable rewards: a GSM8K final-answer checker and an exact-number checker for the bundled
arithmetic data (`rlhf_ray/fixtures/demo_data.py`). Reward 1.0 for a correct answer, 0.0 otherwise.

Final-answer extraction (GSM8K), first match wins:
    1. "#### <number>"      (the GSM8K solution format; the last such marker)
    2. "\\boxed{<number>}"   (the last box, as math-tuned models write it)
    3. the last number in the text
Numbers may carry thousands separators, a leading "$", a trailing "." or "%"; "a/b" fractions are read as a / b.
Comparison is numeric: |predicted - expected| <= 1e-6 * max(1, |expected|).
"""

from __future__ import annotations

import re

from rlhf_ray.rewards.base import REWARD_SOURCES, RewardResult, RewardSource

# A sign binds only when not preceded by a word character, so "5-3" reads as 5 and 3, not 5 and -3.
NUMBER = (r"(?<![\w.])(?:[-+−]?\$\s?|\$\s?[-+−]?|[-+−])?"  # optional sign / dollar
          r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"          # digits with thousands separators, decimals
          r"(?:\s*/\s*\d+(?:\.\d+)?)?")                   # an optional "/ denominator"
_NUMBER_RE = re.compile(NUMBER)
_HASH_RE = re.compile(r"####\s*(" + NUMBER + ")")
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")


def parse_number(text: str) -> float | None:
    """'1,234.5' -> 1234.5, '-$3' -> -3, '3/4' -> 0.75; None when `text` holds no number."""
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    cleaned = match.group(0).replace(",", "").replace("$", "").replace("−", "-").replace(" ", "")
    if "/" in cleaned:
        numerator, denominator = cleaned.split("/")
        return float(numerator) / float(denominator) if float(denominator) != 0 else None
    return float(cleaned)


def extract_final_answer(text: str) -> float | None:
    """The final numeric answer of a solution text (see the module docstring for the order); None if none."""
    markers = _HASH_RE.findall(text)
    if markers:
        return parse_number(markers[-1])
    boxes = _BOXED_RE.findall(text)
    for box in reversed(boxes):
        value = parse_number(box)
        if value is not None:
            return value
    numbers = _NUMBER_RE.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def numbers_equal(predicted: float, expected: float, rel_tol: float = 1e-6) -> bool:
    return abs(predicted - expected) <= rel_tol * max(1.0, abs(expected))


def _expected_answer(gt_answer: str | None, source: str, index: int) -> float:
    if gt_answer is None:
        raise ValueError(f"reward_source={source!r} needs a ground-truth answer for every prompt (sample {index} "
                         f"has none); keep the dataset's answer/label column when preparing prompts")
    expected = extract_final_answer(str(gt_answer))
    if expected is None:
        raise ValueError(f"reward_source={source!r}: ground-truth answer of sample {index} holds no number: "
                         f"{str(gt_answer)[:80]!r}")
    return expected


@REWARD_SOURCES.register("gsm8k")
class GSM8KReward(RewardSource):
    """1.0 when the response's final answer equals the ground truth's (a full GSM8K solution or a bare number).

    Metrics: `reward/accuracy`, `reward/format_rate` (share of responses with an extractable answer).
    """

    name = "gsm8k"

    def compute_rewards(self, prompts, responses, gt_answers) -> RewardResult:
        rewards, extracted = [], 0
        for index, (response, gt_answer) in enumerate(zip(responses, gt_answers)):
            expected = _expected_answer(gt_answer, self.name, index)
            predicted = extract_final_answer(response)
            extracted += predicted is not None
            rewards.append(1.0 if predicted is not None and numbers_equal(predicted, expected) else 0.0)
        count = max(len(responses), 1)
        return RewardResult(rewards, {"reward/accuracy": sum(rewards) / count, "reward/format_rate": extracted / count})


@REWARD_SOURCES.register("arithmetic")
class ArithmeticReward(RewardSource):
    """Exact integer answers for the bundled arithmetic prompts ("What is 3 - 5?" with label "-2").

    The first number in the response must equal the label exactly. With `strict=True` the response must also be
    nothing but that number (surrounding whitespace aside), as the data's system hint asks.

    Metrics: `reward/accuracy`, `reward/format_rate` (share of responses that are exactly one number).
    """

    name = "arithmetic"
    _ONLY_NUMBER = re.compile(r"\s*[-+−]?\d+\s*")

    def __init__(self, strict: bool = False):
        self.strict = strict

    def compute_rewards(self, prompts, responses, gt_answers) -> RewardResult:
        rewards, well_formed = [], 0
        for index, (response, gt_answer) in enumerate(zip(responses, gt_answers)):
            expected = _expected_answer(gt_answer, self.name, index)
            only_number = self._ONLY_NUMBER.fullmatch(response) is not None
            well_formed += only_number
            first = re.search(r"[-+−]?\d+(?:\.\d+)?", response)
            predicted = float(first.group(0).replace("−", "-")) if first else None
            correct = predicted is not None and predicted == expected and (only_number or not self.strict)
            rewards.append(1.0 if correct else 0.0)
        count = max(len(responses), 1)
        return RewardResult(rewards, {"reward/accuracy": sum(rewards) / count,
                                      "reward/format_rate": well_formed / count})
