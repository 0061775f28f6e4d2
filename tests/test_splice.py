"""The zero-copy path: taken where it should be, counting exactly as the copying path does."""

from __future__ import annotations

import os
import threading

import pytest
import trio

import triofwd._engine
from tests.conftest import AccessLogCapture, backend, config, connect, echo, fd_kinds, forwarder, receive_all, route
from triofwd._splice import POOL


async def one_exchange(payload: bytes) -> tuple[dict, str]:
    """Send payload through a forward route to an echo target; return the access record and the path."""
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(route(targets=[target])), access_log=log) as fwd:
        client = await connect(fwd)
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for i in range(0, len(payload), 100_000):
                    await client.send_all(payload[i : i + 100_000])
                await client.send_eof()

            nursery.start_soon(send)
            with trio.fail_after(20):
                received = await receive_all(client)
        [conn] = list(fwd.connections.values()) or [None]
        path = conn.path if conn else ""
        await client.aclose()
        [record] = await log.wait(1)
    assert received == payload
    return record, path


@pytest.fixture
def copying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triofwd._engine, "SPLICE", False)


async def test_plain_forward_routes_take_the_splice_path() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(route(targets=[target])), access_log=log) as fwd:
        client = await connect(fwd)
        await client.send_all(b"x")
        assert await client.receive_some() == b"x"
        [conn] = fwd.connections.values()
        assert conn.path == "splice"


async def test_bulk_is_spliced_and_small_messages_are_not() -> None:
    """splice-auto: a request of a few bytes is copied through the shared buffer, bulk goes through pipes."""
    async with backend(echo) as target, forwarder(config(route(targets=[target]))) as fwd:
        client = await connect(fwd)
        before = POOL.borrowed
        for _ in range(20):
            await client.send_all(b"ping")
            assert await client.receive_some() == b"ping"
        assert POOL.borrowed == before
        payload = os.urandom(2 * 1024 * 1024)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            got = bytearray()
            with trio.fail_after(20):
                while len(got) < len(payload):
                    got += await client.receive_some()
        assert got == payload
        assert POOL.borrowed > before


async def test_a_handler_route_copies() -> None:
    async def hello(stream, info) -> None:
        await stream.send_all(b"hi")

    async with forwarder(config(route(action="handler", handler=hello))) as fwd:
        client = await connect(fwd)
        assert await receive_all(client) == b"hi"


async def test_bytes_are_counted_the_same_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    spliced, path = await one_exchange(payload)
    monkeypatch.setattr(triofwd._engine, "SPLICE", False)
    copied, copy_path = await one_exchange(payload)
    assert (path, copy_path) in {("splice", "copy"), ("", "")}  # "" if the connection closed before it was read
    assert (spliced["bytes_in"], spliced["bytes_out"]) == (copied["bytes_in"], copied["bytes_out"]) == (len(payload), len(payload))
    assert spliced["reason"] == copied["reason"] == "normal"


async def test_out_of_pipes_the_raw_path_copies_and_counts_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """No pipe can be had (EMFILE): bulk chunks are copied through the shared buffer instead."""
    monkeypatch.setattr(POOL, "take", lambda: None)
    record, path = await one_exchange(os.urandom(3 * 1024 * 1024 + 17))
    assert path in ("splice", "")
    assert (record["bytes_in"], record["bytes_out"], record["reason"]) == (3 * 1024 * 1024 + 17, 3 * 1024 * 1024 + 17, "normal")


async def test_idle_connections_hold_no_pipe() -> None:
    """Pipes are borrowed per chunk: with traffic stopped, every pipe is back in the pool (or closed)."""
    pipes_before = fd_kinds()["pipe"] - 2 * len(POOL)
    async with backend(echo) as target, forwarder(config(route(targets=[target]))) as fwd:
        clients = [await connect(fwd) for _ in range(20)]
        for client in clients:
            await client.send_all(b"ping")
            assert await client.receive_some() == b"ping"
        await trio.testing.wait_all_tasks_blocked()
        pipes_open = fd_kinds()["pipe"]
        # 20 idle connections hold no pipe: every pipe fd open is the pool's (2 fds each)
        assert pipes_open - 2 * len(POOL) == pipes_before


def test_two_trio_runs_in_two_threads_do_not_share_a_copy_buffer() -> None:
    """recv_into releases the GIL: forwarders in two threads' trio runs each copy through their own buffer."""
    failures: list[BaseException] = []

    async def ping_pong(seed: int) -> None:
        messages = [bytes([seed]) * (1000 + 7 * i) for i in range(300)]  # small: the copying path
        async with backend(echo) as target, forwarder(config(route(targets=[target]))) as fwd:
            client = await connect(fwd)
            with trio.fail_after(20):
                for message in messages:
                    await client.send_all(message)
                    got = b""
                    while len(got) < len(message):
                        got += await client.receive_some()
                    assert got == message

    def run(seed: int) -> None:
        try:
            trio.run(ping_pong, seed)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures
