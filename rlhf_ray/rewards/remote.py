"""A client for a remote reward server over HTTP (a verifier sandbox, a judge model, a team's scoring service).

Protocol: one POST of JSON per batch (or per `batch_size` slice):

    request  {"prompts": [...], "responses": [...], "gt_answers": [... or null],
              "query": [prompt + response, ...], "labels": [...]}       # the last two for OpenRLHF-style servers
    response {"rewards": [float, ...], "metrics": {"name": float, ...}}  # metrics optional

Connection errors, timeouts, HTTP 429 and 5xx are retried `retries` times with exponential backoff; other 4xx
answers, redirects (never followed: requests go only to the configured URL) and malformed bodies fail at once
(retrying cannot fix them). Every failure is one RemoteRewardError
naming the URL, the attempts made and what came back (status and first bytes, or the connection error). Server metrics are averaged over slices and
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


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Requests go only to the URL the config names: a redirect (which would resend the headers, an Authorization
    token among them, to another address) comes back as the HTTPError of its 3xx answer."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


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
            raw, tries = self._post({
                "prompts": prompts[start:end], "responses": responses[start:end],
                "gt_answers": gt_answers[start:end],
                "query": [p + r for p, r in zip(prompts[start:end], responses[start:end])],
                "labels": gt_answers[start:end],
            })
            attempts += tries
            slices += 1
            try:
                body = self._decode(raw, expected=len(responses[start:end]), offset=start)
            except (TypeError, ValueError) as exc:      # retrying cannot fix a malformed answer
                raise RemoteRewardError(f"reward server {self.url}, attempt {tries} of {self.retries + 1}: {exc}; "
                                        f"the answer must be JSON {{\"rewards\": [one number per response]}}") from None
            rewards.extend(body["rewards"])
            for key, total in body["metrics"].items():
                metric_sums[key] = metric_sums.get(key, 0.0) + total
        metrics = {f"reward/remote/{key}": total / slices for key, total in metric_sums.items()}
        metrics["reward/remote_attempts"] = float(attempts)
        return RewardResult(rewards, metrics)

    def _post(self, payload: dict[str, Any]) -> tuple[bytes, int]:
        """(the answer's body, attempts made). Connection errors, timeouts, 408/429/5xx are retried with backoff
        (`backoff_s`, doubling); other HTTP errors fail at once. Every attempt is bounded by timeout_s."""
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **self.headers}
        last_error = "no attempt made"
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                time.sleep(self.backoff_s * 2 ** (attempt - 2))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=self.timeout_s) as reply:
                    return reply.read(), attempt
            except urllib.error.HTTPError as error:
                last_error = f"HTTP {error.code} {error.reason}: {error.read()[:300].decode(errors='replace')!r}"
                if 300 <= error.code < 400:
                    raise RemoteRewardError(f"reward server {self.url} redirected to {error.headers.get('Location')}"
                                            f" ({last_error}); redirects are not followed: set --reward_url to the "
                                            f"address that answers") from None
                if error.code not in RETRYABLE_STATUS:
                    raise RemoteRewardError(f"reward server {self.url} refused the request on attempt {attempt}: "
                                            f"{last_error}") from None
            except TimeoutError:
                last_error = f"no answer within timeout_s={self.timeout_s}"
            except urllib.error.URLError as error:
                reason = error.reason
                last_error = (f"no answer within timeout_s={self.timeout_s}" if isinstance(reason, TimeoutError)
                              else f"connection failed: {reason}")
            except OSError as error:  # connection reset mid-answer and the like
                last_error = f"{type(error).__name__}: {error}"
        raise RemoteRewardError(f"reward server {self.url} failed {self.retries + 1} attempt(s); last error: "
                                f"{last_error}. Check that it runs and is reachable, or raise timeout_s / retries")

    def _decode(self, raw: bytes, expected: int, offset: int) -> dict[str, Any]:
        """{"rewards": [float] * expected, "metrics": {name: float}} from the answer; ValueError/TypeError naming
        what came back otherwise."""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"the answer is not JSON (first bytes: {raw[:200].decode(errors='replace')!r})") from None
        rewards = body.get("rewards") if isinstance(body, dict) else None
        if not isinstance(rewards, list):
            keys = f"keys {sorted(body)}" if isinstance(body, dict) else f"a {type(body).__name__}"
            raise ValueError(f"the answer has no 'rewards' list ({keys})")
        if len(rewards) != expected:
            raise ValueError(f"it returned {len(rewards)} rewards for {expected} responses")
        return {"rewards": [as_reward(value, f"sample {offset + index}") for index, value in enumerate(rewards)],
                "metrics": {key: as_reward(value, f"metric {key!r}")
                            for key, value in (body.get("metrics") or {}).items()}}
