"""Which local address and interface a process group binds to: the one holding this node's cluster IP, never
the one the hostname resolves to.

gloo's default device binds to the hostname's address, which is 127.0.0.1 on stock Debian hosts: it then
advertises 127.0.0.1 to its peers and a group spanning two nodes never forms (connectFullMesh times out after
minutes). NCCL picks an interface by its own rules, and may pick one other nodes cannot reach. So every group
we form binds to the interface that holds the Ray node IP (or, when there is none, the address the kernel
routes to the peer from), unless the user chose one with GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.
"""
from __future__ import annotations

import os
import random
import socket
from collections.abc import MutableMapping
from pathlib import Path

import psutil

GLOO_VAR = "GLOO_SOCKET_IFNAME"
NCCL_VAR = "NCCL_SOCKET_IFNAME"
# below the kernel's ephemeral range and above Ray's worker ports (10002-19999 by default)
LISTEN_PORTS_FROM = 20000


def route_source(peer: str) -> str:
    """The local IPv4 address the kernel uses to reach `peer` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def interface_of(ip: str) -> str:
    """The name of the interface holding `ip`; a clear error naming what this host has otherwise."""
    found = psutil.net_if_addrs()
    for name, addrs in found.items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    have = ", ".join(f"{n} {a.address}" for n, addrs in sorted(found.items()) for a in addrs
                     if a.family == socket.AF_INET)
    raise RuntimeError(f"no network interface on {socket.gethostname()} holds {ip} (this host has: {have}); "
                       f"set {GLOO_VAR} (and {NCCL_VAR} on GPUs) to the interface other nodes reach")


def bind_collectives(node_ip: str, env: MutableMapping[str, str] = os.environ) -> tuple[str, str]:
    """Point gloo and NCCL (which read these variables when a group is created) at the interface holding
    `node_ip`, leaving a variable the user set alone. Returns (interface gloo uses, where it came from)."""
    name = interface_of(node_ip)
    if env.get(GLOO_VAR):
        source = f"{GLOO_VAR} (set by the user)"
    else:
        env[GLOO_VAR] = name
        source = f"the interface holding {node_ip}"
    if not env.get(NCCL_VAR):
        env[NCCL_VAR] = f"={name}"  # "=": this interface exactly, not every name it prefixes
    return env[GLOO_VAR], source


def gloo_devices(peer: str) -> list:
    """gloo devices for a group whose rank 0 is at `peer`: the user's GLOO_SOCKET_IFNAME interfaces, else one
    bound to the local address that reaches `peer` (a stateless group has no Ray node IP to hand)."""
    import torch.distributed as dist

    chosen = os.environ.get(GLOO_VAR)
    if chosen:
        return [dist.ProcessGroupGloo.create_device(interface=i) for i in chosen.split(",") if i]
    return [dist.ProcessGroupGloo.create_device(hostname=route_source(peer))]


def ephemeral_ports(proc_file: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The range the kernel draws bind(0) and outgoing connections' local ports from."""
    try:
        low, high = (int(v) for v in Path(proc_file).read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def listen_port(host: str, rng: random.Random | None = None, tries: int = 50) -> int:
    """A port free on `host` now, for a server that binds it a moment later (a rendezvous, Redis). Taken
    below the ephemeral range when there is room: a bind(0) port lies inside it, where every outgoing
    connection on the node draws its local port, so on a busy node one of them could take the port before
    the server binds it (EADDRINUSE); below the range only an explicit bind can."""
    low, _ = ephemeral_ports()
    pool = range(LISTEN_PORTS_FROM, low)
    picks = (rng or random.Random()).sample(pool, tries) if len(pool) >= tries else []
    for port in [*picks, 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host}")  # bind(0) failed too: the host has no port left
