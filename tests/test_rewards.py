"""Reward sources: rule files (and their errors), the GSM8K and arithmetic checkers (on real GSM8K solutions and
the bundled arithmetic data), the remote client against a real HTTP server on 127.0.0.1, and the one async entry
point that text sources and the reward-model source (on a real Ray group) share."""

from __future__ import annotations

import gzip
import json
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import shared_path
from rlhf_ray.fixtures.demo_data import make_problems, prompt_rows
from rlhf_ray.rewards import (REWARD_SOURCES, RemoteRewardError, RewardBatch, build_reward_source,
                              extract_final_answer, load_rule_function)
from rlhf_ray.workers.base import RankedWorker

# --- rule functions ---------------------------------------------------------------------------------------------

RULE_FILE = '''
def length_bonus(prompt, response, gt_answer):
    return len(response) / 10

def contains_answer(prompt, response, gt_answer):
    hit = gt_answer in response
    return {"reward": hit, "hit": float(hit), "length": len(response)}

def bad_type(prompt, response, gt_answer):
    return "high"

def no_reward_key(prompt, response, gt_answer):
    return {"score": 1.0}

def not_finite(prompt, response, gt_answer):
    return float("nan")

def wrong_arity(prompt):
    return 1.0

THRESHOLD = 3
'''


@pytest.fixture
def rule_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(RULE_FILE)
    return path


def test_rule_function_scores_and_reports_dict_metrics(rule_file):
    source = build_reward_source("rule", spec=f"{rule_file}:contains_answer")
    result = source.score(["q1", "q2"], ["it is 42", "no idea"], ["42", "7"])
    assert result.rewards == [1.0, 0.0]
    assert result.metrics["reward/rule/hit"] == 0.5
    assert result.metrics["reward/rule/length"] == pytest.approx((8 + 7) / 2)
    assert result.metrics["reward/mean"] == 0.5 and result.metrics["reward/max"] == 1.0

    # A source travels to Ray actors by pickle: it ships its spec and loads the file again there.
    copy = pickle.loads(pickle.dumps(build_reward_source("rule", spec=f"{rule_file}:length_bonus")))
    assert copy.score(["q"], ["abcde"]).rewards == [0.5]


def test_rule_loading_errors_name_the_problem(rule_file, tmp_path):
    with pytest.raises(ValueError, match="path/to/file.py:function_name"):
        load_rule_function(str(rule_file))
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_rule_function(f"{tmp_path / 'missing.py'}:score")
    with pytest.raises(ValueError, match=r"defines no 'score'; functions defined there: bad_type, contains_answer"):
        load_rule_function(f"{rule_file}:score")
    with pytest.raises(TypeError, match="not a function"):
        load_rule_function(f"{rule_file}:THRESHOLD")
    with pytest.raises(TypeError, match=r"must accept \(prompt, response, gt_answer\)"):
        load_rule_function(f"{rule_file}:wrong_arity")
    broken = tmp_path / "broken.py"
    broken.write_text("def score(:\n")
    with pytest.raises(ImportError, match="broken.py.*failed to import: SyntaxError"):
        load_rule_function(f"{broken}:score")


@pytest.mark.parametrize("function, error, message", [
    ("bad_type", TypeError, r"bad_type' on sample 0 returned 'high' \(str\); expected a number"),
    ("no_reward_key", ValueError, "without a 'reward' key"),
    ("not_finite", ValueError, "must be finite"),
])
def test_rule_bad_returns_name_function_and_sample(rule_file, function, error, message):
    source = build_reward_source("rule", spec=f"{rule_file}:{function}")
    with pytest.raises(error, match=message):
        source.score(["a", "b"], ["x", "y"])


# --- built-in checkers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72.0),
    ("#### 1,234", 1234.0),
    ("so the answer is \\boxed{-3/4}.", -0.75),
    ("First 5-3 = 2, then 2*10 = 20 apples.", 20.0),
    ("It costs $1,000.50.", 1000.5),
    ("I owe -$3", -3.0),
    ("#### 5 and then some text 9", 5.0),
    ("\\boxed{x} so 12", 12.0),
    ("no number here", None),
])
def test_final_answer_extraction(text, expected):
    assert extract_final_answer(text) == expected


def test_gsm8k_checker_scores_numerically():
    source = build_reward_source("gsm8k")
    responses = ["The total is 1,000 dollars.", "\\boxed{1000.0}", "#### 999", "I don't know"]
    result = source.score(["q"] * 4, responses, ["He pays 10*100 = 1000.\n#### 1000"] * 4)
    assert result.rewards == [1.0, 1.0, 0.0, 0.0]
    assert result.metrics["reward/accuracy"] == 0.5 and result.metrics["reward/format_rate"] == 0.75
    with pytest.raises(ValueError, match="needs a ground-truth answer"):
        source.score(["q"], ["1"], [None])


@pytest.mark.shared
def test_gsm8k_checker_on_real_solutions():
    """Every real GSM8K training solution scores 1 against itself and 0 with its final number changed."""
    path = shared_path("data", "gsm8k", "train.jsonl")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        rows = [json.loads(line) for line in handle]
    answers = [row["answer"] for row in rows]
    source = build_reward_source("gsm8k")
    assert source.score([row["question"] for row in rows], answers, answers).rewards == [1.0] * len(rows)
    wrong = [answer.rsplit("####", 1)[0] + f"#### {extract_final_answer(answer) + 1:g}" for answer in answers]
    assert sum(source.score(["q"] * len(rows), wrong, answers).rewards) == 0.0


def test_arithmetic_checker_on_bundled_data():
    rows = prompt_rows(make_problems(50, seed=3))
    labels = [row["label"] for row in rows]
    prompts = [row["messages"][0]["content"] for row in rows]
    lenient, strict = build_reward_source("arithmetic"), build_reward_source("arithmetic", strict=True)
    assert lenient.score(prompts, labels, labels).rewards == [1.0] * 50
    assert strict.score(prompts, [f" {label}\n" for label in labels], labels).rewards == [1.0] * 50
    chatty = [f"{label} is the answer" for label in labels]
    assert lenient.score(prompts, chatty, labels).rewards == [1.0] * 50
    result = strict.score(prompts, chatty, labels)
    assert result.rewards == [0.0] * 50 and result.metrics["reward/format_rate"] == 0.0
    off_by_one = [str(int(label) + 1) for label in labels]
    assert lenient.score(prompts, off_by_one, labels).metrics["reward/accuracy"] == 0.0


def test_registry_lists_sources_and_explains_the_model_slot():
    assert {"arithmetic", "gsm8k", "remote", "rule"} <= set(REWARD_SOURCES.names())
    with pytest.raises(ValueError, match="registered by the PPO pipeline"):
        build_reward_source("model")
    with pytest.raises(ValueError, match="known: arithmetic, gsm8k, remote, rule"):
        build_reward_source("bleu")
    with pytest.raises(TypeError, match=r"accepts \['strict'\]"):
        build_reward_source("arithmetic", strict=True, lenient=False)


# --- remote server ----------------------------------------------------------------------------------------------

class RewardServer:
    """A real HTTP server on 127.0.0.1: reward = len(response); can fail, stall or misbehave on demand."""

    def __init__(self):
        self.failures_left = 0          # answer 503 this many times first
        self.stall_s = 0.0              # sleep before answering
        self.status = 200
        self.body_override = None
        self.raw_body: bytes | None = None     # sent as it is (garbage that is not JSON)
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(payload)
                if owner.stall_s:
                    time.sleep(owner.stall_s)
                if owner.failures_left > 0:
                    owner.failures_left -= 1
                    return self._send(503, {"error": "warming up"})
                if owner.raw_body is not None:
                    return self._send(owner.status, owner.raw_body)
                if owner.body_override is not None:
                    return self._send(owner.status, owner.body_override)
                rewards = [float(len(r)) for r in payload["responses"]]
                self._send(owner.status, {"rewards": rewards, "metrics": {"batch": len(rewards)}})

            def _send(self, status, body):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    server = RewardServer()
    yield server
    server.close()


def test_remote_scores_in_slices_and_sends_the_protocol(server):
    source = build_reward_source("remote", url=server.url, batch_size=2, retries=0)
    result = source.score(["p1", "p2", "p3"], ["a", "bbb", "cc"], ["1", None, "3"])
    assert result.rewards == [1.0, 3.0, 2.0]
    assert len(server.requests) == 2
    first = server.requests[0]
    assert first["prompts"] == ["p1", "p2"] and first["responses"] == ["a", "bbb"]
    assert first["gt_answers"] == ["1", None] and first["query"] == ["p1a", "p2bbb"]
    assert result.metrics["reward/remote/batch"] == 1.5  # 2 then 1, averaged over slices
    assert result.metrics["reward/remote_attempts"] == 2.0


def test_remote_retries_transient_failures(server):
    server.failures_left = 2
    source = build_reward_source("remote", url=server.url, retries=2, backoff_s=0.01)
    result = source.score(["p"], ["four"])
    assert result.rewards == [4.0]
    assert result.metrics["reward/remote_attempts"] == 3.0

    server.failures_left = 5
    with pytest.raises(RemoteRewardError, match=r"failed 2 attempt\(s\); last error: HTTP 503"):
        build_reward_source("remote", url=server.url, retries=1, backoff_s=0.01).score(["p"], ["x"])


def test_remote_timeout_is_retried_then_reported(server):
    server.stall_s = 2.0
    source = build_reward_source("remote", url=server.url, timeout_s=0.2, retries=1, backoff_s=0.01)
    started = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=rf"{server.url} failed 2 attempt\(s\); last error: no answer within "
                                                r"timeout_s=0.2"):
        source.score(["p"], ["x"])
    assert time.perf_counter() - started < 1.5         # bounded by the attempts' timeouts, not by the server
    assert len(server.requests) == 2  # the first try and one retry


def test_remote_client_errors_fail_without_retry(server):
    server.status, server.body_override = 400, {"error": "bad field"}
    with pytest.raises(RemoteRewardError, match="HTTP 400.*bad field"):
        build_reward_source("remote", url=server.url, retries=3).score(["p"], ["x"])
    assert len(server.requests) == 1

    server.status, server.body_override = 200, {"rewards": [1.0, 2.0]}
    with pytest.raises(RemoteRewardError, match="returned 2 rewards for 1 responses"):
        build_reward_source("remote", url=server.url).score(["p"], ["x"])
    server.body_override = {"scores": [1.0]}
    with pytest.raises(RemoteRewardError, match=r"no 'rewards' list \(keys \['scores'\]\)"):
        build_reward_source("remote", url=server.url).score(["p"], ["x"])


@pytest.mark.parametrize("answer, expected", [
    (b"<html>502 Bad Gateway</html>", r"not JSON \(first bytes: '<html>502 Bad Gateway</html>'\)"),
    (b'{"rewards": ["high"]}', r"sample 0 returned 'high' \(str\); expected a number"),
    (b'{"rewards": [NaN]}', r"sample 0 returned nan; rewards must be finite"),
    (b'[1.0]', r"no 'rewards' list \(a list\)"),
    (b'{"rewards": [1.0], "metrics": {"judge": "ok"}}', r"metric 'judge' returned 'ok'"),
])
def test_remote_garbage_is_one_error_naming_the_url_and_the_answer(server, answer, expected):
    server.raw_body = answer
    with pytest.raises(RemoteRewardError, match=rf"reward server {server.url}, attempt 1 of 3: .*{expected}"):
        build_reward_source("remote", url=server.url, retries=2).score(["p"], ["x"])
    assert len(server.requests) == 1                    # a malformed answer is not retried


def test_remote_unreachable_server():
    with socket.socket() as probe:                      # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/score"
    with pytest.raises(RemoteRewardError, match=rf"{url} failed 3 attempt\(s\); last error: connection failed: "
                                                r".*[Cc]onnection refused"):
        build_reward_source("remote", url=url, retries=2, backoff_s=0.01, timeout_s=2).score(["p"], ["x"])


# --- one async entry point for every source --------------------------------------------------------------------

class TokenSumRewardWorker(RankedWorker):
    """Stands in for a reward-model rank: reward = the sum of a row's real token ids."""

    def compute_sequence_rewards(self, batch):
        return (batch["sequences"] * batch["attention_mask"]).sum(dim=-1).float()


def test_text_source_scores_asynchronously_and_hands_over_errors(rule_file):
    source = build_reward_source("rule", spec=f"{rule_file}:contains_answer")
    pending = source.score_async(RewardBatch(["q1", "q2"], ["it is 42", "no idea"], ["42", "7"]))
    result = pending.result(timeout=30)
    assert result.rewards == [1.0, 0.0] and result.metrics["reward/rule/hit"] == 0.5
    broken = build_reward_source("rule", spec=f"{rule_file}:bad_type")
    with pytest.raises(TypeError, match="returned 'high'"):
        broken.score_async(RewardBatch(["a"], ["x"])).result(timeout=30)


@pytest.mark.ray
def test_reward_model_source_is_called_like_the_text_sources(ray_cluster):
    import torch

    from rlhf_ray.fixtures.tiny import TOKENIZER_DIR
    from rlhf_ray.placement.groups import GroupSpec
    from rlhf_ray.rewards.model import RewardModelSource
    from rlhf_ray.workers.group import WorkerGroup

    group = WorkerGroup(TokenSumRewardWorker, GroupSpec(num_workers=2, cpus_per_worker=0.1), name="reward-standin",
                        setup_distributed=False)
    try:
        source = RewardModelSource(group, pad_token_id=0, tokenizer_dir=str(TOKENIZER_DIR))
        sequences = torch.tensor([[1, 2, 0], [3, 4, 5], [6, 0, 0]])
        mask = (sequences > 0).long()
        batch = RewardBatch(["p"] * 3, ["r"] * 3, None, sequences, mask)      # rows split [2, 1] over the ranks
        result = source.score_async(batch).result()
        assert result.rewards == [3.0, 12.0, 6.0] and result.metrics["reward/max"] == 12.0
        one_row = RewardBatch(["p"], ["r"], None, sequences[:1], mask[:1])    # fewer rows than ranks
        assert source.score_async(one_row).result().rewards == [3.0]
        # Texts only: the source tokenizes prompt + response itself; the synchronous interface gives the same.
        ids = source._load_tokenizer()("What is 2 + 3?5", add_special_tokens=False)["input_ids"]
        assert source.score(["What is 2 + 3?"], ["5"]).rewards == [float(sum(ids))]
    finally:
        group.shutdown()
