"""A client for a remote reward server over HTTP (a verifier sandbox, a judge model, a team's scoring service).

Protocol: one POST of JSON per batch (or per `batch_size` slice):

    request  {"prompts": [...], "responses": [...], "gt_answers": [... or null],
              "query": [prompt + response, ...], "labels": [...]}       # the last two for OpenRLHF-style servers
    response {"rewards": [float, ...], "metrics": {"name": float, ...}}  # metrics optional

Connection errors, timeouts, HTTP 429 and 5xx are retried `retries` times with exponential backoff; other 4xx
answers and malformed bodies fail at once (retrying cannot fix them). Server metrics are averaged over slices and
reported as `reward/remote/<name>`; `reward/remote_attempts` counts the HTTP requests made.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from rlhf_ray.rewards.base import REWARD_SOURCES, RewardResult, RewardSource, as_reward

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or answered wrongly; the message says which and how to fix it."""


@REWARD_SOURCES.register("remote")
class RemoteReward(RewardSource):
    """POSTs batches to `url`.

    Args:
        url: the scoring endpoint, e.g. http://reward-server:8000/score.
        timeout_s: seconds to wait for one answer.
        retries: extra attempts after a failed one (0 = try once).
        backoff_s: wait before the first retry; doubles on each further retry.
        batch_size: responses per request; None sends the whole batch at once.
        headers: extra HTTP headers (e.g. an Authorization token).
    """

    name = "remote"

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 batch_size: int | None = None, headers: dict[str, str] | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward url must start with http:// or https:// (got {url!r})")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"remote reward needs timeout_s > 0, retries >= 0, backoff_s >= 0 (got {timeout_s}, "
                             f"{retries}, {backoff_s})")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"remote reward batch_size must be >= 1 or None (got {batch_size})")
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.batch_size = batch_size
        self.headers = dict(headers or {})

    def compute_rewards(self, prompts, responses, gt_answers) -> RewardResult:
        step = self.batch_size or max(len(responses), 1)
        rewards: list[float] = []
        metric_sums: dict[str, float] = {}
        slices, attempts = 0, 0
        for start in range(0, len(responses), step):
            end = start + step
            body, tries = self._post({
                "prompts": prompts[start:end], "responses": responses[start:end],
                "gt_answers": gt_answers[start:end],
                "query": [p + r for p, r in zip(prompts[start:end], responses[start:end])],
                "labels": gt_answers[start:end],
            })
            attempts += tries
            slices += 1
            rewards.extend(self._parse(body, expected=len(responses[start:end]), offset=start))
            for key, value in (body.get("metrics") or {}).items():
                metric_sums[key] = metric_sums.get(key, 0.0) + as_reward(value, f"reward server metric {key!r}")
        metrics = {f"reward/remote/{key}": total / slices for key, total in metric_sums.items()}
        metrics["reward/remote_attempts"] = float(attempts)
        return RewardResult(rewards, metrics)

    def _post(self, payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **self.headers}
        last_error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode(errors="replace")
                if error.code not in RETRYABLE_STATUS:
                    raise RemoteRewardError(f"reward server {self.url} refused the request: HTTP {error.code} "
                                            f"{error.reason}: {detail}") from None
                last_error = f"HTTP {error.code} {error.reason}: {detail}"
                continue
            except TimeoutError:
                last_error = f"no answer within timeout_s={self.timeout_s}"
                continue
            except urllib.error.URLError as error:
                reason = error.reason
                last_error = (f"no answer within timeout_s={self.timeout_s}" if isinstance(reason, TimeoutError)
                              else f"connection failed: {reason}")
                continue
            except OSError as error:  # connection reset mid-answer and the like
                last_error = f"{type(error).__name__}: {error}"
                continue
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                raise RemoteRewardError(f"reward server {self.url} answered with non-JSON: "
                                        f"{raw[:200].decode(errors='replace')!r}") from None
            if not isinstance(body, dict):
                raise RemoteRewardError(f"reward server {self.url} answered with {type(body).__name__}; expected "
                                        f'a JSON object {{"rewards": [...]}}')
            return body, attempt + 1
        raise RemoteRewardError(f"reward server {self.url} failed {self.retries + 1} attempt(s); last error: "
                                f"{last_error}. Check that it runs and is reachable, or raise timeout_s / retries")

    def _parse(self, body: dict[str, Any], expected: int, offset: int) -> list[float]:
        rewards = body.get("rewards")
        if not isinstance(rewards, list):
            raise RemoteRewardError(f"reward server {self.url} answered without a 'rewards' list (keys: "
                                    f"{sorted(body)})")
        if len(rewards) != expected:
            raise RemoteRewardError(f"reward server {self.url} returned {len(rewards)} rewards for {expected} "
                                    f"responses")
        return [as_reward(value, f"reward server {self.url} for sample {offset + index}")
                for index, value in enumerate(rewards)]
