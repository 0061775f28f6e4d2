"""The forwarder as a whole, embedded: limits, balancing, reload, shutdown, drain, churn."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

import triofwd
from tests.conftest import (
    AccessLogCapture,
    backend,
    config,
    connect,
    echo,
    forwarder,
    open_fds,
    receive_all,
    receive_exactly,
    receive_one_or_eof,
    route,
    rst_close,
    split,
)
from triofwd._splice import POOL


def tagged(tag: bytes):
    """A backend that says its tag at once, then echoes."""

    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(tag)
        await echo(stream)

    return handler


@contextlib.asynccontextmanager
async def three_backends() -> AsyncIterator[dict[str, bytes]]:
    async with backend(tagged(b"a")) as a, backend(tagged(b"b")) as b, backend(tagged(b"c")) as c:
        yield {a: b"a", b: b"b", c: b"c"}


async def tag_of(fwd: triofwd.Forwarder, keep: list[trio.SocketStream] | None = None) -> bytes:
    client = await connect(fwd)
    tag = await receive_exactly(client, 1)
    if keep is None:
        await client.aclose()
    else:
        keep.append(client)
    return tag


async def connect_from(fwd: triofwd.Forwarder, source: str) -> trio.SocketStream:
    return await trio.open_tcp_stream(*split(fwd.addresses["r"][0]), local_address=source)


async def is_forwarded(client: trio.SocketStream) -> bool:
    """True if bytes come back through the forwarder; False if it closed the connection."""
    with trio.fail_after(3):
        try:
            await client.send_all(b"?")
        except trio.BrokenResourceError:
            return False
        return await receive_one_or_eof(client) == b"?"


# -- balancing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("round-robin", b"abcabc"), ("first", b"aaaaaa")],
)
async def test_deterministic_balance_modes(mode: str, expected: bytes) -> None:
    async with three_backends() as tags:
        async with forwarder(config(route(targets=list(tags), balance=mode))) as fwd:
            got = b"".join([await tag_of(fwd) for _ in range(6)])
    assert got == expected


async def test_random_balance_uses_every_target() -> None:
    async with three_backends() as tags:
        async with forwarder(config(route(targets=list(tags), balance="random"))) as fwd:
            got = {await tag_of(fwd) for _ in range(40)}
    assert got == {b"a", b"b", b"c"}  # all the same 40 times: probability 3 * 3**-40


async def test_least_connections_avoids_the_busy_target() -> None:
    async with three_backends() as tags:
        async with forwarder(config(route(targets=list(tags), balance="least-connections"))) as fwd:
            held: list[trio.SocketStream] = []
            first = await tag_of(fwd, keep=held)  # stays open on `first`
            others = [await tag_of(fwd) for _ in range(8)]
    assert first == b"a"
    assert first not in others
    assert set(others) == {b"b", b"c"}


# -- limits ---------------------------------------------------------------------------


async def test_max_connections_refuses_with_capacity_and_keeps_accepting() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(route(targets=[target]), max_connections=2), access_log=log) as fwd:
        a, b = await connect(fwd), await connect(fwd)
        assert await is_forwarded(a) and await is_forwarded(b)
        c = await connect(fwd)
        assert not await is_forwarded(c)
        [refused] = await log.wait(1)
        await a.aclose()
        await log.wait(2)
        d = await connect(fwd)
        assert await is_forwarded(d)
    assert refused["reason"] == "capacity"


async def test_route_max_connections_override() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(route(targets=[target], max_connections=1)), access_log=log) as fwd:
        a = await connect(fwd)
        assert await is_forwarded(a)
        assert not await is_forwarded(await connect(fwd))
        [refused] = await log.wait(1)
    assert (refused["route"], refused["reason"]) == ("r", "capacity")


async def test_max_connections_per_ip_counts_each_address_apart() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(route(targets=[target]), max_connections_per_ip=1), access_log=log) as fwd:
        first = await connect_from(fwd, "127.0.0.1")
        assert await is_forwarded(first)
        assert not await is_forwarded(await connect_from(fwd, "127.0.0.1"))
        [refused] = await log.wait(1)
        assert await is_forwarded(await connect_from(fwd, "127.0.0.2"))
    assert refused["reason"] == "ip_limit"


async def test_connection_rate_per_ip() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(route(targets=[target]), connection_rate_per_ip="3/min"), access_log=log) as fwd:
        for _ in range(3):
            client = await connect_from(fwd, "127.0.0.1")
            assert await is_forwarded(client)
            await client.aclose()
        assert not await is_forwarded(await connect_from(fwd, "127.0.0.1"))
        assert await is_forwarded(await connect_from(fwd, "127.0.0.3"))
        records = await log.wait(4)
    assert [r["reason"] for r in records].count("rate_limited") == 1


# -- reload, drain, shutdown ----------------------------------------------------------


async def test_reload_under_live_traffic_keeps_open_connections_on_their_route() -> None:
    async with backend(tagged(b"A")) as a, backend(tagged(b"B")) as b:
        async with forwarder(config(route(targets=[a]))) as fwd:
            old = await connect(fwd)
            assert await receive_exactly(old, 1) == b"A"
            stop = trio.Event()
            echoed = 0

            async def keep_talking() -> None:
                nonlocal echoed
                while not stop.is_set():
                    await old.send_all(b"0123456789")
                    assert await receive_exactly(old, 10) == b"0123456789"
                    echoed += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_talking)
                await trio.sleep(0.05)
                change = await fwd.reload(config(route(targets=[b]), route("extra", targets=[b])))
                assert change == {"added": ["extra"], "removed": [], "changed": ["r"]}
                before = echoed
                assert await tag_of(fwd) == b"B"  # new connections take the new table
                await trio.sleep(0.05)
                stop.set()
            assert echoed > before  # the old connection kept moving bytes to A
            [conn] = [c for c in fwd.connections.values() if c.target == a]
            assert conn.route == "r" and conn.reason is None
            assert "extra" in fwd.addresses


async def test_a_bad_reload_keeps_the_old_table() -> None:
    async with backend(tagged(b"A")) as a:
        async with forwarder(config(route(targets=[a]))) as fwd:
            before = fwd.addresses
            with pytest.raises(triofwd.ConfigError, match=r"invalid target 'nowhere': expected host:port - at `\$.routes\[0\].targets\[0\]`"):
                await fwd.reload(config(route(targets=["nowhere"])))
            with socket.socket() as busy:
                busy.bind(("127.0.0.1", 0))
                busy.listen()
                port = busy.getsockname()[1]
                with pytest.raises(triofwd.ListenError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
                    await fwd.reload(config(route(targets=[a]), route("new", ports=[port], targets=[a])))
            assert fwd.addresses == before
            assert await tag_of(fwd) == b"A"


async def test_drain_stops_accepting_and_open_connections_go_on() -> None:
    async with backend(echo) as target, forwarder(config(route(targets=[target]))) as fwd:
        client = await connect(fwd)
        address = split(fwd.addresses["r"][0])
        fwd.drain()
        await trio.testing.wait_all_tasks_blocked()
        assert fwd.addresses == {}
        with pytest.raises(OSError):
            await trio.open_tcp_stream(*address)
        assert await is_forwarded(client)


async def test_shutdown_gives_open_connections_the_grace_period_then_closes_them() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target:
        async with trio.open_nursery() as nursery:
            fwd = await nursery.start(lambda task_status: triofwd.serve(config(route(targets=[target])), access_log=log, task_status=task_status))
            lingering = await connect(fwd)
            finishing = await connect(fwd)
            assert await is_forwarded(lingering) and await is_forwarded(finishing)
            address = split(fwd.addresses["r"][0])
            start = trio.current_time()
            fwd.shutdown(grace=0.5)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(OSError):
                await trio.open_tcp_stream(*address)  # listeners are closed at once
            assert await is_forwarded(finishing)  # still served during the grace period
            await finishing.send_eof()
            assert await receive_all(finishing) == b""
            with trio.fail_after(3):
                await fwd.wait_stopped()
            stopped = trio.current_time() - start
    by_reason = {r["reason"]: r for r in log.records}
    assert set(by_reason) == {"normal", "shutdown"}
    assert 0.45 <= stopped < 2.0


async def test_cancelling_the_embedding_nursery_closes_everything_with_shutdown() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target:
        async with forwarder(config(route(targets=[target])), access_log=log) as fwd:
            clients = [await connect(fwd) for _ in range(3)]
            for client in clients:
                assert await is_forwarded(client)
        # leaving `forwarder` cancelled its nursery
        assert not fwd.connections
        assert [r["reason"] for r in log.records] == ["shutdown"] * 3
        for client in clients:
            assert await receive_all(client) == b""


# -- churn ----------------------------------------------------------------------------


async def test_churn_leaves_an_empty_table_and_no_extra_file_descriptors() -> None:
    """Thousands of short connections, some reset by the client, some by the target."""

    async def target(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            data = await stream.receive_some()
            if data.startswith(b"rst"):
                rst_close(stream)
                return
            await stream.send_all(data)
        await stream.aclose()

    total = 2000
    rng = random.Random(2026)
    kinds = [rng.choice(["normal", "client_reset", "target_reset"]) for _ in range(total)]
    log = AccessLogCapture()
    async with backend(target) as address, forwarder(config(route(targets=[address])), access_log=log) as fwd:
        await trio.testing.wait_all_tasks_blocked()
        baseline = open_fds() - 2 * len(POOL)  # the splice pipe pool is process-wide: count it apart
        limiter = trio.CapacityLimiter(64)

        async def one(kind: str) -> None:
            async with limiter:
                client = await connect(fwd)
                if kind == "client_reset":
                    await client.send_all(b"hello")
                    rst_close(client)
                    return
                await client.send_all(b"rst" if kind == "target_reset" else b"hello")
                await receive_all(client)
                await client.aclose()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for kind in kinds:
                    nursery.start_soon(one, kind)
            records = await log.wait(total, timeout=30)
        await trio.testing.wait_all_tasks_blocked()
        assert not fwd.connections
        assert open_fds() - 2 * len(POOL) == baseline
        stats = fwd.stats()
    assert len(records) == total == stats["total"]
    assert stats["active"] == 0
    assert sum(stats["terminations"].values()) == total
    assert sorted({r["reason"] for r in records}) <= ["client_reset", "normal", "target_reset"]
    assert stats["routes"]["r"]["total"] == total
    # a reset racing a normal close may legitimately be seen as either; most must be told apart right
    assert stats["terminations"].get("target_reset", 0) >= kinds.count("target_reset") * 0.9


def test_accept_ignores_the_errors_trio_ignores() -> None:
    """The pending connection's own errors (accept(2), "Error handling") are trio's list:
    none of them may cost the listener a back-off. If trio's list changes, so must ours."""
    from trio._highlevel_socket import _ignorable_accept_errnos

    from triofwd._listeners import ACCEPT_IGNORED_ERRNOS

    assert _ignorable_accept_errnos == ACCEPT_IGNORED_ERRNOS
    import errno

    assert {errno.ENETDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNABORTED, errno.EPERM} <= ACCEPT_IGNORED_ERRNOS
    assert not {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM} & ACCEPT_IGNORED_ERRNOS  # ours: back off


async def test_wait_stopped_returns_when_serve_raises() -> None:
    """serve() that ends by raising (a KeyboardInterrupt from a handler) still releases
    whoever waits for it to stop."""

    async def interrupts(stream: trio.abc.Stream, info: triofwd.HandlerInfo) -> None:
        raise KeyboardInterrupt

    stopped = trio.Event()
    async with trio.open_nursery() as outer:
        with pytest.raises(BaseExceptionGroup) as raised:
            async with trio.open_nursery() as nursery:
                fwd = await nursery.start(lambda task_status: triofwd.serve(config(route(action="handler", handler=interrupts)), task_status=task_status))

                async def wait_then_say() -> None:
                    await fwd.wait_stopped()
                    stopped.set()

                outer.start_soon(wait_then_say)
                (await connect(fwd)).socket.close()
                await trio.sleep_forever()
        assert raised.value.subgroup(KeyboardInterrupt) is not None
        with trio.fail_after(5):
            await stopped.wait()
