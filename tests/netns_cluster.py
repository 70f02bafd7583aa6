"""A real multi-node Ray cluster on one machine: each node in its own Linux network namespace with its own
address, joined by veth pairs to a bridge that lives in a namespace of its own (the host's network is never
touched). The hostname still resolves to 127.0.0.1 inside each namespace, as on a stock host.

    with netns_cluster(tmp_path, [Node("head", 1, {"a": 1}), Node("n1", 1, {"b": 1})]) as c:
        c.sh("head", ["ray", "job", "submit", ...])      # any command, inside a node's namespace
        c.kill_node("n1")                                 # SIGKILL every process of that namespace

Needs root and iproute2 (`ip`); `available()` says why not. Teardown (even on failure) kills every process
in our namespaces and deletes them, which removes the veths and the bridge with them.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def available() -> str | None:
    """None when this machine can build the cluster, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not shutil.which("ip"):
        return "needs iproute2's `ip`"
    return None


@dataclass
class Node:
    name: str  # short: namespace and interface names derive from it
    num_cpus: float
    resources: dict[str, float] = field(default_factory=dict)
    hide: list[str] = field(default_factory=list)  # directories this node sees empty (a tmpfs over each)


@dataclass
class Cluster:
    tag: str
    subnet: str  # "10.231.N"
    nodes: list[Node]
    token: str
    temp: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def ns(self, node: str) -> str:
        return f"{self.tag}{node}"

    def ip(self, node: str) -> str:
        return f"{self.subnet}.{2 + [n.name for n in self.nodes].index(node)}"

    @property
    def head(self) -> str:
        return self.nodes[0].name

    @property
    def dashboard(self) -> str:
        return f"http://{self.ip(self.head)}:8265"

    def env(self, **extra: str) -> dict[str, str]:
        """What every Ray process of ours gets: the venv first on PATH, token auth, quick node-death
        detection; nothing that points at another cluster, and no GLOO/NCCL interface by hand."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_") and k not in ("PYTHONPATH", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
        env.update(PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0", RAY_enable_worker_prestart="0",
                   RAY_prestart_worker_first_driver="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                   # a dead node is noticed in ~3 s instead of ~30 s (GCS health checks)
                   RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                   RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000")
        env.update(extra)
        return env

    def sh(self, node: str, argv: list[str], timeout_s: float = 300, **kw) -> subprocess.CompletedProcess:
        """Run argv inside the node's namespace (our env), capturing output."""
        return subprocess.run(["ip", "netns", "exec", self.ns(node), *argv], env=self.env(), text=True,
                              capture_output=True, timeout=timeout_s, cwd=REPO, **kw)

    def popen(self, node: str, argv: list[str], log: Path, **env: str) -> subprocess.Popen:
        out = open(log, "ab")
        try:
            return subprocess.Popen(["ip", "netns", "exec", self.ns(node), *argv], env=self.env(**env),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            out.close()

    def pids(self, node: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns(node)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, node: str) -> int:
        """SIGKILL every process in the node's namespace (raylet, workers, actors); returns how many."""
        killed = 0
        for _ in range(5):  # processes forked while we kill
            pids = self.pids(node)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            time.sleep(0.2)
        return killed

    def start_node(self, node: Node, timeout_s: float = 120) -> None:
        """`ray start` in the node's namespace (--block, so the process is ours to watch)."""
        temp = self.temp / node.name
        temp.mkdir(parents=True, exist_ok=True)
        args = ["ray", "start", "--block", "--disable-usage-stats", "--node-ip-address", self.ip(node.name),
                "--temp-dir", str(temp), "--num-cpus", str(node.num_cpus), "--num-gpus", "0",
                "--object-store-memory", str(256 << 20), "--resources", json.dumps(node.resources)]
        if node.name == self.head:
            args += ["--head", "--port", "6379", "--dashboard-host", self.ip(node.name),
                     "--include-dashboard", "true"]
        else:
            args += ["--address", f"{self.ip(self.head)}:6379"]
        if node.hide:  # a mount namespace of the node's own: storage the other nodes see, it does not
            mounts = " && ".join(f"mount -t tmpfs tmpfs {d}" for d in node.hide)
            args = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"',
                    "sh", *args]
        log = self.temp / f"ray-start-{node.name}.log"
        self.procs[node.name] = self.popen(node.name, args, log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs[node.name].poll() is not None:
                raise RuntimeError(f"ray start on {node.name} exited: {log.read_text(errors='replace')[-3000:]}")
            if self.alive_nodes() >= [n.name for n in self.nodes].index(node.name) + 1:
                return
            time.sleep(1)
        raise TimeoutError(f"node {node.name} did not join within {timeout_s}s: {log.read_text()[-3000:]}")

    def alive_nodes(self) -> int:
        code = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
        res = subprocess.run(["ip", "netns", "exec", self.ns(self.head), "python", "-c", code],
                             capture_output=True, text=True, timeout=60, cwd=self.temp,
                             env=self.env(RAY_ADDRESS=f"{self.ip(self.head)}:6379"))
        try:
            return int(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: nothing of ours outlives the test process


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _build(c: Cluster) -> None:
    switch = f"{c.tag}sw"
    _ip("netns", "add", switch)
    _ip("-n", switch, "link", "add", "br0", "type", "bridge")
    _ip("-n", switch, "link", "set", "br0", "up")
    for i, node in enumerate(c.nodes):
        ns = c.ns(node.name)
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        # created in the node's namespace, one end moved to the switch's
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", switch)
        _ip("-n", switch, "link", "set", f"p{i}", "master", "br0")
        _ip("-n", switch, "link", "set", f"p{i}", "up")
        _ip("-n", ns, "addr", "add", f"{c.ip(node.name)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")


def _teardown(c: Cluster) -> None:
    for node in c.nodes:
        with contextlib.suppress(Exception):
            c.kill_node(node.name)
    for proc in c.procs.values():
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
    for name in [c.ns(n.name) for n in c.nodes] + [f"{c.tag}sw"]:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def netns_cluster(tmp_dir: Path, nodes: list[Node]) -> Iterator[Cluster]:
    tag = f"c{secrets.token_hex(2)}"  # namespace names: c1a2bhead, c1a2bn1, c1a2bsw
    # Ray's unix sockets live under --temp-dir and must stay under ~107 characters: a short dir of our own
    temp = Path(tempfile.mkdtemp(prefix="clsrl-nn-", dir="/tmp"))
    c = Cluster(tag=tag, subnet=f"10.231.{secrets.randbelow(250) + 1}", nodes=nodes,
                token=secrets.token_hex(32), temp=temp)
    try:
        _build(c)
        for node in nodes:
            c.start_node(node)
        yield c
    finally:
        _teardown(c)
        logs = Path(tmp_dir) / "ray-nodes"
        shutil.copytree(temp, logs, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("sockets", "*.sock", "runtime_resources"))
        shutil.rmtree(temp, ignore_errors=True)
