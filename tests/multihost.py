"""Several "hosts" on this machine: one network namespace per host, each with its own IP on a private bridge.

    hosts = NetnsHosts(3).create()         # namespaces <prefix>-10.77.0.1 .. -10.77.0.3, bridge 10.77.0.254
    hosts.runner                           # "ip netns exec <prefix>-{host}": a command runner for a host's IP
    hosts.hosts_running("ray::RLWorker")   # the IPs where such a process runs
    hosts.kill_host("10.77.0.3")           # SIGKILL everything running on that host (a host that loses power)
    hosts.destroy()                        # deletes only the namespaces, veths and bridge it created
    yield from netns_hosts(3, need_gib=6)  # a module fixture's body: the above, or a skip saying why not

Each namespace has its own loopback and an `eth0` on the bridge (10.77.0.<i>/24); this machine reaches them through
the bridge's address, so a client here (ray job submit, the state API) talks to a head inside one. Files and
processes stay shared, as on hosts with a shared filesystem: Ray's temp dirs must differ per node (the cluster's
job). Needs root and iproute2; `unavailable()` says why not.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

SUBNET = "10.77.0"
IFNAME = "eth0"   # the interface name inside every namespace (GLOO_SOCKET_IFNAME for torch.distributed)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why the netns hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"rlhfprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` is refused here: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


class NetnsHosts:
    def __init__(self, count: int, subnet: str = SUBNET):
        tag = f"mh{os.getpid() % 100000}"            # interface names are at most 15 bytes
        self.ips = [f"{subnet}.{i}" for i in range(1, count + 1)]
        self.gateway = f"{subnet}.254"               # the bridge: this machine's address on the hosts' network
        self.prefix, self.bridge = f"rlhf{tag}", f"{tag}br"
        self.veths = [f"{tag}v{i}" for i in range(count)]
        self.created: list[tuple[str, str]] = []     # ("netns" | "link", name), in creation order

    @property
    def runner(self) -> str:
        return f"ip netns exec {self.prefix}-{{host}}"

    def namespace(self, ip: str) -> str:
        return f"{self.prefix}-{ip}"

    def create(self) -> "NetnsHosts":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self.created.append(("link", self.bridge))
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for ip, veth in zip(self.ips, self.veths):
                ns, peer = self.namespace(ip), f"{veth}p"
                _ip("netns", "add", ns)
                self.created.append(("netns", ns))
                _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
                self.created.append(("link", veth))
                _ip("link", "set", peer, "netns", ns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                for args in (("link", "set", peer, "name", IFNAME), ("addr", "add", f"{ip}/24", "dev", IFNAME),
                             ("link", "set", IFNAME, "up"), ("link", "set", "lo", "up")):
                    _ip("-n", ns, *args)
        except BaseException:
            self.destroy()
            raise
        return self

    def kill_host(self, ip: str, timeout_s: float = 10.0) -> int:
        """SIGKILL every process in host `ip`'s namespace (its Ray node and every worker on it) until none is left;
        returns how many were killed. Its address stays up, so peers get connections refused, not timeouts."""
        killed, deadline = 0, time.monotonic() + timeout_s
        while True:
            listed = subprocess.run(["ip", "netns", "pids", self.namespace(ip)], capture_output=True, text=True,
                                    check=True).stdout.split()
            alive = [int(pid) for pid in listed if not _is_zombie(int(pid))]
            if not alive:
                return killed
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {ip}: processes {alive} survived SIGKILL for {timeout_s:g}s")
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def hosts_running(self, title: str) -> list[str]:
        """The IPs of the hosts with a process whose command line starts with `title` (Ray names an actor's
        process `ray::<Class>`): where an actor is, at once, without asking Ray."""
        found = []
        for ip in self.ips:
            listed = subprocess.run(["ip", "netns", "pids", self.namespace(ip)], capture_output=True, text=True,
                                    check=True).stdout.split()
            if any(_cmdline(int(pid)).startswith(title) for pid in listed):
                found.append(ip)
        return found

    def destroy(self) -> None:
        """Delete what create() made, newest first (a namespace's end of a veth goes with the namespace)."""
        for kind, name in reversed(self.created):
            args = ("netns", "del", name) if kind == "netns" else ("link", "del", name)
            subprocess.run(["ip", *args], capture_output=True)
        self.created = []


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def netns_hosts(count: int, need_gib: float) -> Iterator[NetnsHosts]:
    """A module fixture's body: yields `count` created hosts and destroys them after, or skips the tests saying why
    they cannot run here (no vLLM, no network namespaces, under `need_gib` GiB of memory available)."""
    import pytest

    pytest.importorskip("vllm")
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if available_gib() < need_gib:
        pytest.skip(f"{count} Ray nodes and a GRPO job need ~{need_gib:g} GiB free; "
                    f"{available_gib():.1f} GiB available")
    made = NetnsHosts(count).create()
    try:
        yield made
    finally:
        made.destroy()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True        # already gone


def small_grpo_job(model_dir, prompts, out, *placement: str) -> list[str]:
    """`rlhf-ray grpo` flags for two short episodes of the tiny model on the arithmetic prompts, rule reward, no
    reference (kl_coef 0), small enough for 1-CPU nodes; `placement` adds the pool flags."""
    return ["grpo", "--pretrain", str(model_dir), "--prompt_dataset", str(prompts),
            "--reward_fn", "rlhf_ray/assets/rewards/number_only.py:number_only",
            "--conversation_template_config", "rlhf_ray/assets/templates/tiny.json", "--kl_coef", "0",
            "--cpus_per_worker", "0.5", "--cpus_per_engine", "0.5", "--kv_cache_gib", "0.25",
            "--n_samples_per_prompt", "2", "--max_new_tokens", "4", "--max_prompt_len", "32", "--num_episodes", "2",
            "--experience_batch_size", "4", "--train_batch_size", "8", "--accumulation_steps", "1",
            "--num_update_steps", "1", "--warmup_steps", "0", "--save_path", f"{out}/policy",
            "--log_dir", f"{out}/log", "--tensorboard", "false", *placement]
