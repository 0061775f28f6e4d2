"""Listening sockets for worker processes: one SO_REUSEPORT group per listener, one socket of
it per worker, bound by the supervisor and kept open by it for as long as the listener lives.

The kernel picks one socket of a group for each new connection, by default by a hash of its
addresses and ports: connections spread evenly, each worker accepting from its own queue
(no thundering herd). On a port whose routes limit connections per client IP, a classic BPF
program attached to the group (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5) picks the socket by the
client address alone, the same worker on every such port, so each client's connections all
reach one worker and its per-IP counts and rates are exact.

A UDP listener's group: the kernel picks a socket for every datagram, not once per
connection. Its hash of addresses and ports is the same for every datagram of a flow, so a
flow's datagrams all reach the one worker that holds its session; where a per-IP limit
applies the program steers the group, so all of a client's flows reach the worker that
counts them. A reload that adds or removes such a limit attaches or detaches the program,
which moves live flows to another worker (a new session there).

A socket stays in its group while any process holds it: the supervisor's copy keeps a
worker's queue alive while that worker is replaced (a connection waits, it is not refused;
a datagram waits in the socket's receive buffer).
"""

from __future__ import annotations

import ctypes
import dataclasses
import socket
from collections.abc import Iterable

from ._addresses import ListenKey, format_address, is_udp
from ._datagrams import bind_datagrams
from ._errors import listen_error
from ._table import RouteTable

__all__ = ["BACKLOG", "Group", "bind_group", "close_groups", "steer", "steered_keys", "steering_program"]

# listen(2)'s backlog, as trio asks for it: the kernel clips it to net.core.somaxconn.
BACKLOG = 0xFFFF
# asm-generic/socket.h
SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
# linux/filter.h: a load at this offset and beyond reads the packet from its network header.
# The program runs with the packet's data pointer past the transport header (the TCP header,
# or the 8 bytes of UDP: net/core/sock_reuseport.c, reuseport_select_sock's hdr_len), so an
# absolute load would read the payload; one relative to the network header reads the source
# address for TCP and UDP alike.
SKF_NET_OFF = -0x100000
# Classic BPF instructions used here (linux/bpf_common.h: class | size/op | source).
LD_W_ABS = 0x00 | 0x00 | 0x20  # A = 32 bits at k
ALU_RSH_K = 0x04 | 0x70 | 0x00  # A >>= k
ALU_XOR_X = 0x04 | 0xA0 | 0x08  # A ^= X
ALU_MOD_K = 0x04 | 0x90 | 0x00  # A %= k
MISC_TAX = 0x07 | 0x00  # X = A
RET_A = 0x06 | 0x10  # return A: the index of the socket in the group
# Where the source address sits in the network header: IPv4 at 12 (4 bytes), IPv6 at 8 (16).
SOURCE_WORDS: dict[int, tuple[int, ...]] = {socket.AF_INET: (12,), socket.AF_INET6: (8, 12, 16, 20)}

Instruction = tuple[int, int, int, int]  # code, jt, jf, k


@dataclasses.dataclass(eq=False)
class Group:
    """One listener's sockets: `sockets[i]` is worker i's, in the order they joined the group."""

    key: ListenKey
    sockets: list[socket.socket]
    steered: bool = False  # the client-address program is attached
    # systemd's socket (socket activation), the same one for every worker: one queue they
    # all accept from, never steered; given back, not closed, when a reload drops it.
    activated: bool = False
    address: str = dataclasses.field(init=False)  # "ip:port" as bound (port 0 resolved)

    def __post_init__(self) -> None:
        self.address = format_address(self.sockets[0].getsockname())

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def bind_group(key: ListenKey, count: int) -> Group:
    """`count` listening sockets for `key`, all in one SO_REUSEPORT group; ListenError (one
    line) when the address cannot be bound, with nothing left open.

    They join the group in the order they listen (TCP) or bind (UDP), which is the index a
    BPF program returns. Port 0: the first socket asks the kernel for a port, the others
    take the same one. A UDP key's sockets are bound as a single process binds its own
    (bind_datagrams: the same receive buffer, IPv6-only "::"), and the worker that gets one
    sets IP_PKTINFO on it as on any UDP listener.
    """
    bind, port, _ = key
    udp = is_udp(key)
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            if udp:
                sock = bind_datagrams(bind, port, reuse_port=True)
                sockets.append(sock)
                port = sock.getsockname()[1]
                continue
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as trio's open_tcp_listeners: "::" is IPv6 only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((bind, port))
            port = sock.getsockname()[1]
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise listen_error(exc, f"listen on {format_address((bind, port))}{' (udp)' if udp else ''}") from None
    return Group(key, sockets)


def steered_keys(table: RouteTable) -> set[ListenKey]:
    """The listeners whose connections go to a worker by client address: those where a
    per-IP limit applies (every one when [settings] sets one, which counts across ports).
    Elsewhere the kernel's own hash of the addresses and ports picks the socket, which for
    UDP keeps every datagram of one flow on one socket, so it meets its session, while a
    crowd of flows from one address (a NAT) still spreads over the workers."""
    if table.limits.max_connections_per_ip or table.limits.connection_rate_per_ip:
        return set(table.by_listener)
    return {key for key, routes in table.by_listener.items() if any(r.limits.max_connections_per_ip or r.limits.connection_rate_per_ip for r in routes)}


def steering_program(family: int, count: int) -> list[Instruction]:
    """A classic BPF program for a reuseport group of `count` sockets of `family`: the
    index of the socket for a new connection, from its source address alone (folded to 32
    bits, mixed so that addresses differing in any byte spread, modulo `count`)."""
    words = SOURCE_WORDS[family]
    program: list[Instruction] = [(LD_W_ABS, 0, 0, SKF_NET_OFF + words[0])]
    for offset in words[1:]:
        program += [(MISC_TAX, 0, 0, 0), (LD_W_ABS, 0, 0, SKF_NET_OFF + offset), (ALU_XOR_X, 0, 0, 0)]
    for shift in (16, 8):  # A ^= A >> shift
        program += [(MISC_TAX, 0, 0, 0), (ALU_RSH_K, 0, 0, shift), (ALU_XOR_X, 0, 0, 0)]
    return [*program, (ALU_MOD_K, 0, 0, count), (RET_A, 0, 0, 0)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def steer(group: Group, by_client: bool) -> None:
    """Attach the client-address program to the group (by_client), or detach it: the kernel's
    own hash of the connection then picks. OSError when the kernel refuses the program."""
    if by_client == group.steered:
        return
    sock = group.sockets[0]
    if by_client:
        program = steering_program(sock.family, len(group.sockets))
        filters = (_SockFilter * len(program))(*(_SockFilter(code, jt, jf, k & 0xFFFFFFFF) for code, jt, jf, k in program))
        fprog = _SockFprog(len(program), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))  # the kernel copies the program
    else:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    group.steered = by_client


def close_groups(groups: Iterable[Group]) -> None:
    for group in groups:
        group.close()
