"""A multi-node Ray cluster on one machine, for trying `ray job submit` and node pools before a real cluster.

    python -m rlhf_ray.localcluster start --pool cpu=2 --pool gen=1     # head + one node per pool, prints the address
    python -m rlhf_ray.localcluster stop                                 # stops only the nodes it started

Each node is a `ray start --block` process in its own process session, labelled `pool=<name>` the way KubeRay
worker groups are (cluster/raycluster.yaml), so placement by pool behaves as it would on Kubernetes. Stopping
signals those sessions only: unlike `ray stop`, it never touches another Ray instance on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_ray.utils import free_port

# Token auth is Ray's default for `ray start`; nodes and clients must agree, so both get it explicitly (the token
# itself is ~/.ray/auth_token, created on first use; `ray get-auth-token --generate` makes one).
AUTH_MODE = os.environ.get("RAY_AUTH_MODE", "token")
STATE_FILE = Path(os.environ.get("RLHF_RAY_LOCAL_CLUSTER_STATE", Path.home() / ".rlhf_ray" / "local_cluster.json"))
LOG_DIR = STATE_FILE.parent / "local_cluster_logs"


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@dataclass
class LocalCluster:
    head_cpus: float = 1
    pools: dict[str, float] = field(default_factory=dict)   # pool name -> CPUs of its one node
    dashboard: bool = True
    env: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    address: str = ""
    dashboard_url: str = ""

    def start(self, timeout_s: float = 300.0) -> "LocalCluster":
        import ray

        ip = ray.util.get_node_ip_address()
        port, dash_port = free_port(), free_port()
        head = [_ray_bin(), "start", "--head", "--block", f"--port={port}", f"--num-cpus={self.head_cpus:g}",
                "--labels=pool=head", "--disable-usage-stats", f"--include-dashboard={str(self.dashboard).lower()}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"]
        self.address = f"{ip}:{port}"
        self.dashboard_url = f"http://127.0.0.1:{dash_port}" if self.dashboard else ""
        self.pids.append(self._spawn(head))
        self._wait_for_nodes(1, timeout_s)
        for count, (pool, cpus) in enumerate(self.pools.items(), start=2):
            self.pids.append(self._spawn([_ray_bin(), "start", "--block", f"--address={self.address}",
                                          f"--num-cpus={cpus:g}", f"--labels=pool={pool}",
                                          "--disable-usage-stats"]))
            self._wait_for_nodes(count, timeout_s)   # one at a time: registering several at once overloads GCS here
        if self.dashboard:
            self._wait_for_dashboard(timeout_s)
        return self

    def client_env(self) -> dict[str, str]:
        """What a client (ray.init, ray job submit) needs: the address and the same auth mode as the nodes."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": AUTH_MODE}

    def _spawn(self, cmd: list[str]) -> int:
        # Several nodes on one host: give each its own agent/metrics ports (the defaults are fixed and collide).
        cmd = cmd + [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                     f"--runtime-env-agent-port={free_port()}"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": AUTH_MODE,
               # a busy small machine can take longer than Ray's default to register a node
               "RAY_raylet_start_wait_time_s": "180", **self.env}
        # python bin dir first: a job's `python` is looked up on the head node's PATH
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = (LOG_DIR / f"node-{len(self.pids)}.log").open("w")
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        return proc.pid

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        code = (f"import ray; ray.init(address='{self.address}', log_to_driver=False); "
                f"print(sum(1 for n in ray.nodes() if n['Alive']))")
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env={**os.environ, **self.client_env()})
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] and \
                    int(out.stdout.strip().splitlines()[-1]) >= count:
                return
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"local Ray cluster at {self.address}: {count} node(s) not alive after {timeout_s:.0f}s")

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5):
                    return
            except urllib.error.HTTPError:
                return   # it answers (401 without the auth token): the job server is up
            except OSError:
                time.sleep(2)
        self.stop()
        raise RuntimeError(f"Ray dashboard (job server) at {self.dashboard_url} did not answer in {timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGTERM each node's process session, then SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids:
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(3)
        self.pids = []

    def save_state(self, path: Path = STATE_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pids": self.pids, "address": self.address, "dashboard_url": self.dashboard_url}))

    @classmethod
    def from_state(cls, path: Path = STATE_FILE) -> "LocalCluster":
        data = json.loads(path.read_text())
        return cls(pids=data["pids"], address=data["address"], dashboard_url=data["dashboard_url"])


def _parse_pool(text: str) -> tuple[str, float]:
    name, _, cpus = text.partition("=")
    if not name or not cpus:
        raise argparse.ArgumentTypeError(f"--pool expects NAME=CPUS, got {text!r}")
    return name, float(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.localcluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start a head node and one node per --pool")
    start.add_argument("--head_cpus", type=float, default=1)
    start.add_argument("--pool", type=_parse_pool, action="append", default=[], help="NAME=CPUS, repeatable")
    sub.add_parser("stop", help="stop the nodes started by `start`")
    args = parser.parse_args(argv)
    if args.action == "start":
        cluster = LocalCluster(head_cpus=args.head_cpus, pools=dict(args.pool)).start()
        cluster.save_state()
        print(f"export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE={AUTH_MODE}\n"
              f"# jobs: ray job submit --address {cluster.dashboard_url} --working-dir . -- rlhf-ray ...")
        return 0
    if not STATE_FILE.exists():
        print(f"no local cluster recorded in {STATE_FILE}", file=sys.stderr)
        return 1
    LocalCluster.from_state().stop()
    STATE_FILE.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
