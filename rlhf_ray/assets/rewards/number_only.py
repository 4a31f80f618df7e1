"""A verifiable format reward for the bundled arithmetic prompts ("What is 3 + 5?"; the system hint says "Answer
with the number only"): how much of the response is a number.

    reward = digits / non-space characters of the response       (0 for an empty response)

It gives partial credit, so a randomly initialised tiny model (whose responses are random tokens, ~10% of them
digits) gets a useful learning signal from the first step and learns the format in a few dozen GRPO updates.
Use it through the rule-reward path:

    rlhf-ray grpo ... --reward_fn rlhf_ray/assets/rewards/number_only.py:number_only
"""


def number_only(prompt: str, response: str, gt_answer: str | None) -> dict:
    text = "".join(response.split())
    digits = sum(char.isdigit() for char in text)
    return {"reward": digits / len(text) if text else 0.0, "all_digits": float(bool(text) and digits == len(text))}
