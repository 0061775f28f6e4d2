"""Misbehaving clients against the real daemon: resets, half-open, slowloris, silence,
thousands that vanish, garbage first bytes, floods over the per-IP limits.

Each test is one scenario of harness.py: after it, the table is empty, fds are back, RSS
is within the stated bound, every connection has one access-log line with its expected
reason, and stats count exactly the connections made.
"""

from __future__ import annotations

import random

import trio

from tests.conftest import backend, echo, receive_all, receive_exactly, receive_one_or_eof, rst_close
from tests.reliability.harness import MIB, half_open_target, route_file, rss_bytes, trickle
from triofwd._proxy_protocol import encode_v2
from triofwd.testing import build_client_hello

GIVE_UP = 60  # no scenario here may take longer, whatever happens


async def test_reset_mid_stream(scenario) -> None:
    """Clients reset while bytes flow both ways: client_reset, every time."""
    count, chunk = 300, 64 * 1024
    async with backend(echo) as target:
        async with scenario(route_file({}, {"name": "echo", "targets": [target]})) as s:

            async def one(i: int) -> None:
                client = await s.open("echo", expect="client_reset")
                await client.send_all(b"x" * chunk)
                await receive_exactly(client, chunk // 2)  # half echoed: the rest still in flight
                await client.send_all(b"y" * chunk)
                rst_close(client)

            with trio.fail_after(GIVE_UP):
                await s.many(count, one)
            s.faults = count


async def test_half_closed_clients_that_stay_half_open(scenario) -> None:
    """Clients send EOF and never close: the target still answers them, then
    half_close_timeout ends them (or, without one, inactivity_timeout)."""
    count = 100
    async with backend(half_open_target) as target:
        text = route_file(
            {"inactivity_timeout": "1s"},
            {"name": "half", "targets": [target], "half_close_timeout": "500ms", "inactivity_timeout": "1h"},
            {"name": "idle", "targets": [target]},
        )
        async with scenario(text) as s:

            async def one(i: int) -> None:
                route = "half" if i % 2 else "idle"
                client = await s.open(route, expect="half_close_timeout" if route == "half" else "inactivity_timeout")
                async with client:
                    await client.send_all(b"q" * 100)
                    await client.send_eof()
                    assert await receive_all(client) == b"got 100"  # answered after our EOF, then closed by the daemon

            with trio.fail_after(GIVE_UP):
                await s.many(count, one, concurrency=count)
            s.faults = count


async def test_slowloris_on_an_sni_port(scenario) -> None:
    """A ClientHello one byte per second never gets routed: initial_data_timeout (the
    route's own, not the default 30 s), while a client with a whole ClientHello is served
    beside them."""
    count = 200
    hello = build_client_hello("www.example.com")
    async with backend(echo) as target:
        text = route_file({}, {"name": "tls", "domains": ["www.example.com"], "targets": [target], "initial_data_timeout": "2s"})
        async with scenario(text) as s:
            cut_off = 0

            async def slow(i: int) -> None:
                nonlocal cut_off
                client = await s.open("tls", expect="initial_data_timeout")
                opened = trio.current_time()
                async with client:
                    await trickle(client, hello, interval=1.0)
                    assert trio.current_time() - opened < 2 + 5  # the route's 2 s, with room for a busy machine
                    cut_off += 1

            async def honest() -> None:
                await trio.sleep(0.5)  # while the slow ones hold their places
                client = await s.open("tls", expect="normal")
                async with client:
                    await client.send_all(hello)
                    assert await receive_exactly(client, len(hello)) == hello
                    await client.send_eof()
                    assert await receive_all(client) == b""

            with trio.fail_after(GIVE_UP):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(s.many, count, slow, count)
                    nursery.start_soon(honest)
            assert cut_off == count
            s.faults = count


async def test_clients_that_connect_and_never_send(scenario) -> None:
    """Silence on an SNI port is initial_data_timeout; on a plain port, inactivity_timeout."""
    count = 200
    async with backend(echo) as target:
        text = route_file(
            {"initial_data_timeout": "1s", "inactivity_timeout": "1s"},
            {"name": "tls", "domains": ["www.example.com"], "targets": [target]},
            {"name": "plain", "targets": [target]},
        )
        async with scenario(text) as s:

            async def one(i: int) -> None:
                route = "tls" if i % 2 else "plain"
                client = await s.open(route, expect="initial_data_timeout" if route == "tls" else "inactivity_timeout")
                async with client:
                    assert await receive_all(client) == b""

            with trio.fail_after(GIVE_UP):
                await s.many(count, one, concurrency=count)
            s.faults = count


async def test_five_thousand_connections_open_at_once_then_vanish(scenario) -> None:
    """5,000 connections held open together (every one established through the daemon),
    then all gone at once, half with a reset and half with a plain close; twice.

    RSS bound: the first round may grow it by 96 MiB (5,000 open connections at ~17 KiB
    each, which the allocator keeps for reuse); the second round must reuse that memory,
    growing it by at most 8 MiB more — a leak of even 2 KiB per connection would not fit.
    """
    count = 5000
    async with backend(echo) as target:
        async with scenario(route_file({}, {"name": "echo", "targets": [target]}), rss_bound_mib=96 + 8) as s:

            async def round_of_vanishing() -> None:
                clients: dict[int, trio.SocketStream] = {}

                async def one(i: int) -> None:
                    client = clients[i] = await s.open("echo", expect="client_reset" if i % 2 else "normal")
                    await client.send_all(b"!")
                    assert await receive_exactly(client, 1) == b"!"

                await s.many(count, one, concurrency=128)
                assert (await s.request("stats"))["active"] == count
                for i, client in clients.items():
                    if i % 2:
                        rst_close(client)
                    else:
                        client.socket.close()
                s.faults += count
                await s.settle()

            with trio.fail_after(GIVE_UP):
                await round_of_vanishing()
                after_first = rss_bytes(s.pid)
                assert after_first - s.base_rss <= 96 * MIB
                await round_of_vanishing()
                assert rss_bytes(s.pid) - after_first <= 8 * MIB


async def test_garbage_instead_of_a_client_hello_or_a_proxy_header(scenario) -> None:
    """Bytes that are no ClientHello on an SNI-only port: no_route. Bytes that are no PROXY
    header from a trusted proxy: rejected. A PROXY header from an untrusted one: rejected."""
    rng = random.Random(7)
    count = 300
    async with backend(echo) as target:
        text = route_file(
            {"trusted_proxies": ["127.0.0.1/32"], "initial_data_timeout": "2s"},
            {"name": "tls", "domains": ["www.example.com"], "targets": [target]},
            {"name": "proxied", "accept_proxy_protocol": True, "targets": [target]},
        )
        async with scenario(text) as s:

            async def one(i: int) -> None:
                kind = i % 3
                if kind == 0:  # not TLS at all, or a TLS record header followed by junk
                    route, source = "tls", "127.0.0.1"
                    data = rng.choice([b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05" + rng.randbytes(5), rng.randbytes(rng.randint(1, 600))])
                    expect = "no_route"
                elif kind == 1:  # a trusted proxy that sends junk where its header goes
                    route, source = "proxied", "127.0.0.1"
                    data = rng.choice([b"PROXY TCP9 a b c d\r\n", b"\r\n\r\n\x00\r\nQUIT\n" + rng.randbytes(20), b"HELLO" + rng.randbytes(100)])
                    expect = "rejected"
                else:  # a direct client pretending to be a proxy
                    route, source = "proxied", "127.0.0.2"
                    data = encode_v2(("10.1.2.3", 1234), ("10.0.0.1", 443))
                    expect = "rejected"
                client = await s.open(route, expect=expect, source=source)
                async with client:
                    try:
                        await client.send_all(data)
                    except trio.BrokenResourceError:
                        pass  # closed on us while we wrote: fine
                    assert await receive_all(client) == b""

            with trio.fail_after(GIVE_UP):
                await s.many(count, one)
            s.faults = count


async def test_floods_over_the_per_ip_limits(scenario) -> None:
    """A flood from one address over max_connections_per_ip and over connection_rate_per_ip
    is refused (ip_limit, rate_limited) while another address is still served."""
    flood, held_limit, rate = 60, 5, 10
    async with backend(echo) as target:
        text = route_file(
            {},
            {"name": "count", "targets": [target], "max_connections_per_ip": held_limit},
            {"name": "rate", "targets": [target], "connection_rate_per_ip": f"{rate}/min"},
        )
        async with scenario(text) as s:
            with trio.fail_after(GIVE_UP):
                held: list[trio.SocketStream] = []
                forwarded = 0

                async def one(i: int) -> None:
                    nonlocal forwarded
                    client = await s.open("count", expect={"normal", "ip_limit"}, source="127.0.0.2")
                    await client.send_all(b"?")
                    if await receive_one_or_eof(client) == b"?":
                        forwarded += 1
                    held.append(client)

                await s.many(flood, one, concurrency=flood)
                assert forwarded == held_limit
                bystander = await s.open("count", expect="normal", source="127.0.0.3")
                await bystander.send_all(b"!")
                assert await receive_exactly(bystander, 1) == b"!"
                for client in [*held, bystander]:
                    await client.aclose()

                served = 0
                for _ in range(flood):
                    client = await s.open("rate", expect={"normal", "rate_limited"}, source="127.0.0.4")
                    async with client:
                        await client.send_all(b"?")
                        served += await receive_one_or_eof(client) == b"?"
                assert served == rate
            records = await s.settle()
            reasons = [r["reason"] for r in records]
            assert (reasons.count("ip_limit"), reasons.count("rate_limited")) == (flood - held_limit, flood - rate)
            s.faults = 2 * flood - held_limit - rate
