"""The data engine (triofwd/_engine.py) through the real serve(), on real sockets on 127.0.0.1.

Back-pressure with a stalled reader, half-close each way, partial sends, the quiet limits
while bytes trickle, resets seen as EPOLLERR/EPOLLHUP, a kill with bytes parked, churn,
and one relay's bug kept to that relay. The cases that move bytes run on both of the
engine's paths (the `path` fixture): copying every chunk (`SPLICE` off) and splice for bulk.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import logging
import os
import pathlib
import select
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

import triofwd
import triofwd._engine
from tests.conftest import (
    ECHO_SERVER,
    AccessLogCapture,
    Handler,
    backend,
    black_hole,
    config,
    connect,
    echo,
    fd_kinds,
    forwarder,
    open_fds,
    receive_all,
    receive_exactly,
    route,
    rst_close,
    split,
)
from triofwd._engine import Engine, Relay, Side
from triofwd._idle import IdleWatch
from triofwd._record import Connection
from triofwd._splice import CHUNK, COPY_CHUNK, POOL, SPLICE_AT

MIB = 1024 * 1024
# One megabyte of noise; block i of a stream is it with i in its first 8 bytes, so a block
# lost, repeated or reordered changes the stream's digest.
NOISE = os.urandom(MIB)


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(params=["copy", "splice"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both of the engine's paths: "copy" turns splice off (every chunk through the buffer)."""
    if request.param == "copy":
        monkeypatch.setattr(triofwd._engine, "SPLICE", False)
    return str(request.param)


def block(i: int) -> bytes:
    return struct.pack(">Q", i) + NOISE[8:]


class Meter:
    """Bytes seen so far, and their digest."""

    def __init__(self) -> None:
        self.count = 0
        self._sha = hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.count += len(data)
        self._sha.update(data)

    @property
    def digest(self) -> str:
        return self._sha.hexdigest()


async def send_blocks(stream: trio.abc.SendStream, total: int, meter: Meter) -> None:
    for i in range(total // MIB):
        data = block(i)
        await stream.send_all(data)
        meter.add(data)


async def receive_into(stream: trio.abc.ReceiveStream, meter: Meter, max_bytes: int = MIB) -> None:
    """Everything until EOF."""
    while data := await stream.receive_some(max_bytes):
        meter.add(data)


def engine_of(fwd: triofwd.Forwarder) -> Engine:
    return fwd._context.engine


def relay_of(fwd: triofwd.Forwarder, conn: Connection) -> Relay:
    [relay] = [relay for relay in engine_of(fwd)._relays if relay.conn is conn]
    return relay


def held(side: Side) -> int:
    """Bytes the engine holds for this side's direction: parked (copied out) or in a pipe."""
    parked = 0 if side.parked is None else len(side.parked)
    return parked + (side.left if side.pipe is not None else 0)


def queued(sock: socket.socket | trio.socket.SocketType, request: int) -> int:
    """A socket's bytes in the kernel: FIONREAD (received, unread) or TIOCOUTQ (not yet acked)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])


def memory(field: str = "VmRSS") -> int:
    """The process's resident memory now (VmRSS), or at its peak since reset_peak() (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """From here VmHWM is the peak of what follows (Linux >= 4.0: "5" to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def pipes_outside_the_pool() -> int:
    """Pipe fds open beyond the idle pool's (2 each): pipes someone holds."""
    return fd_kinds()["pipe"] - 2 * len(POOL)


def fds_outside_the_pool() -> int:
    """The process's open fds but the idle pipe pool's (which a pipe taken from it and then
    closed, as a kill does, shrinks)."""
    return open_fds() - 2 * len(POOL)


async def settled(read: Callable[[], object], timeout: float = 20) -> Any:
    """What `read()` says once nothing moves any more: every task is blocked (for a
    moment, so loopback packets land) and it reads the same as at the moment before."""
    last: object = object()
    with trio.fail_after(timeout):
        while True:
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            now = read()
            if now == last:
                return now
            last = now


async def ended(fwd: triofwd.Forwarder, log: AccessLogCapture, count: int = 1, timeout: float = 5) -> list[dict[str, Any]]:
    """The access-log lines once `count` connections have ended; the engine holds nothing of them."""
    records = await log.wait(count, timeout)
    assert not fwd.connections
    assert engine_of(fwd).registered == 0
    assert fwd.stats()["engine"]["sockets"] == 0
    return records


def shrink_send_buffers(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """The forwarder's two sockets of every relay get SO_SNDBUF `size` as the engine takes them."""
    attached = Engine.attached

    def small_send_buffers(self: Engine, conn: Connection, client: socket.socket, target: socket.socket, policy: Any) -> Relay:
        for sock in (client, target):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        return attached(self, conn, client, target, policy)

    monkeypatch.setattr(Engine, "attached", small_send_buffers)


@contextlib.asynccontextmanager
async def small_window_backend(handler: Handler, rcvbuf: int) -> AsyncIterator[str]:
    """backend() whose accepted sockets have a small SO_RCVBUF (set on the listener before
    listen(), so the window offered in the handshake is small too)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.bind(("127.0.0.1", 0))
    sock.listen()
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [listener])
        yield "127.0.0.1:%d" % sock.getsockname()[1]
        nursery.cancel_scope.cancel()


async def connect_small_window(fwd: triofwd.Forwarder, rcvbuf: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(split(fwd.addresses["r"][0]))
    return trio.SocketStream(sock)


# -- 1. back-pressure ---------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_a_stalled_reader_holds_100_megabytes_back_then_gets_every_byte(path: str, direction: str) -> None:
    """The reader (the target for an upload, the client for a download) reads nothing while
    the other side sends 100 MiB: the sender is held back, the engine holds at most one
    chunk (parked bytes up to the copy buffer, or one pipe) and the process's memory stays
    flat (its peak RSS, sender, reader and forwarder together, under 16 MiB above where it
    started); then the reader reads and the whole stream arrives, digest and count exact."""
    total = 100 * MIB
    release, accepted = trio.Event(), trio.Event()
    sent, received = Meter(), Meter()

    async def target(stream: trio.SocketStream) -> None:
        accepted.set()
        async with stream:
            if direction == "download":
                await send_blocks(stream, total, sent)
                await stream.send_eof()
                assert await receive_all(stream) == b""
            else:
                await release.wait()
                await receive_into(stream, received)

    log = AccessLogCapture()
    async with backend(target) as address, forwarder(config(route(targets=[address])), access_log=log) as fwd:
        client = await connect(fwd)
        with trio.fail_after(60):
            await accepted.wait()
            [conn] = fwd.connections.values()
            borrowed = POOL.borrowed
            engine, counter = engine_of(fwd), "bytes_in" if direction == "upload" else "bytes_out"
            start = memory()
            reset_peak()
            async with trio.open_nursery() as nursery:
                if direction == "upload":
                    nursery.start_soon(send_blocks, client, total, sent)
                # Stalled: no byte moves and the engine is not woken (level-triggered, a
                # socket it waits to write to must not wake it while full).
                stalled_at = await settled(lambda: (sent.count, getattr(conn, counter), engine.batches))
                relay = relay_of(fwd, conn)
                source = relay.client if direction == "upload" else relay.target
                holding, pipe = held(source), source.pipe is not None
                interest = (source.interest, source.peer.interest)
                release.set()
                if direction == "download":
                    await receive_into(client, received)
            grown = memory("VmHWM") - start
            if direction == "upload":
                await client.send_eof()
                assert await receive_all(client) == b""
            await client.aclose()
            [record] = await ended(fwd, log)
    # Held back: the sender wrote what the kernel's buffers take, far from all of it.
    assert stalled_at[0] < 60 * MIB, stalled_at
    assert stalled_at[1] < 20 * MIB, stalled_at
    # One chunk held, reading stopped: the source is watched for nothing (errors only), its
    # destination for room to write (and for its own direction's bytes, still read).
    assert 0 < holding <= (CHUNK if path == "splice" else COPY_CHUNK)
    assert pipe == (path == "splice")
    assert interest == (0, select.EPOLLOUT | select.EPOLLIN)
    assert grown < 16 * MIB, f"peak RSS {grown / MIB:.1f} MiB above the start"
    assert (received.count, received.digest) == (sent.count, sent.digest) == (total, sent.digest)
    assert (record["bytes_in"], record["bytes_out"], record["reason"]) == ((total, 0) if direction == "upload" else (0, total)) + ("normal",)
    if path == "copy":
        assert POOL.borrowed == borrowed
    else:
        assert POOL.borrowed > borrowed


# -- 2. half-close, each way ----------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 8 * MIB])
async def test_client_half_close_then_the_whole_reply(path: str, size: int) -> None:
    """The client shuts its write side; the target sees EOF only after the whole request,
    then sends a reply of the same size (the request reversed: it needed all of it)."""
    request = os.urandom(size)

    async def reverse(stream: trio.SocketStream) -> None:
        async with stream:
            got = await receive_all(stream)  # until the EOF the engine passed on
            await stream.send_all(got[::-1])

    log = AccessLogCapture()
    async with backend(reverse) as address, forwarder(config(route(targets=[address])), access_log=log) as fwd:
        client = await connect(fwd)
        with trio.fail_after(20):
            await client.send_all(request)
            await client.send_eof()
            reply = await receive_all(client)
            await client.aclose()
            [record] = await ended(fwd, log)
    assert reply == request[::-1]
    assert (record["bytes_in"], record["bytes_out"], record["reason"]) == (size, size, "normal")


@pytest.mark.parametrize("size", [10, 8 * MIB])
async def test_target_half_close_then_the_client_keeps_sending(path: str, size: int) -> None:
    """The target sends a greeting and shuts its write side; the client gets the greeting
    and EOF, then sends a request of the same size, which the target receives whole."""
    greeting = os.urandom(size)
    heard: list[bytes] = []
    done = trio.Event()

    async def greet_then_listen(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(greeting)
            await stream.send_eof()
            heard.append(await receive_all(stream))
        done.set()

    log = AccessLogCapture()
    async with backend(greet_then_listen) as address, forwarder(config(route(targets=[address])), access_log=log) as fwd:
        client = await connect(fwd)
        with trio.fail_after(20):
            assert await receive_all(client) == greeting  # and then EOF
            await client.send_all(greeting[::-1])
            await client.send_eof()
            [record] = await ended(fwd, log)  # both directions done: the engine ended it
            await done.wait()
            await client.aclose()
    assert heard == [greeting[::-1]]
    assert (record["bytes_in"], record["bytes_out"], record["reason"]) == (size, size, "normal")


@pytest.mark.parametrize("waiting", ["client", "target"])
async def test_a_side_shut_both_ways_while_its_bytes_wait(
    path: str, waiting: str, error_events: list[tuple[str, int, bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One side's peer half-closed first (so the engine shut this side's write half); then this
    side sends 96 KiB and its FIN while the peer reads nothing (small buffers toward it: the
    engine holds a chunk, the rest and the FIN in the forwarder's socket). The socket, both halves
    shut, reports a bare EPOLLHUP whatever its interest, level-triggered: the engine must take
    it once and not spin on it; once the peer reads, every byte and then the EOF arrive."""
    data = os.urandom(96 * 1024)
    shrink_send_buffers(monkeypatch, 8192)
    accepted, release, done = trio.Event(), trio.Event(), trio.Event()
    heard = Meter()

    async def target(stream: trio.SocketStream) -> None:
        accepted.set()
        async with stream:
            if waiting == "client":  # the target is done first, then reads late
                await stream.send_eof()
                await release.wait()
                await receive_into(stream, heard)
            else:  # the client is done first; the target answers, then EOF
                assert await receive_all(stream) == b""
                await stream.send_all(data)
                await stream.send_eof()
        done.set()

    log = AccessLogCapture()
    serving = small_window_backend(target, 8192) if waiting == "client" else backend(target)
    async with serving as address, forwarder(config(route(targets=[address])), access_log=log) as fwd:
        with trio.fail_after(20):
            if waiting == "client":
                client = await connect(fwd)
                assert await receive_all(client) == b""  # the target's EOF, passed on
                await client.send_all(data)
                await client.send_eof()
            else:
                client = await connect_small_window(fwd, 8192)
                await client.send_eof()
                await done.wait()  # all of it and the FIN are on their way
            [conn] = fwd.connections.values()
            engine = engine_of(fwd)
            await settled(lambda: (conn.bytes_in, conn.bytes_out, engine.batches))  # still: no spinning
            relay = relay_of(fwd, conn)
            holding = held(relay.client if waiting == "client" else relay.target)
            stalled = list(error_events)
            release.set()
            if waiting == "target":
                await receive_into(client, heard)
            await done.wait()
            [record] = await ended(fwd, log)
            await client.aclose()
    assert holding > 0
    assert (waiting, select.EPOLLHUP, False) in stalled, stalled
    assert (heard.count, heard.digest) == (len(data), hashlib.sha256(data).hexdigest())
    moved = (len(data), 0) if waiting == "client" else (0, len(data))
    assert (record["reason"], record["bytes_in"], record["bytes_out"]) == ("normal", *moved)


# -- 3. partial sends ---------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_partial_sends_deliver_every_byte_in_order(path: str, direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiving peer offers a small window (SO_RCVBUF 8 KiB) and reads 4 KiB at a time,
    and the forwarder's own sockets have a small SO_SNDBUF (8 KiB, set as the engine takes
    them): the engine's sends are partial, the rest parked (or left in the pipe) and
    flushed later, every byte in order."""
    payload = os.urandom(4 * MIB)
    rcvbuf = 8192
    flushes: collections.Counter[str] = collections.Counter()
    flush = Engine._flush

    def counting_flush(self: Engine, src: Side, dst: Side, now: float) -> None:
        flushes["pipe" if src.pipe is not None else "parked"] += 1
        flush(self, src, dst, now)

    monkeypatch.setattr(Engine, "_flush", counting_flush)
    shrink_send_buffers(monkeypatch, 8192)
    got = bytearray()

    async def read_slowly(stream: trio.abc.ReceiveStream) -> None:
        while data := await stream.receive_some(4096):
            got.extend(data)

    async def target(stream: trio.SocketStream) -> None:
        async with stream:
            if direction == "upload":
                await read_slowly(stream)
            else:
                await stream.send_all(payload)
                await stream.send_eof()
                assert await receive_all(stream) == b""

    log = AccessLogCapture()
    serving = small_window_backend(target, rcvbuf) if direction == "upload" else backend(target)
    async with serving as address, forwarder(config(route(targets=[address])), access_log=log) as fwd:
        with trio.fail_after(30):
            if direction == "upload":
                client = await connect(fwd)
                await client.send_all(payload)
                await client.send_eof()
                assert await receive_all(client) == b""
            else:
                client = await connect_small_window(fwd, rcvbuf)
                await read_slowly(client)
                await client.send_eof()
            await client.aclose()
            [record] = await ended(fwd, log)
    assert bytes(got) == payload
    moved = (len(payload), 0) if direction == "upload" else (0, len(payload))
    assert (record["bytes_in"], record["bytes_out"], record["reason"]) == (*moved, "normal")
    # Partial sends happened: what did not go at once was held and delivered later.
    assert flushes["parked" if path == "copy" else "pipe"] > 10, flushes


# -- 4. quiet limits while a download trickles ---------------------------------------------


@pytest.mark.parametrize(
    "send_buffer",
    [
        pytest.param(0, id="kernel-send-buffer"),  # autotuned: megabytes queued, going out as the client reads
        pytest.param(8192, id="8KiB-send-buffer"),
    ],
)
async def test_a_download_read_slowly_outlives_its_inactivity_timeout_and_counts_exactly(path: str, send_buffer: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client reads 20,000 bytes every 100 ms for 3 s through a route whose
    inactivity_timeout is 1 s: bytes flow all the while, so the download is never cut.
    Live, bytes_out is at least what the client has read (bytes are counted when the
    engine hands them to the kernel, before the client can read them); at the end it is
    exactly what the client received.

    With the forwarder's SO_SNDBUF at 8 KiB the engine itself writes as the client reads;
    with the kernel's (autotuned) send buffer it writes megabytes at once and then only
    the kernel moves bytes, for seconds: that must not count as inactivity either."""
    if send_buffer:
        shrink_send_buffers(monkeypatch, send_buffer)
    # More than the slow phase reads (600 kB) plus every kernel buffer on the way.
    total = 2 * MIB if send_buffer else 16 * MIB
    sent = Meter()
    accepted = trio.Event()

    async def target(stream: trio.SocketStream) -> None:
        accepted.set()
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # cut: the test says how
                await send_blocks(stream, total, sent)
                await stream.send_eof()
                assert await receive_all(stream) == b""

    log = AccessLogCapture()
    received = Meter()
    live: list[tuple[int, int]] = []
    async with backend(target) as address, forwarder(config(route(targets=[address], inactivity_timeout="1s")), access_log=log) as fwd:
        client = await connect(fwd)
        with trio.fail_after(30):
            await accepted.wait()
            [conn] = fwd.connections.values()
            start = trio.current_time()
            for tick in range(1, 31):
                data = await receive_exactly(client, 20_000)
                assert len(data) == 20_000, f"cut after {received.count + len(data)} bytes, {trio.current_time() - start:.2f}s: {conn.reason}"
                received.add(data)
                assert fwd.connections.get(conn.id) is conn and conn.reason is None
                # In the kernel between the engine and the client: the forwarder's unacked
                # or unsent bytes (read first: a segment that lands meanwhile is counted
                # twice, never missed) and the client's unread ones.
                unsent = queued(relay_of(fwd, conn).client.sock, termios.TIOCOUTQ)
                unread = queued(client.socket, termios.FIONREAD)
                live.append((received.count, unread, conn.bytes_out, unsent))
                await trio.sleep_until(start + tick * 0.1)
            slow = trio.current_time() - start
            await receive_into(client, received)
            await client.send_eof()
            [record] = await ended(fwd, log)
            await client.aclose()
    assert slow >= 3.0
    # bytes_out counts what the engine handed to the kernel: all the client has read or has
    # waiting, and nothing beyond what the kernel still holds for it.
    assert all(read + unread <= counted <= read + unread + unsent for read, unread, counted, unsent in live), live
    assert (record["reason"], record["bytes_in"], record["bytes_out"]) == ("normal", 0, total)
    assert (received.count, received.digest) == (total, sent.digest)


# -- 5. resets and closes: EPOLLERR, EPOLLHUP ----------------------------------------------


async def send_until_broken(stream: trio.abc.SendStream, chunk: bytes = NOISE[: 64 * 1024]) -> int:
    """Send until the connection breaks; the bytes sent."""
    sent = 0
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while True:
            await stream.send_all(chunk)
            sent += len(chunk)
    return sent


async def drain(stream: trio.abc.ReceiveStream) -> int:
    """Read until EOF or a reset; the bytes read."""
    n = 0
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await stream.receive_some(MIB):
            n += len(data)
    return n


@pytest.fixture
def error_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, bool]]:
    """Every EPOLLERR or EPOLLHUP the engine handles: (the side's name, the mask, whether the
    other direction held bytes for that side). Patched before serve() starts (its run loop
    binds _event once)."""
    seen: list[tuple[str, int, bool]] = []
    event = Engine._event

    def recording(self: Engine, side: Side, mask: int, now: float, read: int = -1, sent: int = -1) -> None:
        if mask & (select.EPOLLERR | select.EPOLLHUP):
            seen.append(("client" if side.inbound else "target", mask, side.peer.holding))
        event(self, side, mask, now, read, sent)

    monkeypatch.setattr(Engine, "_event", recording)
    return seen


@contextlib.asynccontextmanager
async def through(handler: Handler) -> AsyncIterator[tuple[triofwd.Forwarder, AccessLogCapture, trio.SocketStream]]:
    """A forwarder to a `handler` target, and one client connected through it."""
    log = AccessLogCapture()
    async with backend(handler) as address, forwarder(config(route(targets=[address])), access_log=log) as fwd:
        client = await connect(fwd)
        try:
            yield fwd, log, client
        finally:
            await client.aclose()


async def test_target_resets_while_the_client_sends(path: str) -> None:
    async def reset_after_100k(stream: trio.SocketStream) -> None:
        await receive_exactly(stream, 100_000)
        rst_close(stream)

    async with through(reset_after_100k) as (fwd, log, client):
        with trio.fail_after(10):
            assert await send_until_broken(client) >= 100_000
            [record] = await ended(fwd, log)
    assert record["reason"] == "target_reset"
    assert record["bytes_in"] >= 100_000


async def test_target_resets_while_the_client_receives(path: str) -> None:
    async def reset_after_1m(stream: trio.SocketStream) -> None:
        await stream.send_all(NOISE)
        rst_close(stream)

    async with through(reset_after_1m) as (fwd, log, client):
        with trio.fail_after(10):
            received = await drain(client)
            [record] = await ended(fwd, log)
    assert record["reason"] == "target_reset"
    assert received <= record["bytes_out"] <= MIB  # the reset may overtake the last bytes


async def test_target_resets_while_the_engine_holds_bytes_for_it(path: str, error_events: list[tuple[str, int, bool]]) -> None:
    """The target reads nothing, the engine parks (or pipes) what the target's buffers do not
    take and waits for EPOLLOUT; the target's reset comes as EPOLLERR on that socket."""
    accepted, reset = trio.Event(), trio.Event()

    async def stall_then_reset(stream: trio.SocketStream) -> None:
        accepted.set()
        await reset.wait()
        rst_close(stream)

    async with through(stall_then_reset) as (fwd, log, client):
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_until_broken, client)
                await accepted.wait()
                [conn] = fwd.connections.values()
                await settled(lambda: conn.bytes_in)
                holding = held(relay_of(fwd, conn).client)
                reset.set()
                [record] = await ended(fwd, log)
    assert holding > 0
    assert record["reason"] == "target_reset"
    [(side, mask, waiting)] = error_events
    assert (side, bool(mask & select.EPOLLERR), waiting) == ("target", True, True)


async def test_client_resets_while_sending(path: str) -> None:
    heard = trio.Event()

    async def read_all(stream: trio.SocketStream) -> None:
        await receive_exactly(stream, 100_000)
        heard.set()
        await drain(stream)

    async with through(read_all) as (fwd, log, client):
        with trio.fail_after(10):
            await client.send_all(NOISE)
            await heard.wait()  # the relay is moving bytes when the reset comes
            rst_close(client)
            [record] = await ended(fwd, log)
    assert record["reason"] == "client_reset"
    assert 100_000 <= record["bytes_in"] <= MIB


async def test_client_resets_while_receiving(path: str) -> None:
    async def send_forever(stream: trio.SocketStream) -> None:
        await send_until_broken(stream)

    async with through(send_forever) as (fwd, log, client):
        with trio.fail_after(10):
            assert await receive_exactly(client, MIB) == NOISE[: 64 * 1024] * 16
            rst_close(client)
            [record] = await ended(fwd, log)
    assert record["reason"] == "client_reset"
    assert record["bytes_out"] >= MIB


async def test_client_resets_while_the_engine_holds_bytes_for_it(path: str, error_events: list[tuple[str, int, bool]]) -> None:
    """The mirror: the client reads nothing, the engine holds the target's bytes for it."""
    accepted = trio.Event()

    async def send_forever(stream: trio.SocketStream) -> None:
        accepted.set()
        await send_until_broken(stream)

    async with through(send_forever) as (fwd, log, client):
        with trio.fail_after(20):
            await accepted.wait()
            [conn] = fwd.connections.values()
            await settled(lambda: conn.bytes_out)
            holding = held(relay_of(fwd, conn).target)
            rst_close(client)
            [record] = await ended(fwd, log)
    assert holding > 0
    assert record["reason"] == "client_reset"
    [(side, mask, waiting)] = error_events
    assert (side, bool(mask & select.EPOLLERR), waiting) == ("client", True, True)


async def test_target_closes_both_ways_after_its_reply(path: str, error_events: list[tuple[str, int, bool]]) -> None:
    """close(), not shutdown: the client gets the whole reply and EOF; its own close then ends
    the connection normally (no byte was sent toward the closed socket). The client's FIN
    reaches a socket whose write side the engine had shut already: EPOLLHUP with the EOF."""

    async def reply_and_close(stream: trio.SocketStream) -> None:
        request = await receive_exactly(stream, 5)
        await stream.send_all(request.upper() * 100_000)
        await stream.aclose()

    async with through(reply_and_close) as (fwd, log, client):
        with trio.fail_after(10):
            await client.send_all(b"hello")
            assert await receive_all(client) == b"HELLO" * 100_000
            await client.aclose()
            [record] = await ended(fwd, log)
    assert (record["reason"], record["bytes_in"], record["bytes_out"]) == ("normal", 5, 500_000)
    assert error_events == [("client", select.EPOLLIN | select.EPOLLHUP, False)]


async def test_target_closes_both_ways_while_the_client_sends(path: str) -> None:
    """The target answers and closes; the client, told by EOF, sends on: the closed socket's
    kernel answers with a reset, and that is the target's (target_reset)."""

    async def reply_and_close(stream: trio.SocketStream) -> None:
        await receive_exactly(stream, 5)
        await stream.send_all(b"bye")
        await stream.aclose()  # nothing unread: a FIN, not a reset

    async with through(reply_and_close) as (fwd, log, client):
        with trio.fail_after(10):
            await client.send_all(b"hello")
            assert await receive_all(client) == b"bye"
            await send_until_broken(client)
            [record] = await ended(fwd, log)
    assert (record["reason"], record["bytes_out"]) == ("target_reset", 3)
    assert record["bytes_in"] >= 5


# -- 6. a kill while bytes are parked --------------------------------------------------------


def stream_digest(n: int) -> str:
    """The digest of the first n bytes of the block stream (send_blocks)."""
    sha = hashlib.sha256()
    i = 0
    while n > 0:
        data = block(i)[:n]
        sha.update(data)
        n -= len(data)
        i += 1
    return sha.hexdigest()


@pytest.mark.parametrize("how", ["Connection.kill", "control"])
async def test_a_kill_while_the_engine_holds_bytes_leaves_nothing_behind(path: str, how: str, tmp_path: pathlib.Path) -> None:
    """The target reads nothing, so the engine holds a chunk for it (parked bytes, or a pipe
    on the splice path); the connection is killed: reason killed, both sockets out of the
    engine, the chunk dropped (a pipe closed, never pooled), the process's fds and pipes back
    to what they were. The target gets exactly bytes_in bytes, a prefix of the stream."""
    accepted, release, target_done = trio.Event(), trio.Event(), trio.Event()
    got = Meter()

    async def stall(stream: trio.SocketStream) -> None:
        accepted.set()
        async with stream:
            await release.wait()
            await receive_into(stream, got)
        target_done.set()

    log = AccessLogCapture()
    sent = Meter()
    async with (
        backend(stall) as address,
        forwarder(config(route(targets=[address])), access_log=log) as fwd,
        trio.open_nursery() as nursery,
        contextlib.AsyncExitStack() as stack,
    ):
        control = None
        if how == "control":
            await nursery.start(triofwd.serve_control, fwd, tmp_path / "c.sock")
            control = await stack.enter_async_context(triofwd.open_control(tmp_path / "c.sock"))
        fds, pipes = await settled(fds_outside_the_pool), pipes_outside_the_pool()
        with trio.fail_after(20):
            client = await connect(fwd)
            async with trio.open_nursery() as sending:
                sending.start_soon(send_blocks_until_broken, client, sent)
                await accepted.wait()
                [conn] = fwd.connections.values()
                await settled(lambda: (conn.bytes_in, sent.count))
                relay = relay_of(fwd, conn)
                holding, pipe = held(relay.client), relay.client.pipe is not None
                if control is None:
                    conn.kill()
                else:
                    row = await control.request("kill", id=conn.id)
                    assert (row["id"], row["reason"]) == (conn.id, "killed")
                [record] = await ended(fwd, log)
                assert not engine_of(fwd)._relays and not engine_of(fwd)._done
                assert pipes_outside_the_pool() == pipes
            release.set()
            await target_done.wait()
            await client.aclose()
            assert await settled(fds_outside_the_pool) == fds
        await stack.aclose()  # the control client closes before its server is cancelled
        nursery.cancel_scope.cancel()
    assert 0 < holding <= (CHUNK if path == "splice" else COPY_CHUNK)
    assert pipe == (path == "splice")
    assert record["reason"] == "killed"
    assert (got.count, got.digest) == (record["bytes_in"], stream_digest(record["bytes_in"]))
    assert got.count <= sent.count + MIB  # sent: the blocks whose send_all returned


async def send_blocks_until_broken(stream: trio.abc.SendStream, meter: Meter) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await send_blocks(stream, 1024 * MIB, meter)


@pytest.mark.parametrize("end", ["killed", "connect_timeout"])
async def test_a_connect_that_never_completes_leaves_nothing_behind(end: str) -> None:
    """The target's SYNs are dropped: the connect waits (in the engine, for IP targets) until
    the connection is killed or its connect_timeout passes; either way nothing is left: no
    socket registered, no fd open."""
    log = AccessLogCapture()
    with black_hole() as hole:
        cfg = config(route(targets=[hole], connect_retries=0, connect_timeout="300ms" if end == "connect_timeout" else "10s"))
        async with forwarder(cfg, access_log=log) as fwd:
            fds = await settled(fds_outside_the_pool)
            with trio.fail_after(5):
                client = await connect(fwd)
                [conn] = await settled(lambda: list(fwd.connections.values()))
                assert conn.state == "connecting"
                if end == "killed":
                    conn.kill()
                assert await receive_all(client) == b""
                [record] = await ended(fwd, log)
                await client.aclose()
                assert await settled(fds_outside_the_pool) == fds
    assert (record["reason"], record["bytes_in"], record["bytes_out"]) == (end, 0, 0)
    if end == "connect_timeout":  # the engine's timers kept it (a kill: within fail_after, long before 10 s)
        assert 290 <= record["duration_ms"] < 2000


# -- 7. churn ------------------------------------------------------------------------------

CHURN = 10_000
CHURN_AT_ONCE = 50
# The churn's peers, in a process of their own (asyncio: the standard library), so that the
# forwarder has this process (and its fds) to itself and the peers the other core.
#   echo             an echo server on 127.0.0.1: prints its port, serves until stdin closes
#   churn PORT N K   N connections to PORT, K at a time: connect, send, the echo back, close
CHURN_PEERS = ECHO_SERVER + r"""
async def churn(port, total, at_once):
    async def worker(first):
        for i in range(first, total, at_once):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            message = b"%08d" % i * 8
            writer.write(message)
            if await reader.readexactly(len(message)) != message:
                raise AssertionError(f"connection {i}: not its echo")
            writer.close()
            await writer.wait_closed()
    await asyncio.gather(*(worker(first) for first in range(at_once)))
    print(total, flush=True)

if sys.argv[1] == "echo":
    asyncio.run(serve())
else:
    asyncio.run(churn(*map(int, sys.argv[2:])))
"""


async def test_churn_of_10000_connections_leaves_nothing_behind() -> None:
    """10,000 connections, 50 at a time, each: connect, send, the echo back, close (the
    clients and the echo server in another process). After: every one ended normal with
    its bytes, the table empty, nothing registered in the engine (Engine.registered and the
    stats), the timers left by gone connections bounded, the process's fds as before."""
    log = AccessLogCapture()
    peers = [sys.executable, "-c", CHURN_PEERS]
    echo_server = await trio.lowlevel.open_process([*peers, "echo"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert echo_server.stdout is not None and echo_server.stdin is not None
        with trio.fail_after(120):
            port = int((await echo_server.stdout.receive_some(64)).strip())
            async with forwarder(config(route(targets=["127.0.0.1:%d" % port])), access_log=log) as fwd:
                _, fwd_port = split(fwd.addresses["r"][0])
                # The first: whatever is made once (the engine's buffers...) is made now.
                await trio.run_process([*peers, "churn", str(fwd_port), "1", "1"], capture_stdout=True)
                await log.wait(1)
                fds = await settled(open_fds)
                engine = engine_of(fwd)
                start = trio.current_time()
                done = await trio.run_process([*peers, "churn", str(fwd_port), str(CHURN), str(CHURN_AT_ONCE)], capture_stdout=True)
                records = await ended(fwd, log, 1 + CHURN, timeout=30)
                elapsed = trio.current_time() - start
                stats = fwd.stats()
                assert await settled(open_fds) == fds
                timers = len(engine._timers)
    finally:
        echo_server.kill()  # by its pid
        with trio.move_on_after(5, shield=True):
            await echo_server.wait()
        for pipe in (echo_server.stdin, echo_server.stdout):
            if pipe is not None:
                await pipe.aclose()
    assert done.stdout.strip() == b"%d" % CHURN
    reasons = collections.Counter(r["reason"] for r in records)
    assert reasons == {"normal": 1 + CHURN}, reasons
    assert sum(r["bytes_in"] for r in records) == sum(r["bytes_out"] for r in records) == (1 + CHURN) * 64
    assert (stats["active"], stats["engine"]["sockets"], stats["total"]) == (0, 0, 1 + CHURN)
    assert timers <= triofwd._engine.STALE_TIMERS + CHURN_AT_ONCE + 1, timers
    print(f"churn: {CHURN} connections in {elapsed:.1f}s ({CHURN / elapsed:.0f}/s)")


# -- 8. one relay's bug is that relay's alone -----------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        "_copy",
        "_event",
        "timers",
        "re-arm",
    ],
)
async def test_one_relays_error_ends_that_connection_alone(where: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the engine's code for one relay (a RuntimeError raised where it moves that
    relay's bytes, or where its timers look at it) ends that connection with internal_error,
    logged with its traceback; five others, moving bytes before and after, end normal with
    every byte, and a new connection is served after."""
    doomed: set[str] = set()  # the client addresses ("ip:port") whose relay raises

    def bug(conn: Connection) -> None:
        if conn.client in doomed:
            raise RuntimeError(f"injected engine bug for connection {conn.id}")

    if where == "_copy":  # a big chunk (not the run loop's fast path) goes through _copy
        copy = Engine._copy

        def failing_copy(self: Engine, src: Side, dst: Side, now: float, read: int = -1, sent: int = -1) -> None:
            bug(src.relay.conn)
            copy(self, src, dst, now, read, sent)

        monkeypatch.setattr(Engine, "_copy", failing_copy)
    elif where == "_event":  # the run loop binds _event once: patched before serve() starts
        event = Engine._event

        def failing_event(self: Engine, side: Side, mask: int, now: float, read: int = -1, sent: int = -1) -> None:
            bug(side.relay.conn)
            event(self, side, mask, now, read, sent)

        monkeypatch.setattr(Engine, "_event", failing_event)
    elif where == "timers":  # the engine's timers ask a relay's quiet limits whether they passed
        passed = IdleWatch.passed

        def failing_passed(self: IdleWatch, now: float, sockets: Any = ()) -> Any:
            bug(self.conn)
            return passed(self, now, sockets)

        monkeypatch.setattr(IdleWatch, "passed", failing_passed)
    else:  # ...and, when there was traffic since, when to look again (asked first as the relay starts, before it is doomed)
        deadline = IdleWatch.deadline

        def failing_deadline(self: IdleWatch) -> float:
            bug(self.conn)
            return deadline(self)

        monkeypatch.setattr(IdleWatch, "deadline", failing_deadline)

    big = NOISE[: 4 * SPLICE_AT]
    rounds = 10
    log = AccessLogCapture()

    async def busy(client: trio.SocketStream) -> None:
        """Bytes every 100 ms for a second: across the victim's end and its timer."""
        for _ in range(rounds):
            await client.send_all(big)
            assert await receive_exactly(client, len(big)) == big
            await trio.sleep(0.1)
        await client.send_eof()
        assert await receive_all(client) == b""
        await client.aclose()

    async with backend(echo) as address:
        cfg = config(route(targets=[address]), inactivity_timeout="300ms")
        with caplog.at_level(logging.ERROR, logger="triofwd"):
            async with forwarder(cfg, access_log=log) as fwd:
                with trio.fail_after(20):
                    others = [await connect(fwd) for _ in range(5)]
                    victim = await connect(fwd)
                    for client in [*others, victim]:
                        await client.send_all(b"hello")
                        assert await receive_exactly(client, 5) == b"hello"
                    doomed.add("%s:%d" % victim.socket.getsockname()[:2])
                    async with trio.open_nursery() as nursery:
                        for client in others:
                            nursery.start_soon(busy, client)
                        if where in ("_copy", "_event"):  # a big chunk: off the fast path (its timer: 300 ms after its start)
                            await victim.send_all(big)
                        assert await receive_all(victim) == b""  # the victim is closed, the others go on
                        assert not any(r["client"] not in doomed for r in log.records)
                    late = await connect(fwd)
                    await late.send_all(big)
                    assert await receive_exactly(late, len(big)) == big
                    await late.send_eof()
                    assert await receive_all(late) == b""
                    await late.aclose()
                    await victim.aclose()
                    records = await ended(fwd, log, 7)
    [failed] = [r for r in records if r["client"] in doomed]
    assert failed["reason"] == "internal_error"
    others_ended = [r for r in records if r["client"] not in doomed]
    assert [(r["reason"], r["bytes_in"], r["bytes_out"]) for r in others_ended] == [("normal", 5 + rounds * len(big), 5 + rounds * len(big))] * 5 + [
        ("normal", len(big), len(big))
    ]
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.exc_info is not None and "injected engine bug" in str(error.exc_info[1])


def test_an_idle_relay_parks_its_task_without_frames_of_its_own() -> None:
    """The relay yields trio's park request itself (see `_PARK` in the engine): about 500
    bytes less per idle connection than through trio's wait_task_rescheduled. A trio
    release that moves that private name still works (the public function is used) but
    costs that memory: this test says so."""
    assert triofwd._engine._PARK is not None, "trio no longer has _core._traps.WaitTaskRescheduled: idle relays fall back to wait_task_rescheduled"
    assert triofwd._engine._PARK.__name__ == "WaitTaskRescheduled"
