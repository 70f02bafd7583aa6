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
import socket
from collections.abc import MutableMapping

import psutil

GLOO_VAR = "GLOO_SOCKET_IFNAME"
NCCL_VAR = "NCCL_SOCKET_IFNAME"


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
