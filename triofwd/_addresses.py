"""Addresses as the rest of the program names them: IP types, listener keys, "ip:port" text.

Pure code. `client_address` unwraps IPv4-mapped IPv6 (what a dual-stack "::" listener
reports), so an IPv4 client is one address to limits, lists and logs however it arrived.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["UDP_OWNER", "IPAddress", "IPNetwork", "ListenKey", "client_address", "format_address", "in_any", "is_udp", "merge_ranges"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# (bind address, port, owner). owner is "" for a port shared by every route that names
# it; for port 0 it is the route's name, because each such route gets its own
# ephemeral port (what tests and embedders use). A UDP listener's owner ends with
# UDP_OWNER ("/udp" for a shared port, "name/udp" for port 0): route names cannot hold a
# "/", so a TCP and a UDP listener on the same address and port are two keys.
ListenKey = tuple[str, int, str]
UDP_OWNER = "/udp"


def is_udp(key: ListenKey) -> bool:
    """The listener receives datagrams (a `protocol = "udp"` route's), not connections."""
    return key[2].endswith(UDP_OWNER)


def format_address(address: tuple[object, ...]) -> str:
    """'ip:port', with IPv6 in brackets."""
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def client_address(text: str) -> IPAddress:
    """The client's address, with IPv4-mapped IPv6 (dual-stack "::" listeners) unwrapped."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_any(ip: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Inclusive (low, high) ranges, overlapping and adjacent ones merged, in order."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)
