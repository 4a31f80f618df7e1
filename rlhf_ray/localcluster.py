"""A multi-node Ray cluster on one machine, for trying `ray job submit` and node pools before a real cluster.

    python -m rlhf_ray.localcluster start --pool cpu=2 --pool gen=1     # head + one node per pool, prints the address
    python -m rlhf_ray.localcluster stop                                 # stops only the nodes it started

Each node is a `ray start --block` process in its own process session, labelled `pool=<name>` the way KubeRay
worker groups are (cluster/raycluster.yaml), so placement by pool behaves as it would on Kubernetes. Each node has
its own Ray temp dir, as separate hosts do (nodes sharing one would re-extract a job's working_dir under its
running driver). The dashboard (job server) listens on 127.0.0.1 unless --dashboard_host says otherwise. Stopping
signals those sessions only: unlike `ray stop`, it never touches another Ray instance on the host. `start` records
the cluster in a state file (--state) and refuses to overwrite one that is there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_ray.utils import free_port

# Token auth is Ray's default for `ray start`; nodes and clients must agree, so both get it explicitly (the token
# itself is ~/.ray/auth_token, created on first use; `ray get-auth-token --generate` makes one).
AUTH_MODE = os.environ.get("RAY_AUTH_MODE", "token")
STATE_FILE = Path(os.environ.get("RLHF_RAY_LOCAL_CLUSTER_STATE", Path.home() / ".rlhf_ray" / "local_cluster.json"))


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def whole_cpus(flag: str, value) -> int:
    """`ray start --num-cpus` takes a whole number: refuse 1.5 here rather than in a node's log.

    flag: the flag as typed up to its value ("--head_cpus " or "--pool gen="), for the message."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number.is_integer() or number < 0:
        suggestion = math.ceil(number) if number > 0 else 1
        raise ValueError(f"{flag}{value}: a node's CPU count must be a whole number >= 0 (ray start --num-cpus "
                         f"takes integers); e.g. {flag}{suggestion}")
    return int(number)


@dataclass
class LocalCluster:
    head_cpus: int = 1
    pools: dict[str, int] = field(default_factory=dict)   # pool name -> CPUs of its one node
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"                     # 0.0.0.0 opens the job server to the network
    env: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    address: str = ""
    dashboard_url: str = ""
    root: str = ""                                        # the nodes' temp dirs and logs: <root>/node-<i>[.log]

    def start(self, timeout_s: float = 300.0) -> "LocalCluster":
        import ray

        whole_cpus("--head_cpus ", self.head_cpus)
        for pool, cpus in self.pools.items():
            whole_cpus(f"--pool {pool}=", cpus)
        ip = ray.util.get_node_ip_address()
        # short: Ray's unix sockets live under the temp dir, and their paths may not exceed 107 bytes
        self.root = tempfile.mkdtemp(prefix="rlhf-lc-", dir="/tmp")
        port, dash_port = free_port(), free_port()
        head = [_ray_bin(), "start", "--head", "--block", f"--port={port}", f"--num-cpus={self.head_cpus}",
                "--labels=pool=head", "--disable-usage-stats", f"--include-dashboard={str(self.dashboard).lower()}",
                f"--dashboard-host={self.dashboard_host}", f"--dashboard-port={dash_port}"]
        self.address = f"{ip}:{port}"
        dash_ip = "127.0.0.1" if self.dashboard_host in ("127.0.0.1", "localhost", "0.0.0.0") else self.dashboard_host
        self.dashboard_url = f"http://{dash_ip}:{dash_port}" if self.dashboard else ""
        self.pids.append(self._spawn(head))
        self._wait_for_nodes(1, timeout_s)
        for count, (pool, cpus) in enumerate(self.pools.items(), start=2):
            self.pids.append(self._spawn([_ray_bin(), "start", "--block", f"--address={self.address}",
                                          f"--num-cpus={cpus}", f"--labels=pool={pool}",
                                          "--disable-usage-stats"]))
            self._wait_for_nodes(count, timeout_s)   # one at a time: registering several at once overloads GCS here
        if self.dashboard:
            self._wait_for_dashboard(timeout_s)
        return self

    def client_env(self) -> dict[str, str]:
        """What a client (ray.init, ray job submit) needs: the address and the same auth mode as the nodes."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": AUTH_MODE}

    def _spawn(self, cmd: list[str]) -> int:
        node = Path(self.root) / f"node-{len(self.pids)}"
        # Several nodes on one host: give each its own temp dir and agent/metrics ports (the defaults collide).
        cmd = cmd + [f"--temp-dir={node}", f"--dashboard-agent-listen-port={free_port()}",
                     f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": AUTH_MODE,
               # a busy small machine can take longer than Ray's default to register a node
               "RAY_raylet_start_wait_time_s": "180", **self.env}
        # python bin dir first: a job's `python` is looked up on the head node's PATH
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        with node.with_suffix(".log").open("w") as log:
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
        self.stop(keep_files=True)
        raise RuntimeError(f"local Ray cluster at {self.address}: {count} node(s) not alive after {timeout_s:.0f}s; "
                           f"the nodes' logs are {self.root}/node-*.log")

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
        self.stop(keep_files=True)
        raise RuntimeError(f"Ray dashboard (job server) at {self.dashboard_url} did not answer in {timeout_s:.0f}s; "
                           f"the head's log is {self.root}/node-0.log")

    def stop(self, keep_files: bool = False) -> None:
        """SIGTERM each node's process session, then SIGKILL what is left; remove the nodes' temp dirs.

        By session, not process group: Ray puts each worker process in a group of its own."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_members(set(self.pids)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(3)
        self.pids = []
        if self.root and not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def save_state(self, path: Path = STATE_FILE) -> None:
        """Record this cluster in `path`; FileExistsError when another cluster is recorded there."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x") as f:
            json.dump({"pids": self.pids, "address": self.address, "dashboard_url": self.dashboard_url,
                       "root": self.root}, f)

    @classmethod
    def from_state(cls, path: Path = STATE_FILE) -> "LocalCluster":
        data = json.loads(path.read_text())
        return cls(pids=data["pids"], address=data["address"], dashboard_url=data["dashboard_url"],
                   root=data.get("root", ""))


def _session_members(sessions: set[int]) -> list[int]:
    """The live processes whose session id is in `sessions` (each node's `ray start` leads one)."""
    members = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) in sessions:
                members.append(int(entry))
        except OSError:
            pass   # it exited meanwhile
    return members


def _parse_pool(text: str) -> tuple[str, int]:
    name, _, cpus = text.partition("=")
    if not name or not cpus:
        raise argparse.ArgumentTypeError(f"--pool expects NAME=CPUS, got {text!r}")
    try:
        return name, whole_cpus(f"--pool {name}=", cpus)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_head_cpus(text: str) -> int:
    try:
        return whole_cpus("--head_cpus ", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.localcluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start a head node and one node per --pool")
    start.add_argument("--head_cpus", type=_parse_head_cpus, default=1)
    start.add_argument("--pool", type=_parse_pool, action="append", default=[], help="NAME=CPUS, repeatable")
    start.add_argument("--dashboard_host", default="127.0.0.1",
                       help="address the job server listens on; 0.0.0.0 opens it to the network (default: loopback)")
    stop = sub.add_parser("stop", help="stop the nodes started by `start`")
    for command in (start, stop):
        command.add_argument("--state", type=Path, default=STATE_FILE,
                             help=f"this cluster's state file (default: {STATE_FILE})")
    args = parser.parse_args(argv)
    if args.action == "start":
        if args.state.exists():
            print(f"--state {args.state}: a cluster is already recorded there; stop it first "
                  f"(python -m rlhf_ray.localcluster stop --state {args.state}) or pass another --state",
                  file=sys.stderr)
            return 1
        cluster = LocalCluster(head_cpus=args.head_cpus, pools=dict(args.pool),
                               dashboard_host=args.dashboard_host).start()
        cluster.save_state(args.state)
        print(f"export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE={AUTH_MODE}\n"
              f"# jobs: ray job submit --address {cluster.dashboard_url} --working-dir . -- rlhf-ray ...")
        return 0
    if not args.state.exists():
        print(f"--state {args.state}: no local cluster recorded there", file=sys.stderr)
        return 1
    LocalCluster.from_state(args.state).stop()
    args.state.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
