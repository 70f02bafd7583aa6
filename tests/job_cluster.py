"""A throwaway `ray start --head` cluster on 127.0.0.1 for testing `ray job submit` end to end.

    with head_cluster(tmp_path) as head:
        status, logs = submit_job(head, ["python", "-c", "import cluster"], job_runtime_env(), timeout_s=120)

Isolation from every other Ray on the machine (the in-process `ray_local` fixture, other people's test runs):
  * every port Ray would otherwise default (GCS 6379, dashboard 8265, client server 10001, agent 52365,
    worker ports 10002-19999) is given explicitly: free ephemeral ports, and OS-chosen worker ports;
  * `--temp-dir` is a fresh short directory under /tmp (unix socket paths must stay under ~107 chars);
  * token auth with a token of our own, passed by env (RAY_AUTH_TOKEN), so ~/.ray/auth_token is neither read
    nor written; HTTP clients send it as a bearer header;
  * teardown never runs `ray stop` (that kills every Ray process on the machine): it SIGTERMs our
    `ray start --block` (which shuts down the node it started), SIGKILLs that process group, and then kills
    whatever is left that belongs to us: descendants seen earlier, and processes whose command line or
    working directory lies inside our temp dir (job drivers run in their own session, cwd in our temp dir).

The harness never touches os.environ or ray.init() in the calling process.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the venv running pytest: `ray` and `python` come from here

# gitwildmatch patterns relative to the working dir, passed as runtime_env["excludes"]. Ray 2.60 already skips
# .git/.venv/venv/__pycache__ by default and honours .gitignore (.cache/, runs/), but both can be switched off from
# the environment (RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES, RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), and these dirs
# must never be uploaded (GBs of venv, model cache, run outputs): so name them explicitly too.
UPLOAD_EXCLUDES = [
    "/.venv", "/.cache", "/runs", "/.git", "/.hypothesis", "/.pytest_cache", "/.ruff_cache", "/.torch_ext",
    "__pycache__", "*.egg-info", "*.lock",
]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_runtime_env(working_dir: str | Path = REPO, env_vars: dict[str, str] | None = None) -> dict:
    """The runtime_env a clsrl job is submitted with: the repo as working dir (excludes above) and its env."""
    env = {
        "CLSRL_CACHE": os.path.abspath(os.environ.get("CLSRL_CACHE", str(REPO / ".cache" / "clsrl"))),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.update(env_vars or {})
    return {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES), "env_vars": env}


@dataclass
class HeadCluster:
    address: str  # job server / dashboard, http://127.0.0.1:PORT (what `ray job submit --address` takes)
    gcs_address: str  # 127.0.0.1:PORT (what ray.init(address=...) takes)
    # environment for CLI subprocesses: `ray job ...` (RAY_API_SERVER_ADDRESS; NB it and RAY_ADDRESS override the
    # CLI's --address), drivers run directly on this machine (RAY_ADDRESS = the GCS), and the auth token
    env: dict[str, str]
    temp_dir: Path  # Ray's --temp-dir (sessions, logs, unpacked working dirs)
    log_path: Path  # stdout+stderr of `ray start --block`
    token: str | None
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self):
        """A JobSubmissionClient for this cluster (pure HTTP; independent of any ray.init in this process)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.headers)

    def ray_cli(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run `ray ARGS...` (the venv's ray) against this cluster."""
        proc = subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s, cwd=REPO)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`ray {shlex.join(args)}` exited {proc.returncode}\n{_tail(proc.stdout + proc.stderr)}")
        return proc

    def session_logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on all interfaces right now (held together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env() -> dict[str, str]:
    """os.environ without anything that would point Ray somewhere else (RAY_ADDRESS, the in-process cluster's
    RAY_AUTH_MODE, ...) or shadow the uploaded working dir (PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node IP 127.0.0.1, not the host's address
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _our_processes(temp_dir: Path) -> list:
    """Live processes whose command line or cwd lies inside temp_dir: Ray's daemons and workers (given
    --temp-dir/--session-dir/socket paths there) and job drivers (which run in the unpacked working dir there)."""
    import psutil

    marker = str(temp_dir)
    in_cmd = re.compile(re.escape(marker) + r"(?![\w-])")  # our dir, not a longer name sharing its prefix
    mine = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        cwd = p.info["cwd"] or ""
        if p.pid != os.getpid() and (in_cmd.search(cmd) or cwd == marker or cwd.startswith(marker + os.sep)):
            mine.append(p)
    return mine


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(procs: list, timeout_s: float = 10) -> None:
    """SIGKILL psutil.Process objects; psutil refuses to signal a pid that was reused by another process."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout_s)


# looked up here, not in the forked child: a child of a threaded process (Ray's in-process driver) must not import
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the `ray start` child: get SIGTERM if the test process dies (even by SIGKILL), so no cluster outlives it."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _start(head_env: dict[str, str], temp_dir: Path, log_path: Path, num_cpus: int, object_store_memory: int,
           ports: dict[str, int]) -> subprocess.Popen:
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
        "--temp-dir", str(temp_dir), "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--object-store-memory", str(object_store_memory),
        "--port", str(ports["gcs"]), "--dashboard-port", str(ports["dashboard"]),
        "--ray-client-server-port", str(ports["client"]), "--node-manager-port", str(ports["node_manager"]),
        "--object-manager-port", str(ports["object_manager"]),
        "--dashboard-agent-listen-port", str(ports["agent_http"]),
        "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
        "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
        "--metrics-export-port", str(ports["metrics"]),
        "--min-worker-port", "0", "--max-worker-port", "0",  # workers bind OS-chosen ports
    ]
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        # own session/process group: we can signal the whole group, and a Ctrl-C at the terminal reaches only
        # pytest (whose teardown then stops us)
        return subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=temp_dir, start_new_session=True, preexec_fn=_die_with_parent)


def _wait_ready(head: HeadCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if head.proc is not None and head.proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited {head.proc.returncode} before the cluster was up:\n"
                               f"{_tail(head.log_path.read_text(errors='replace'))}")
        try:
            head.client().list_jobs()  # job server up, and our token accepted
            return
        except Exception as e:  # connection refused / 5xx while the dashboard comes up
            last = e
            time.sleep(0.5)
    raise TimeoutError(f"head cluster not ready in {timeout_s}s (last error: {last!r}):\n"
                       f"{_tail(head.log_path.read_text(errors='replace'))}")


def _stop(head: HeadCluster) -> None:
    """Stop this cluster's jobs, node and every process of ours; never anything else's."""
    with contextlib.suppress(Exception):
        client = head.client()
        for job in client.list_jobs():
            if str(job.status) not in TERMINAL and job.submission_id:
                client.stop_job(job.submission_id)
    known = (_descendants(head.proc.pid) if head.proc is not None else []) + _our_processes(head.temp_dir)
    if head.proc is not None and head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)  # `ray start --block` then kills the processes it started
        try:
            head.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    if head.proc is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(head.proc.pid, signal.SIGKILL)  # its group: it called setsid via start_new_session
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.proc.wait(timeout=10)
    _kill([p for p in known if p.is_running()])  # is_running() is False for a pid reused since
    for _ in range(3):  # stragglers spawned while we were killing
        left = _our_processes(head.temp_dir)
        if not left:
            break
        _kill(left)


@contextlib.contextmanager
def head_cluster(tmp_dir: str | Path, num_cpus: int = 4, *, auth: str = "token", object_store_memory: int = 512 << 20,
                 startup_timeout_s: float = 120, attempts: int = 2, keep_logs: bool = False,
                 head_env: dict[str, str] | None = None) -> Iterator[HeadCluster]:
    """Start `ray start --head --block` on 127.0.0.1 with free ports; yield a HeadCluster; tear it all down.

    tmp_dir receives `ray-start.log` and, if the body raises (or keep_logs), a copy of the session logs.
    auth: "token" (a fresh token, as a production cluster would run) or "disabled".
    head_env: extra environment for `ray start` (hence the raylet, workers and job drivers), e.g. RAY_* tuning.
    """
    if auth not in ("token", "disabled"):
        raise ValueError(f"auth must be 'token' or 'disabled', not {auth!r}")
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32) if auth == "token" else None
    auth_env = {"RAY_AUTH_MODE": auth} | ({"RAY_AUTH_TOKEN": token} if token else {})
    head_env = _clean_env() | auth_env | {
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now, no drain wait
        # no idle workers started ahead of need: a job's actors can't use them (different runtime_env) and on a
        # small CI box they only steal CPU from the job under test
        "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0",
    } | (head_env or {})
    names = ["gcs", "dashboard", "client", "node_manager", "object_manager", "agent_http", "agent_grpc",
             "runtime_env_agent", "metrics"]
    head: HeadCluster | None = None
    failed = False
    try:
        for attempt in range(1, attempts + 1):
            temp_dir = Path(tempfile.mkdtemp(prefix="clsrl-rayjob-", dir="/tmp"))
            ports = dict(zip(names, _free_ports(len(names))))
            address = f"http://127.0.0.1:{ports['dashboard']}"
            head = HeadCluster(address=address, gcs_address=f"127.0.0.1:{ports['gcs']}",
                               env=_clean_env() | auth_env | {"RAY_API_SERVER_ADDRESS": address,
                                                              "RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}"},
                               temp_dir=temp_dir,
                               log_path=tmp_dir / "ray-start.log", token=token, ports=ports)
            head.proc = _start(head_env, temp_dir, head.log_path, num_cpus, object_store_memory, ports)
            try:
                _wait_ready(head, startup_timeout_s)
                break
            except Exception:
                if attempt == attempts:
                    raise  # the finally below stops it and keeps its logs
                _stop(head)  # a port taken between picking and binding: try again with fresh ones
                shutil.rmtree(temp_dir, ignore_errors=True)
        assert head is not None
        yield head
    except BaseException:
        failed = True
        raise
    finally:
        if head is not None and head.temp_dir.exists():
            _stop(head)
            if (failed or keep_logs) and head.session_logs().exists():
                shutil.copytree(head.session_logs(), tmp_dir / "ray-session-logs", dirs_exist_ok=True,
                                ignore_dangling_symlinks=True, symlinks=False)
            shutil.rmtree(head.temp_dir, ignore_errors=True)


def submit_job(cluster: HeadCluster, entrypoint: Sequence[str] | str, runtime_env: dict | None = None,
               timeout_s: float = 300, *, via: str = "cli", submission_id: str | None = None,
               poll_s: float = 1.0) -> tuple[str, str]:
    """Submit entrypoint to the cluster and wait for it to end; return (status, logs).

    entrypoint: an argv list (quoted with shlex) or a shell command string.
    via: "cli" runs the venv's `ray job submit --no-wait` exactly as a user would (working-dir upload included);
         "sdk" uses JobSubmissionClient.submit_job. Either way, the job is then polled over HTTP.
    On timeout the job is stopped and TimeoutError carries the tail of its logs.
    """
    runtime_env = job_runtime_env() if runtime_env is None else runtime_env
    submission_id = submission_id or f"clsrl-test-{uuid.uuid4().hex[:12]}"
    client = cluster.client()
    if via == "cli":
        argv = list(entrypoint) if not isinstance(entrypoint, str) else ["sh", "-c", entrypoint]
        args = ["job", "submit", "--address", cluster.address, "--submission-id", submission_id, "--no-wait"]
        env = dict(runtime_env)
        if "working_dir" in env:  # the CLI's own flag, as the README has users write it
            args += ["--working-dir", str(env.pop("working_dir"))]
        if env:
            args += ["--runtime-env-json", json.dumps(env)]
        cluster.ray_cli(*args, "--", *argv, timeout_s=min(timeout_s, 300))
    elif via == "sdk":
        command = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
        client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=submission_id)
    else:
        raise ValueError(f"via must be 'cli' or 'sdk', not {via!r}")

    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                client.stop_job(submission_id)
            logs = _job_logs(client, submission_id)
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s}s; stopped. Logs:\n{_tail(logs)}")
        time.sleep(poll_s)
    logs = _job_logs(client, submission_id)
    if status != "SUCCEEDED":
        info = client.get_job_info(submission_id)
        logs += f"\n[job {submission_id} {status}: {info.message}]"
    return status, logs


def _job_logs(client, submission_id: str) -> str:
    try:
        return client.get_job_logs(submission_id)
    except Exception as e:
        return f"<could not fetch logs: {e!r}>"
