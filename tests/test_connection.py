"""A connection's life through the real serve(), on real sockets: bytes, half-close, timeouts, dial, actions."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket

import pytest
import trio

import triofwd
from tests.conftest import (
    AccessLogCapture,
    backend,
    black_hole,
    config,
    connect,
    echo,
    forwarder,
    receive_all,
    receive_exactly,
    refused_address,
    route,
    rst_close,
)


async def test_ten_megabytes_both_ways_arrive_intact() -> None:
    payload = os.urandom(12 * 1024 * 1024)
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(route(targets=[target])), access_log=log) as fwd:
        client = await connect(fwd)
        received = bytearray()

        async def send() -> None:
            for i in range(0, len(payload), 256 * 1024):
                await client.send_all(payload[i : i + 256 * 1024])
            await client.send_eof()

        async def receive() -> None:
            received.extend(await receive_all(client))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
        await client.aclose()
        [record] = await log.wait(1)
    assert bytes(received) == payload
    assert (record["bytes_in"], record["bytes_out"], record["reason"]) == (len(payload), len(payload), "normal")


async def test_client_half_close_is_passed_on_and_the_answer_still_arrives() -> None:
    async def count_then_answer(stream: trio.SocketStream) -> None:
        async with stream:
            data = await receive_all(stream)  # until the client's EOF reaches us
            await stream.send_all(b"got %d bytes" % len(data))

    log = AccessLogCapture()
    async with backend(count_then_answer) as target, forwarder(config(route(targets=[target])), access_log=log) as fwd:
        with trio.fail_after(5):
            client = await connect(fwd)
            await client.send_all(b"x" * 100_000)
            await client.send_eof()
            assert await receive_all(client) == b"got 100000 bytes"
            await client.aclose()
            [record] = await log.wait(1)
    assert record["reason"] == "normal"
    assert not fwd.connections


async def test_target_half_close_is_passed_on_and_the_client_may_keep_sending() -> None:
    got = trio.Event()
    seen = bytearray()

    async def greet_then_listen(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello")
            await stream.send_eof()  # target is done talking, still listening
            seen.extend(await receive_all(stream))
            got.set()

    log = AccessLogCapture()
    async with backend(greet_then_listen) as target, forwarder(config(route(targets=[target])), access_log=log) as fwd:
        with trio.fail_after(5):
            client = await connect(fwd)
            assert await receive_all(client) == b"hello"  # EOF arrived after the greeting
            await client.send_all(b"still here")
            await client.send_eof()
            await got.wait()
            await client.aclose()
            [record] = await log.wait(1)
    assert bytes(seen) == b"still here"
    assert (record["reason"], record["bytes_in"], record["bytes_out"]) == ("normal", 10, 5)


async def test_inactivity_timeout_closes_an_idle_connection_and_activity_defers_it() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target:
        cfg = config(route(targets=[target]), inactivity_timeout="300ms")
        async with forwarder(cfg, access_log=log) as fwd:
            client = await connect(fwd)
            start = trio.current_time()
            for _ in range(6):  # a byte every 100 ms for 600 ms keeps it open past 300 ms
                await trio.sleep(0.1)
                await client.send_all(b"x")
                assert await receive_exactly(client, 1) == b"x"
            last_byte = trio.current_time()
            with trio.fail_after(2):
                assert await receive_all(client) == b""
            closed = trio.current_time()
            [record] = await log.wait(1)
    assert record["reason"] == "inactivity_timeout"
    assert last_byte - start >= 0.6
    assert 0.3 - 0.02 <= closed - last_byte < 1.0


async def test_max_lifetime_ends_even_a_busy_connection() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(route(targets=[target]), max_lifetime="400ms"), access_log=log) as fwd:
        client = await connect(fwd)
        with trio.fail_after(3):
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await client.send_all(b"ping")
                    if await receive_exactly(client, 4) != b"ping":
                        break
                    await trio.sleep(0.02)
            [record] = await log.wait(1)
    assert record["reason"] == "lifetime_exceeded"
    assert 350 <= record["duration_ms"] < 2000


async def test_half_close_timeout_limits_the_other_direction() -> None:
    async def never_closes(stream: trio.SocketStream) -> None:
        async with stream:
            await receive_all(stream)
            await trio.sleep_forever()

    log = AccessLogCapture()
    async with backend(never_closes) as target, forwarder(config(route(targets=[target]), half_close_timeout="300ms"), access_log=log) as fwd:
        client = await connect(fwd)
        await client.send_eof()
        with trio.fail_after(3):
            assert await receive_all(client) == b""
            [record] = await log.wait(1)
    assert record["reason"] == "half_close_timeout"


async def test_connect_refused_retries_onto_the_next_target() -> None:
    log = AccessLogCapture()
    with refused_address() as refused:
        async with backend(echo) as good:
            cfg = config(route(targets=[refused, good], balance="first", connect_retries=1))
            async with forwarder(cfg, access_log=log) as fwd:
                client = await connect(fwd)
                await client.send_all(b"hi")
                assert await receive_exactly(client, 2) == b"hi"
                await client.aclose()
                [record] = await log.wait(1)
    assert (record["target"], record["reason"]) == (good, "normal")


async def test_every_target_refused_ends_with_connect_refused() -> None:
    log = AccessLogCapture()
    with refused_address() as a, refused_address() as b:
        async with forwarder(config(route(targets=[a, b], connect_retries=3)), access_log=log) as fwd:
            client = await connect(fwd)
            with trio.fail_after(3):
                assert await receive_all(client) == b""
                [record] = await log.wait(1)
    assert record["reason"] == "connect_refused"
    assert record["target"] in (a, b)


async def test_connect_timeout_then_the_next_target() -> None:
    log = AccessLogCapture()
    with black_hole() as hole:
        async with backend(echo) as good:
            cfg = config(route(targets=[hole, good], balance="first", connect_retries=1, connect_timeout="300ms"))
            async with forwarder(cfg, access_log=log) as fwd:
                with trio.fail_after(3):
                    client = await connect(fwd)
                    await client.send_all(b"hi")
                    assert await receive_exactly(client, 2) == b"hi"
                    await client.aclose()
                    [record] = await log.wait(1)
                assert record["target"] == good
                # Only the black hole: connect_timeout, after connect_timeout.
                await fwd.reload(config(route(targets=[hole], connect_retries=0, connect_timeout="300ms")))
                client = await connect(fwd)
                with trio.fail_after(3):
                    assert await receive_all(client) == b""
                    [_, record] = await log.wait(2)
    assert record["reason"] == "connect_timeout"
    assert 290 <= record["duration_ms"] < 2000


async def test_unresolvable_target_is_dns_error() -> None:
    log = AccessLogCapture()
    async with forwarder(config(route(targets=["no-such-host.invalid:80"], connect_retries=0)), access_log=log) as fwd:
        client = await connect(fwd)
        with trio.fail_after(10):
            assert await receive_all(client) == b""
            [record] = await log.wait(1, timeout=10)
    assert record["reason"] == "dns_error"


async def test_ipv6_target() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    async with trio.open_nursery() as nursery:
        try:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="::1"))
        except OSError as exc:
            pytest.skip(f"cannot listen on ::1: {exc}")
        port = listeners[0].socket.getsockname()[1]
        async with forwarder(config(route(targets=[f"[::1]:{port}"]))) as fwd:
            client = await connect(fwd)
            await client.send_all(b"six")
            assert await receive_exactly(client, 3) == b"six"
            [conn] = fwd.connections.values()
            assert conn.target == f"[::1]:{port}"
        nursery.cancel_scope.cancel()


async def test_a_hostname_target_is_dialled_by_name() -> None:
    """Addresses get one direct connect; a name still goes through resolution (happy eyeballs)."""
    async with backend(echo) as target, forwarder(config(route(targets=[target.replace("127.0.0.1", "localhost")]))) as fwd:
        client = await connect(fwd)
        await client.send_all(b"name")
        assert await receive_exactly(client, 4) == b"name"
        [conn] = fwd.connections.values()
        assert conn.target in (target, target.replace("127.0.0.1", "[::1]"))


async def test_a_burst_in_the_backlog_is_accepted_and_served() -> None:
    """More connections than one accept wakeup takes (ACCEPT_BATCH) wait in the backlog: all are served."""
    async with backend(echo) as target, forwarder(config(route(targets=[target]))) as fwd:
        host, port = fwd.addresses["r"][0].rsplit(":", 1)
        clients = []
        for _ in range(80):  # connected by the kernel before the forwarder's accept loop runs again
            sock = socket.socket()
            sock.setblocking(False)
            assert sock.connect_ex((host, int(port))) in (0, errno.EINPROGRESS)
            clients.append(trio.socket.from_stdlib_socket(sock))
        with trio.fail_after(10):
            for i, sock in enumerate(clients):
                await trio.lowlevel.wait_writable(sock)
                await sock.send(b"%03d" % i)
            for i, sock in enumerate(clients):
                got = b""
                while len(got) < 3:
                    got += await sock.recv(3 - len(got))
                assert got == b"%03d" % i
        for sock in clients:
            sock.close()


async def test_reject_closes_at_once() -> None:
    log = AccessLogCapture()
    async with forwarder(config(route(action="reject")), access_log=log) as fwd:
        client = await connect(fwd)
        with trio.fail_after(2):
            assert await receive_all(client) == b""
            [record] = await log.wait(1)
    assert (record["route"], record["reason"], record["target"]) == ("r", "rejected", None)


async def test_block_ips_ends_with_ip_blocked() -> None:
    log = AccessLogCapture()
    async with forwarder(config(route(targets=["127.0.0.1:9"], block_ips=["127.0.0.0/8"])), access_log=log) as fwd:
        client = await connect(fwd)
        with trio.fail_after(2):
            assert await receive_all(client) == b""
            [record] = await log.wait(1)
    assert record["reason"] == "ip_blocked"


async def test_kill_closes_the_client_at_once_with_reason_killed() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(route(targets=[target])), access_log=log) as fwd:
        client = await connect(fwd)
        await client.send_all(b"x")
        await receive_exactly(client, 1)
        await trio.testing.wait_all_tasks_blocked()  # the forwarder counts after its send returns
        [conn] = fwd.connections.values()
        assert (conn.state, conn.bytes_in, conn.bytes_out) == ("established", 1, 1)
        conn.kill()
        with trio.fail_after(2):
            assert await receive_all(client) == b""
            [record] = await log.wait(1)
    assert record["reason"] == "killed"


async def test_a_handler_owns_the_connection() -> None:
    seen: list[triofwd.HandlerInfo] = []

    async def shout(stream: trio.abc.HalfCloseableStream, info: triofwd.HandlerInfo) -> None:
        seen.append(info)
        async for data in stream:
            await stream.send_all(data.upper())

    log = AccessLogCapture()
    async with forwarder(config(route(action="handler", handler=shout)), access_log=log) as fwd:
        client = await connect(fwd)
        await client.send_all(b"hello")
        assert await receive_exactly(client, 5) == b"HELLO"
        await client.send_eof()
        with trio.fail_after(2):
            assert await receive_all(client) == b""
            [record] = await log.wait(1)
    assert (record["reason"], record["bytes_in"], record["bytes_out"]) == ("normal", 5, 5)
    assert seen[0].route == "r" and seen[0].client[0] == "127.0.0.1"


async def test_a_handler_that_raises_is_internal_error_and_the_listener_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(stream: trio.abc.Stream, info: triofwd.HandlerInfo) -> None:
        if info.id == 1:
            raise ZeroDivisionError("handler bug")
        await stream.send_all(b"fine")

    log = AccessLogCapture()
    with caplog.at_level(logging.ERROR, logger="triofwd"):
        async with forwarder(config(route(action="handler", handler=broken)), access_log=log) as fwd:
            for _ in range(2):
                client = await connect(fwd)
                with trio.fail_after(2):
                    last = await receive_all(client)
            records = await log.wait(2)
    assert [r["reason"] for r in records] == ["internal_error", "normal"]
    assert last == b"fine"
    assert "ZeroDivisionError: handler bug" in caplog.text


async def test_tcp_keepalive_is_set_on_both_sockets() -> None:
    """/proc/net/tcp shows the keep-alive timer (tr = 2) on an idle socket that has SO_KEEPALIVE."""
    async with backend(echo) as target, forwarder(config(route(targets=[target]), tcp_keepalive="30s")) as fwd:
        client = await connect(fwd)
        await client.send_all(b"x")
        await receive_exactly(client, 1)
        [conn] = fwd.connections.values()
        listen_port = int(fwd.addresses["r"][0].rsplit(":", 1)[1])
        target_port = int(target.rsplit(":", 1)[1])
        client_port = client.socket.getsockname()[1]
        timers = {}
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, timer = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16), fields[5].split(":")[0]
                if fields[3] == "01":  # ESTABLISHED: not an earlier test's socket in TIME_WAIT on a reused port
                    timers[(local, remote)] = timer
        assert conn.reason is None
    assert timers[(listen_port, client_port)] == "02"  # the forwarder's client-side socket
    forwarder_to_target = [t for (local, remote), t in timers.items() if remote == target_port and local != listen_port]
    assert forwarder_to_target and set(forwarder_to_target) == {"02"}
    assert timers[(client_port, listen_port)] == "00"  # the test's own socket: no keep-alive


async def test_client_reset_and_target_reset_are_told_apart() -> None:
    hold = trio.Event()

    async def reset_after_hello(stream: trio.SocketStream) -> None:
        data = await stream.receive_some()
        if data == b"reset-me":
            rst_close(stream)
            return
        await hold.wait()

    log = AccessLogCapture()
    async with backend(reset_after_hello) as target, forwarder(config(route(targets=[target])), access_log=log) as fwd:
        a = await connect(fwd)
        await a.send_all(b"reset-me")
        with trio.fail_after(2):
            await receive_all(a)
            [first] = await log.wait(1)
        b = await connect(fwd)
        await b.send_all(b"stay")
        await trio.testing.wait_all_tasks_blocked(0.05)
        rst_close(b)
        with trio.fail_after(2):
            [_, second] = await log.wait(2)
        hold.set()
    assert (first["reason"], second["reason"]) == ("target_reset", "client_reset")


async def test_a_hostname_target_is_resolved_and_happy_eyeballs_finds_the_listening_family() -> None:
    """localhost resolves to ::1 and 127.0.0.1; the backend listens on 127.0.0.1 only."""
    log = AccessLogCapture()
    async with backend(echo) as target:
        port = target.rsplit(":", 1)[1]
        async with forwarder(config(route(targets=[f"localhost:{port}"])), access_log=log) as fwd:
            client = await connect(fwd)
            await client.send_all(b"named")
            assert await receive_exactly(client, 5) == b"named"
            await client.aclose()
            [record] = await log.wait(1)
    assert (record["target"], record["reason"]) == (target, "normal")
