"""Addresses for several nodes, without a cluster: which interface process groups bind to, where the private
Redis listens, redis.url from the environment, roles placed by custom resources. The multi-node behaviour
itself is tests/test_multinode.py."""
from __future__ import annotations

import itertools
import socket

import pytest
import redis

from cluster.placement import plan_bundles
from protocol.components import RedisConfig
from protocol.config import ClusterConfig
from protocol.overrides import ConfigError
from stream.server import PrivateRedis, configured_url, connect, make_client
from weights.network import (
    GLOO_VAR,
    LISTEN_PORTS_FROM,
    NCCL_VAR,
    bind_collectives,
    ephemeral_ports,
    interface_of,
    listen_port,
    route_source,
)


def test_collectives_bind_to_the_interface_holding_the_node_ip_unless_the_user_chose_one():
    env: dict[str, str] = {}
    assert bind_collectives("127.0.0.1", env) == ("lo", "the interface holding 127.0.0.1")
    assert env == {GLOO_VAR: "lo", NCCL_VAR: "=lo"}
    mine = {GLOO_VAR: "eth7", NCCL_VAR: "ib0"}
    assert bind_collectives("127.0.0.1", mine)[0] == "eth7"
    assert mine == {GLOO_VAR: "eth7", NCCL_VAR: "ib0"}


class _Fixed:
    """A Random whose sample is the given ports, in order."""

    def __init__(self, ports):
        self.ports = ports

    def sample(self, pool, k):
        assert all(p in pool for p in self.ports)
        return self.ports


def test_a_listen_port_is_free_and_below_the_range_outgoing_connections_take_their_ports_from():
    low, high = ephemeral_ports()
    assert 1024 <= low < high
    for _ in range(20):
        port = listen_port("127.0.0.1")
        assert LISTEN_PORTS_FROM <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # it really is free
    taken, free = itertools.islice((p for p in range(LISTEN_PORTS_FROM, low) if _bindable(p)), 2)
    with socket.socket() as held:
        held.bind(("127.0.0.1", taken))
        held.listen()
        assert listen_port("127.0.0.1", _Fixed([taken, free])) == free  # a port in use is passed over


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_an_address_no_interface_holds_is_named_with_what_the_host_has():
    with pytest.raises(RuntimeError, match=r"no network interface .* holds 192\.0\.2\.77 .*lo 127\.0\.0\.1"):
        interface_of("192.0.2.77")
    assert route_source("127.0.0.1") == "127.0.0.1"


def _reachable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def test_private_redis_listens_on_the_cluster_address_too_only_when_asked(tmp_path):
    # 127.0.0.2 stands in for the driver node's cluster IP (it is on lo, so no namespace is needed)
    with PrivateRedis(RedisConfig(), tmp_path / "a", die_with_parent=False, host="127.0.0.2") as srv:
        assert "@127.0.0.2:" in srv.url and len(srv.password) * 4 >= 128
        assert _reachable("127.0.0.2", srv.port) and _reachable("127.0.0.1", srv.port)
        assert srv.client().ping()
        with pytest.raises(redis.AuthenticationError):
            make_client(f"redis://127.0.0.2:{srv.port}/0").set("k", "v")
    with PrivateRedis(RedisConfig(), tmp_path / "b", die_with_parent=False) as srv:
        assert "@127.0.0.1:" in srv.url
        assert not _reachable("127.0.0.2", srv.port)


def test_redis_url_from_an_environment_variable(tmp_path, monkeypatch):
    with PrivateRedis(RedisConfig(), tmp_path, die_with_parent=False) as srv:
        monkeypatch.setenv("CLSRL_TEST_REDIS_URL", srv.url)
        cfg = RedisConfig(url="env:CLSRL_TEST_REDIS_URL")
        assert configured_url(cfg) == srv.url
        url, server = connect(cfg, tmp_path)
        assert url == srv.url and server is None
    monkeypatch.delenv("CLSRL_TEST_REDIS_URL")
    with pytest.raises(ConfigError, match="CLSRL_TEST_REDIS_URL is not set"):
        configured_url(RedisConfig(url="env:CLSRL_TEST_REDIS_URL"))


def test_roles_ask_for_their_custom_resources():
    cluster = ClusterConfig(role_resources={"rollout": {"rollout_node": 1}, "learner": {"learner_node": 1}})
    by_role = {(r, i): res for r, i, res in plan_bundles(cluster)}
    assert by_role[("rollout", 1)] == {"CPU": 1.0, "rollout_node": 1.0}
    assert by_role[("learner", 0)] == {"CPU": 1.0, "learner_node": 1.0}
    assert by_role[("reward", 0)] == {"CPU": 0.5}
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['rollouts'\]"):
        plan_bundles(ClusterConfig(role_resources={"rollouts": {"x": 1}}))
    with pytest.raises(ValueError, match="custom resource"):
        plan_bundles(ClusterConfig(role_resources={"learner": {"GPU": 1}}))


def test_a_literal_redis_password_is_not_written_to_the_run_record():
    from cluster.job import recorded_config
    from commands.cli import DEFAULT_CONFIG
    from protocol.config import ExperimentConfig
    from protocol.overrides import load_config

    cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, ["redis.url=redis://:s3cret-pw@10.0.0.5:6380/0"])
    assert cfg.redis.url == "redis://:s3cret-pw@10.0.0.5:6380/0"  # the run itself still uses it
    assert recorded_config(cfg)["redis"]["url"] == "redis://:***@10.0.0.5:6380/0"
    plain = load_config(ExperimentConfig, DEFAULT_CONFIG, ["redis.url=env:CLSRL_REDIS_URL"])
    assert recorded_config(plain)["redis"]["url"] == "env:CLSRL_REDIS_URL"
