"""Misbehaving targets behind the real daemon: refusing, black holes, resets, early closes,
a target that reads nothing under 100 MB (back pressure), slow and failing DNS.

Each test is one scenario of harness.py (see its docstring for the checks run after it).
DNS faults come from tests/reliability/faults/sitecustomize.py, loaded by the daemon:
names under .invalid are answered there, so no query leaves the machine.
"""

from __future__ import annotations

import os

import pytest
import trio

from tests.conftest import backend, black_hole, echo, receive_all, receive_exactly, refused_address
from tests.reliability.harness import MIB, black_hole_target, early_closing_target, resetting_target, route_file, rss_bytes

GIVE_UP = 60  # no scenario here may take longer, whatever happens


async def exchange(client: trio.SocketStream, payload: bytes = b"hello") -> bytes:
    """Send `payload`, then everything until the daemon closes (a reset counts as the end)."""
    async with client:
        try:
            await client.send_all(payload)
        except trio.BrokenResourceError:
            return b""
        return await receive_all(client)


async def test_targets_that_refuse_or_black_hole(scenario) -> None:
    """Refused: connect_refused (after every retry). SYNs dropped: connect_timeout.
    Accepted but never answered: inactivity_timeout."""
    count = 60
    with refused_address() as refused, black_hole() as dropped:
        async with backend(black_hole_target) as silent:
            text = route_file(
                {"connect_timeout": "500ms", "inactivity_timeout": "1s"},
                {"name": "refused", "targets": [refused], "connect_retries": 2},
                {"name": "dropped", "targets": [dropped], "connect_retries": 0},
                {"name": "silent", "targets": [silent]},
            )
            async with scenario(text) as s:
                expect = {"refused": "connect_refused", "dropped": "connect_timeout", "silent": "inactivity_timeout"}
                routes = list(expect)

                async def one(i: int) -> None:
                    route = routes[i % 3]
                    assert await exchange(await s.open(route, expect=expect[route])) == b""

                with trio.fail_after(GIVE_UP):
                    await s.many(count, one, concurrency=count)
                s.faults = count


async def test_targets_that_reset_at_once_mid_stream_or_close_early(scenario) -> None:
    """A target that resets as soon as it accepts: target_reset. One that answers part and
    resets: the client gets the part, then the end; target_reset. One that closes while
    the client is still sending a megabyte: target_reset too (its kernel answers the
    unread bytes with a reset)."""
    count = 300
    async with (
        backend(resetting_target(after=0)) as at_once,
        backend(resetting_target(after=1000, reply=b"partial")) as resetting,
        backend(early_closing_target(after=1000)) as closing,
    ):
        text = route_file({}, {"name": "at_once", "targets": [at_once]}, {"name": "resetting", "targets": [resetting]}, {"name": "closing", "targets": [closing]})
        async with scenario(text) as s:

            async def one(i: int) -> None:
                kind = i % 3
                if kind == 0:
                    assert await exchange(await s.open("at_once", expect="target_reset"), b"a" * 1000) == b""
                elif kind == 1:
                    got = await exchange(await s.open("resetting", expect="target_reset"), b"r" * 1000)
                    assert got in (b"partial", b"")  # the reset may overtake the bytes
                else:
                    assert await exchange(await s.open("closing", expect="target_reset"), b"c" * MIB) == b""

            with trio.fail_after(GIVE_UP):
                await s.many(count, one)
            s.faults = count


@pytest.mark.parametrize("direction", ["client_to_target", "target_to_client"])
async def test_a_peer_that_reads_nothing_under_100_megabytes(scenario, direction: str) -> None:
    """One side sends 100 MB to a peer that reads nothing: the sender stalls (back
    pressure) and the daemon's memory stays flat; once the peer reads, every byte arrives.

    RSS bound: 4 MiB over the baseline, measured while stalled and after (the kernel's
    socket buffers and the splice pipes are not the process's RSS; a copy of the stream
    in the daemon would be 100 MiB).
    """
    total = 100 * MIB
    chunk = os.urandom(MIB)
    release = trio.Event()
    target_got = 0

    async def target(stream: trio.SocketStream) -> None:
        nonlocal target_got
        async with stream:
            if direction == "target_to_client":
                for _ in range(total // MIB):
                    await stream.send_all(chunk)
                await stream.send_eof()
                return
            await release.wait()
            async for data in stream:
                target_got += len(data)

    async with backend(target) as address:
        async with scenario(route_file({}, {"name": "bulk", "targets": [address]}), rss_bound_mib=4) as s:
            client = await s.open("bulk", expect="normal")
            sent = received = 0

            async def send() -> None:
                nonlocal sent
                for _ in range(total // MIB):
                    await client.send_all(chunk)
                    sent += MIB
                await client.send_eof()

            async def receive() -> None:
                nonlocal received
                await release.wait()
                async for data in client:
                    received += len(data)

            with trio.fail_after(GIVE_UP):
                async with trio.open_nursery() as nursery:
                    if direction == "client_to_target":
                        nursery.start_soon(send)
                    else:
                        nursery.start_soon(receive)
                    # Stalled: the daemon forwards until the kernel's buffers are full, then stops
                    # reading. A stall is seen over time only: the count stops moving.
                    before, progress = -1, await moved(s)
                    while progress == 0 or progress != before:
                        await trio.sleep(0.3)
                        before, progress = progress, await moved(s)
                    assert progress < 20 * MIB, f"{progress} bytes moved toward a peer that reads nothing"
                    assert rss_bytes(s.pid) - s.base_rss <= 4 * MIB
                    release.set()
                if direction == "client_to_target":
                    assert await receive_all(client) == b""
                    await client.aclose()
                else:
                    await client.aclose()
            if direction == "client_to_target":
                assert (sent, target_got) == (total, total)
            else:
                assert received == total
            s.faults = 1


async def moved(s) -> int:
    """Bytes the scenario's one connection has moved so far, both ways (0 before it is in the table)."""
    rows = await s.request("connections")
    return rows[0]["bytes_in"] + rows[0]["bytes_out"] if rows else 0


async def test_slow_and_failing_name_resolution(scenario) -> None:
    """Targets by name: a name that does not exist is dns_error; one that fails slowly but
    within connect_timeout is dns_error too; one slower than connect_timeout is
    connect_timeout (the lookup is part of the connect); a slow one that resolves in time
    is served."""
    count = 80
    async with backend(echo) as target:
        port = target.rsplit(":", 1)[1]
        text = route_file(
            {"connect_timeout": "1s"},
            {"name": "nonexistent", "targets": ["nonexistent.invalid:80"]},
            {"name": "fails_slowly", "targets": ["fail-300.invalid:80"]},
            {"name": "too_slow", "targets": ["fail-3000.invalid:80"], "connect_retries": 0},
            {"name": "slow_but_there", "targets": [f"ok-300.invalid:{port}"]},
        )
        async with scenario(text) as s:
            expect = {"nonexistent": "dns_error", "fails_slowly": "dns_error", "too_slow": "connect_timeout", "slow_but_there": "normal"}
            routes = list(expect)

            async def one(i: int) -> None:
                route = routes[i % len(routes)]
                client = await s.open(route, expect=expect[route])
                if route != "slow_but_there":
                    assert await exchange(client) == b""
                    return
                async with client:
                    await client.send_all(b"hello")
                    assert await receive_exactly(client, 5) == b"hello"
                    await client.send_eof()
                    assert await receive_all(client) == b""

            with trio.fail_after(GIVE_UP):
                await s.many(count, one, concurrency=count)
            s.faults = count * 3 // 4
