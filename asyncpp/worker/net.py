"""Which network interface a rank's collectives use: the one that owns its node's address.

gloo and NCCL otherwise pick an interface from the host name, which on a machine with
several networks (or a container) may be one the other nodes cannot reach.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's (first) IPv4 address


def interface_of(ip: str) -> str | None:
    """The interface whose IPv4 address is `ip`, or None."""
    for _, name in socket.if_nameindex():
        if ipv4_of(name) == ip:
            return name
    return None


def ipv4_of(interface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(packed[20:24])


def bind_collectives_to(ip: str) -> str:
    """Point gloo and NCCL at the interface owning `ip`, unless the environment already
    names one (the user's override). Returns the interface gloo will use ("" if unset)."""
    interface = interface_of(ip)
    if interface is not None:
        for var in SOCKET_IFNAME_VARS:
            os.environ.setdefault(var, interface)
    return os.environ.get("GLOO_SOCKET_IFNAME", "")
