"""Rule rewards from a user's python file: `--reward_fn path/to/file.py:function_name`.

The function scores one response:

    def my_reward(prompt: str, response: str, gt_answer: str | None) -> float | dict:
        ...

It returns a number (bool counts as 0/1), or a dict with a numeric "reward" and any other numeric entries, which
are averaged over the batch into metrics `reward/rule/<name>`. The file is loaded when first needed in each process
(the source pickles as its spec, so Ray actors load the file themselves; the path must exist where they run).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from pathlib import Path
from typing import Callable

from rlhf_ray.rewards.base import REWARD_SOURCES, RewardResult, RewardSource, as_reward


def load_rule_function(spec: str) -> Callable:
    """Import `path.py:function_name` and return the function, with an error that names what is wrong."""
    path_text, separator, function_name = spec.rpartition(":")
    if not separator or not path_text or not function_name:
        raise ValueError(f"reward function {spec!r} must look like path/to/file.py:function_name")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reward function file {path_text!r} does not exist (resolved to {path.resolve()}); "
                                f"give a path to a .py file, relative to {Path.cwd()} or absolute")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_spec = importlib.util.spec_from_file_location(f"rlhf_ray_reward_rule_{path.stem}_{digest}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward function file {path_text!r} is not a python file that can be imported")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise ImportError(f"reward function file {path_text!r} failed to import: "
                          f"{type(error).__name__}: {error}") from error
    if not hasattr(module, function_name):
        defined = sorted(name for name, value in vars(module).items()
                         if inspect.isfunction(value) and value.__module__ == module.__name__)
        raise ValueError(f"reward function file {path_text!r} defines no {function_name!r}; functions defined "
                         f"there: {', '.join(defined) or '(none)'}")
    function = getattr(module, function_name)
    if not callable(function):
        raise TypeError(f"{spec!r} is a {type(function).__name__}, not a function")
    try:
        inspect.signature(function).bind("prompt", "response", "gt_answer")
    except (TypeError, ValueError) as error:
        raise TypeError(f"reward function {spec!r} must accept (prompt, response, gt_answer): {error}") from None
    return function


@REWARD_SOURCES.register("rule")
class RuleReward(RewardSource):
    """Scores each response with a function loaded from `spec` = "path/to/file.py:function_name"."""

    name = "rule"

    def __init__(self, spec: str):
        self.spec = spec
        self._function = load_rule_function(spec)  # fail early, in the process that reads the config

    def __getstate__(self):
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.spec = state["spec"]
        self._function = None

    def compute_rewards(self, prompts, responses, gt_answers) -> RewardResult:
        if self._function is None:
            self._function = load_rule_function(self.spec)
        rewards: list[float] = []
        extra: dict[str, list[float]] = {}
        for index, (prompt, response, gt_answer) in enumerate(zip(prompts, responses, gt_answers)):
            where = f"reward function {self.spec!r} on sample {index}"
            value = self._function(prompt, response, gt_answer)
            if isinstance(value, dict):
                if "reward" not in value:
                    raise ValueError(f"{where} returned a dict without a 'reward' key (keys: {sorted(value)})")
                for key, item in value.items():
                    if key != "reward":
                        extra.setdefault(key, []).append(as_reward(item, f"{where} (key {key!r})"))
                value = value["reward"]
            rewards.append(as_reward(value, where))
        metrics = {f"reward/rule/{key}": sum(values) / len(values) for key, values in extra.items()}
        return RewardResult(rewards, metrics)
