"""stream.server: the private server is loopback-only, password-protected, and never outlives us."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from protocol.components import RedisConfig
from stream.server import PrivateRedis, connect, find_redis_server, redact_url

REPO = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """Running and not a zombie (a container's init may never reap an orphan's corpse). Every thread counts: a
    killed multi-threaded redis-server's leader turns zombie while its other threads still hold the sockets."""
    if not Path("/proc/self/task").is_dir():  # no /proc: a signal probe
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    states = []
    for tid in threads:
        try:
            states.append(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):  # that thread is gone already
            pass
    return any(state not in ("Z", "X") for state in states)


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with PrivateRedis(RedisConfig(), tmp_path_factory.mktemp("run")) as srv:
        yield srv


def test_binary_is_found():
    path = find_redis_server()
    assert os.access(path, os.X_OK)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    assert "Redis server v=" in out


def test_answers_with_the_password(server):
    c = server.client()
    assert c.ping() and server.version >= "6.2"
    assert server.url.startswith("redis://:") and "@127.0.0.1:" in server.url


def test_bound_to_loopback_with_protected_mode(server):
    c = server.client()
    assert c.config_get("bind")["bind"] == "127.0.0.1"
    assert c.config_get("protected-mode")["protected-mode"] == "yes"
    assert c.config_get("requirepass")["requirepass"] == server.password
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to check the listening sockets")
    # Every listening socket on our port, IPv4 and IPv6, must be 127.0.0.1 (0100007F in /proc's byte order).
    listen = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for row in Path(table).read_text().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                addr, port = local.rsplit(":", 1)
                if state == "0A" and int(port, 16) == server.port:
                    listen.append(addr)
    assert listen == ["0100007F"], listen


def test_rejects_unauthenticated_and_wrong_password(server):
    no_retry = Retry(NoBackoff(), 0)  # redis-py would retry AuthenticationError (a ConnectionError) for seconds
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2, retry=no_retry).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, password="guess", socket_timeout=2, retry=no_retry).ping()


def test_password_not_on_command_line_and_config_private(server):
    cmdline = Path(f"/proc/{server.proc.pid}/cmdline")
    if cmdline.exists():
        assert server.password not in cmdline.read_text()
    assert stat.S_IMODE((server.dir / "redis.conf").stat().st_mode) == 0o600
    assert stat.S_IMODE(server.dir.stat().st_mode) == 0o700
    assert server.password not in redact_url(server.url) and "***" in redact_url(server.url)


def test_process_gone_after_context_exit(tmp_path):
    with PrivateRedis(RedisConfig(), tmp_path) as srv:
        pid, port = srv.proc.pid, srv.port
        assert alive(pid)
    assert not alive(pid)
    assert refuses(port)
    srv.stop()  # idempotent


def test_start_and_stop_do_not_wait_out_client_retries(tmp_path):
    """Readiness polling and SHUTDOWN use one-try clients: a slow backoff configured for the run's clients must
    not delay either (SHUTDOWN always ends with the connection dropped)."""
    cfg = RedisConfig(retry_attempts=6, retry_backoff_s=1.0)  # a retry would wait 2 s first
    t0 = time.monotonic()
    with PrivateRedis(cfg, tmp_path) as srv:
        assert srv.client().ping()
        t1 = time.monotonic()
    assert t1 - t0 < 1.8 and time.monotonic() - t1 < 1.8


def test_server_dies_with_a_killed_parent(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux only")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from stream.server import PrivateRedis, RedisConfig
        srv = PrivateRedis(RedisConfig(), {str(tmp_path)!r}).start()
        print(srv.proc.pid, srv.port, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no context exit
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pid, port = map(int, out.stdout.split())
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not alive(pid), "redis-server outlived its killed parent"
        assert refuses(port)
    finally:
        if alive(pid):  # don't leave the orphan behind when the test fails
            os.kill(pid, signal.SIGKILL)


def test_start_failure_shows_the_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)did not start.*log tail.*maxmemory lots"):
        PrivateRedis(RedisConfig(maxmemory="lots"), tmp_path).start()


def test_connect_external_and_private(server, tmp_path):
    url, srv = connect(RedisConfig(url=server.url), tmp_path)
    assert (url, srv) == (server.url, None)
    url, srv = connect(RedisConfig(), tmp_path)
    pid = srv.proc.pid
    try:
        assert url == srv.url and redis.Redis.from_url(url).ping()
    finally:
        srv.stop()
    assert not alive(pid)
    with pytest.raises(ConnectionError, match=r"redis://:\*\*\*@127.0.0.1:1/0") as err:
        connect(RedisConfig(url="redis://:secret@127.0.0.1:1/0", connect_timeout_s=1, retry_backoff_s=0.01), tmp_path)
    assert "secret" not in str(err.value)


def test_redact_url():
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://user:pw@h/2") == "redis://user:***@h/2"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize("bad", [dict(stream_maxlen=0), dict(retry_attempts=0), dict(socket_timeout_s=0),
                                 dict(claim_idle_ms=-1), dict(stream=""), dict(appendfsync="often")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="redis."):
        RedisConfig(**bad)


# ------------------------------------------------------------------------------------------------ restart


def test_restart_keeps_url_password_and_data_dir(tmp_path, caplog):
    with PrivateRedis(RedisConfig(), tmp_path) as srv:
        url, port, conf = srv.url, srv.port, srv.dir / "redis.conf"
        c = srv.client()
        c.set("k", "v")
        for kill in (True, False):
            pid = srv.proc.pid
            srv.restart(kill=kill)
            assert srv.proc.pid != pid and not alive(pid)
            assert (srv.url, srv.port) == (url, port) and srv.dir / "redis.conf" == conf
            assert stat.S_IMODE(conf.stat().st_mode) == 0o600
            assert c.ping() and c.get("k") is None  # the same client reconnects; no AOF: the data is gone
            c.set("k", "v")
        assert srv.restarts == 2
        assert "without appendonly" in caplog.text and srv.password not in caplog.text
    assert srv.port is None and refuses(port)
    with pytest.raises(RuntimeError, match="never started, or was stopped"):
        srv.restart()


def test_restart_after_the_server_died_and_with_appendonly(tmp_path):
    with PrivateRedis(RedisConfig(appendonly=True), tmp_path) as srv:
        c = srv.client()
        assert c.config_get("appendfsync")["appendfsync"] == "always"
        c.set("k", "v")
        pid = srv.proc.pid
        os.kill(pid, signal.SIGKILL)  # a crash from outside (OOM killer, kill -9)
        srv.proc.wait()
        assert refuses(srv.port)
        srv.restart()
        assert redis.Redis.from_url(srv.url).get("k") == b"v"  # replayed from the AOF


def test_restart_fails_clearly_when_the_port_was_taken(tmp_path):
    with PrivateRedis(RedisConfig(start_timeout_s=1), tmp_path) as srv:
        port = srv.port
        srv._terminate(kill=True)
        with socket.socket() as squatter:  # someone else binds the port while the server is down
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            with pytest.raises(RuntimeError, match=rf"(?s)did not restart on 127.0.0.1:{port}.*cannot move.*in use"):
                srv.restart()
        assert srv.proc is None and srv.port is None
