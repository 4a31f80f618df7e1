"""Security defaults: no unpickling of files a user did not produce, code loaded only from paths the user names,
requests only to the URLs the config names."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf_ray"


class _Payload:
    """A pickle that runs code when loaded: here it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_checkpoint_readers_refuse_a_pickle_payload(tmp_path):
    """torch.load as the colossalai checkpoint readers call it (no weights_only argument: True by default since torch
    2.6) refuses the payload, and its code never runs; none of those readers turns the default off."""
    import importlib.util

    marker, payload = tmp_path / "ran", tmp_path / "pytorch_model.bin"
    torch.save({"weight": _Payload(marker)}, payload)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(payload, map_location=torch.device("cpu"))
    assert not marker.exists()
    spec = importlib.util.find_spec("colossalai")
    if spec is not None:
        readers = Path(spec.origin).parent / "checkpoint_io"
        calls = [call for path in readers.rglob("*.py") for call in re.findall(r"torch\.load\([^)]*\)", path.read_text())]
        assert calls and not [call for call in calls if "weights_only" in call], calls


# What may not appear in the package's source, and the one place each allowed exception lives.
FORBIDDEN = {
    r"\btorch\.load\(": {},                                    # checkpoints are safetensors + JSON (test_checkpoint.py)
    r"weights_only\s*=\s*False": {},
    r"\bpickle\.loads?\(": {"rollout/receiver.py": 1},         # a CUDA IPC handle from our own trainer actor, in memory
    r"(?<![.\w])(?<!def )(eval|exec)\(": {},                  # the builtins, not a method called eval
    r"yaml\.(unsafe_|full_)?load\(": {},
    r"allow_pickle\s*=\s*True": {},
    r"trust_remote_code\s*=\s*True": {},
    r"exec_module\(": {"rewards/rule.py": 1},                  # --reward_fn: the file the user names
}


@pytest.mark.parametrize("pattern", sorted(FORBIDDEN))
def test_no_unpickling_or_code_execution_outside_the_named_places(pattern):
    found: dict[str, int] = {}
    for path in PACKAGE.rglob("*.py"):
        count = len(re.findall(pattern, path.read_text()))
        if count:
            found[path.relative_to(PACKAGE).as_posix()] = count
    assert found == FORBIDDEN[pattern]


def test_rule_rewards_load_only_the_file_named(tmp_path, monkeypatch):
    from rlhf_ray.rewards import load_rule_function

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules.py").write_text("def score(prompt, response, gt_answer):\n    return 1.0\n")
    assert load_rule_function("rules.py:score")("p", "r", None) == 1.0
    with pytest.raises(FileNotFoundError, match="'rules'"):       # no module search, no suffix guessing
        load_rule_function("rules:score")
    with pytest.raises(ValueError, match="must look like path/to/file.py:function_name"):
        load_rule_function("rules.score")


class _Servers:
    """A reward server that redirects every POST to a second server, which records what reaches it."""

    def __init__(self) -> None:
        self.hits: list[dict] = []
        hits = self.hits

        class Target(BaseHTTPRequestHandler):
            def do_POST(self):
                hits.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                body = json.dumps({"rewards": [1.0]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.do_POST()

            def log_message(self, *args):
                pass

        self.target = ThreadingHTTPServer(("127.0.0.1", 0), Target)
        target_url = f"http://127.0.0.1:{self.target.server_address[1]}/elsewhere"

        class Redirector(BaseHTTPRequestHandler):
            def do_POST(self):
                self.send_response(302)
                self.send_header("Location", target_url)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
        self.url, self.target_url = f"http://127.0.0.1:{self.redirector.server_address[1]}/score", target_url
        for server in (self.target, self.redirector):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in (self.target, self.redirector):
            server.shutdown()
            server.server_close()


def test_remote_reward_never_follows_a_redirect_to_another_url():
    from rlhf_ray.rewards import RemoteRewardError, build_reward_source

    servers = _Servers()
    try:
        source = build_reward_source("remote", url=servers.url, retries=2, backoff_s=0.0,
                                     headers={"Authorization": "Bearer secret"})
        with pytest.raises(RemoteRewardError, match=rf"reward server {servers.url} redirected to "
                                                    rf"{servers.target_url} \(HTTP 302.*redirects are not followed"):
            source.score(["p"], ["r"], [None])
        assert servers.hits == []                   # neither the batch nor the token reached the other address
    finally:
        servers.close()
