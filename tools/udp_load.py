"""UDP request-response load and an echo target, for the UDP group of tools/bench.py.

    python tools/udp_load.py echo [--port 0]
    python tools/udp_load.py load PORT [--flows 64] [--duration 4] [--size 64] [--timeout 0.5]

`echo` is the target: one socket on 127.0.0.1 that sends every datagram back to where it came
from. It prints "ready PORT" and runs until it is stopped. It takes what is queued in batches,
recvmmsg(2) and sendmmsg(2) through ctypes (a plain recvfrom/sendto loop where libc has no
such calls), so a datagram costs it the kernel's work and little else.

`load` is the client: --flows UDP sockets, each from an address of its own (127.1.0.1,
127.1.0.2, ...: as many clients) and connected to 127.0.0.1:PORT (a flow, and so a session of
its own in a forwarder), each keeping exactly one datagram of --size bytes in
flight: send, wait for the reply, send the next, as a DNS client or a game client does. All
flows live in one epoll loop that takes every ready socket per wakeup. First each flow makes
one round trip alone, one flow after the other (socat forks a process per new flow and must
see them one at a time); then the flows run together for --duration seconds. A reply not back
within --timeout counts as lost and the flow sends again. Prints one JSON object: round trips,
datagrams (two per round trip, each way through the forwarder once), seconds, this process's
own CPU seconds, losses, and round-trip times (median, p99) in ms. With --announce it prints
"ready" when the flows are set up, starts the timed part when a line "go" comes on stdin, and
prints "stop" the moment it ends, before the JSON: tools/bench.py reads the CPU time of the
forwarder and of the echo target between the two.

Run alone, against anything that forwards UDP to an echo target:

    python tools/udp_load.py echo &                     # prints "ready 40000"
    python tools/udp_load.py load 40000 --duration 2    # straight to the echo: the rig's ceiling
"""

from __future__ import annotations

import argparse
import array
import ctypes
import ctypes.util
import json
import os
import select
import socket
import sys
import time

LOCALHOST = "127.0.0.1"
BATCH = 256  # datagrams the echo takes per recvmmsg, events the load takes per epoll wait
SLOT = 2048  # bytes of buffer per datagram in the echo's batch (the load sends --size bytes)
MSG_WAITFORONE = 0x10000  # recvmmsg: block for the first datagram only


# ---------------------------------------------------------------------------------------------
# The echo target.


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc_mmsg() -> tuple[object, object] | None:
    """libc's recvmmsg and sendmmsg, or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    recvmmsg.restype = sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


def echo(port: int) -> None:
    """Send every datagram back to its sender, a batch per system call each way, until killed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind((LOCALHOST, port))
    print("ready", sock.getsockname()[1], flush=True)
    calls = _libc_mmsg()
    if calls is None:  # no recvmmsg here: one datagram per system call
        while True:
            data, peer = sock.recvfrom(65536)
            sock.sendto(data, peer)
    recvmmsg, sendmmsg = calls
    fd = sock.fileno()
    data = ctypes.create_string_buffer(SLOT * BATCH)
    names = ctypes.create_string_buffer(16 * BATCH)  # a sockaddr_in each: the socket is IPv4
    iovs = (_Iovec * BATCH)()
    msgs = (_Mmsghdr * BATCH)()
    base, name_base, vec = ctypes.addressof(data), ctypes.addressof(names), ctypes.addressof(msgs)
    step = ctypes.sizeof(_Mmsghdr)
    for i in range(BATCH):
        iovs[i].iov_base, iovs[i].iov_len = base + i * SLOT, SLOT
        hdr = msgs[i].msg_hdr
        hdr.msg_name, hdr.msg_namelen = name_base + 16 * i, 16  # the kernel writes 16 back: left as is
        hdr.msg_iov, hdr.msg_iovlen = ctypes.pointer(iovs[i]), 1
    while True:
        n = recvmmsg(fd, vec, BATCH, MSG_WAITFORONE, None)  # type: ignore[operator]
        if n < 0:
            err = ctypes.get_errno()
            if err == 4:  # EINTR
                continue
            raise OSError(err, os.strerror(err))
        for i in range(n):
            iovs[i].iov_len = msgs[i].msg_len
        sent = 0
        while sent < n:  # a blocking socket: sendmmsg stops early only on an error for one datagram
            done = sendmmsg(fd, vec + sent * step, n - sent, 0)  # type: ignore[operator]
            sent += done if done > 0 else 1  # that datagram's error (its sender gone): skip it
        for i in range(n):
            iovs[i].iov_len = SLOT


# ---------------------------------------------------------------------------------------------
# The load.


def _percentile(sorted_ns: array.array[int], fraction: float) -> float | None:
    if not sorted_ns:
        return None
    return sorted_ns[min(len(sorted_ns) - 1, int(fraction * len(sorted_ns)))] / 1e6


def client_address(i: int) -> str:
    """Flow i's own source address, 127.1.0.1 on (loopback takes all of 127.0.0.0/8): many
    clients as a server sees them, spread over the workers of a forwarder that steers UDP
    by client address, and none of them 127.0.0.1 where the forwarder and target live."""
    return f"127.1.{i // 250}.{i % 250 + 1}"


def _setup(port: int, payload: bytes, timeout: float, source: str) -> socket.socket:
    """A flow's socket, connected to the forwarder, its first round trip done (its session made)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.connect((LOCALHOST, port))
    sock.settimeout(timeout)
    for _ in range(10):
        sock.send(payload)
        try:
            sock.recv(SLOT)
            break
        except TimeoutError:
            continue
        except ConnectionRefusedError:  # nothing listening yet, or the forwarder's flow refused
            time.sleep(timeout)
    else:
        sock.close()
        raise SystemExit(f"udp_load: no reply from 127.0.0.1:{port} after 10 tries")
    sock.setblocking(False)
    return sock


def load(port: int, flows: int, duration: float, size: int, timeout: float, announce: bool = False) -> dict[str, float | int | None]:
    """`flows` flows, one datagram in flight each, for `duration` seconds: the counts and times."""
    payload = b"x" * size
    socks = [_setup(port, payload, max(timeout, 0.5), client_address(i)) for i in range(flows)]
    if announce:  # tools/bench.py takes its CPU readings, then says go
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("udp_load: no go on stdin")
    fds = [s.fileno() for s in socks]
    poller = select.epoll(sizehint=flows)
    sent_at = [0] * (max(fds) + 1)
    for fd in fds:
        poller.register(fd, select.EPOLLIN)
    rtts = array.array("q")
    record, read, write, clock = rtts.append, os.read, os.write, time.perf_counter_ns
    lost = errors = 0
    timeout_ns, check_every = int(timeout * 1e9), 50_000_000
    cpu0, t0 = os.times(), clock()
    end, next_check = t0 + int(duration * 1e9), t0 + check_every
    for fd in fds:
        sent_at[fd] = clock()
        write(fd, payload)
    while True:
        events = poller.poll(0.05, BATCH)
        for fd, _ in events:
            try:
                read(fd, SLOT)
            except BlockingIOError:
                continue
            except ConnectionRefusedError:  # an ICMP error queued on the flow: its datagram is gone
                errors += 1
            now = clock()
            record(now - sent_at[fd])
            sent_at[fd] = now
            write(fd, payload)
        now = clock()
        if now >= end:
            break
        if now >= next_check:  # a reply that never came (dropped on the way): send again
            next_check = now + check_every
            for fd in fds:
                if now - sent_at[fd] > timeout_ns:
                    lost += 1
                    sent_at[fd] = now
                    write(fd, payload)
    t1, cpu1 = clock(), os.times()
    if announce:  # no datagram is sent after this: tools/bench.py's CPU readings end here
        print("stop", flush=True)
    for sock in socks:
        sock.close()
    poller.close()
    trips = len(rtts)
    elapsed = (t1 - t0) / 1e9
    rtts = array.array("q", sorted(rtts))
    return {
        "round_trips": trips,
        "datagrams": 2 * trips,
        "seconds": round(elapsed, 4),
        "cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 3),
        "lost": lost,
        "errors": errors,
        "flows": flows,
        "size": size,
        "rtt_p50_ms": _percentile(rtts, 0.50),
        "rtt_p99_ms": _percentile(rtts, 0.99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_echo = sub.add_parser("echo", help="the echo target")
    p_echo.add_argument("--port", type=int, default=0, help="UDP port on 127.0.0.1 (0: any; printed)")
    p_load = sub.add_parser("load", help="request-response load; prints JSON")
    p_load.add_argument("port", type=int, help="UDP port on 127.0.0.1: a forwarder, or the echo itself")
    p_load.add_argument("--flows", type=int, default=64, help="client sockets, one datagram in flight each (default 64)")
    p_load.add_argument("--duration", type=float, default=4.0, help="seconds of load (default 4)")
    p_load.add_argument("--size", type=int, default=64, help="bytes per datagram (default 64)")
    p_load.add_argument("--timeout", type=float, default=0.5, help="a reply later than this is lost: sent again (default 0.5 s)")
    p_load.add_argument("--announce", action="store_true", help='print "ready" when set up, wait for "go" on stdin, print "stop" at the end')
    args = parser.parse_args(argv)
    if args.command == "echo":
        try:
            echo(args.port)
        except KeyboardInterrupt:
            return 0
    print(json.dumps(load(args.port, args.flows, args.duration, args.size, args.timeout, args.announce)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
