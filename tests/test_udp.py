"""UDP routes: one session per client flow, over real UDP sockets and real DNS.

Every socket is on 127.0.0.1 or ::1 with port 0; dnsmasq (the DNS test's target) and dig
(its client) are started by the test and stopped by pid.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

import triofwd
from tests.conftest import AccessLogCapture, config, forwarder, route, split, wait_for
from triofwd._offload import ruleset_text
from triofwd._table import compile_table, load_table

QUIET = 0.3  # how long "nothing arrives" is waited for


def bounded(seconds: float) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]]:
    """Every test bounded: the whole test under fail_after(seconds)."""

    def wrap(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(test)
        async def run(*args: Any, **kwargs: Any) -> None:
            with trio.fail_after(seconds):
                await test(*args, **kwargs)

        return run

    return wrap


def udp_route(name: str = "u", **kw: Any) -> triofwd.Route:
    return route(name, protocol="udp", **kw)


@contextlib.asynccontextmanager
async def udp_target(host: str = "127.0.0.1", reply: Any = None) -> AsyncIterator[tuple[str, list[Any]]]:
    """A UDP server that answers each datagram with reply(data) (default: the datagram);
    yields its "ip:port" and the list of addresses datagrams came from."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind((host, 0))
    seen: list[Any] = []

    async def serve() -> None:
        while True:
            data, peer = await sock.recvfrom(65536)
            seen.append(peer)
            answer = data if reply is None else reply(data)
            if answer is not None:
                await sock.sendto(answer, peer)

    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            port = sock.getsockname()[1]
            yield (f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"), seen
            nursery.cancel_scope.cancel()


def client(host: str = "127.0.0.1") -> trio.socket.SocketType:
    """A client's UDP socket, bound to a port of its own on `host`."""
    raw = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((host, 0))
    return trio.socket.from_stdlib_socket(raw)


async def exchange(sock: trio.socket.SocketType, address: tuple[str, int], data: bytes, timeout: float = 2.0) -> bytes:
    await sock.sendto(data, address)
    with trio.fail_after(timeout):
        return await sock.recv(65536)


async def nothing_arrives(sock: trio.socket.SocketType, within: float = QUIET) -> bool:
    with trio.move_on_after(within):
        await sock.recv(65536)
        return False
    return True


def address_of(fwd: triofwd.Forwarder, name: str = "u") -> tuple[str, int]:
    return split(fwd.addresses[name][0])


# -- the route file ---------------------------------------------------------------------


def errors_of(*routes: triofwd.Route, **settings: Any) -> list[str]:
    with pytest.raises(triofwd.ConfigError) as info:
        compile_table(config(*routes, **settings))
    return info.value.errors


def test_udp_routes_refuse_what_needs_a_tcp_stream_with_the_path() -> None:
    errors = errors_of(
        udp_route(
            "u", targets=["127.0.0.1:53"], domains=["a.example"], proxy_protocol="v2", half_close_timeout="5s", warm=2,
            tcp_keepalive="30s", circuit_breaker=triofwd.CircuitBreaker(), initial_data_timeout="1s",
        ),
        udp_route("b", action="bridge", bridge_to="127.0.0.1:8443"),
        route("t", targets=["127.0.0.1:53"], responses=1),
    )  # fmt: skip
    paths = {line.rpartition(" - at ")[2].strip("`") for line in errors}
    for key in ("domains", "proxy_protocol", "half_close_timeout", "warm", "tcp_keepalive", "circuit_breaker", "initial_data_timeout"):
        assert f"$.routes[0].{key}" in paths, key
    assert "$.routes[1].action" in paths
    assert any("responses is only used with protocol" in line and line.endswith("`$.routes[2].responses`") for line in errors)


def test_udp_route_defaults_and_listeners() -> None:
    table = compile_table(
        config(
            udp_route("dns", ports=[5353], targets=["127.0.0.1:53"], responses=1),
            route("tcp", ports=[5353], targets=["127.0.0.1:53"]),
            udp_route("quick", ports=[5354], targets=["127.0.0.1:53"], inactivity_timeout="2s"),
        )
    )
    dns, tcp, quick = table.routes
    assert (dns.protocol, dns.responses, dns.policy.inactivity_timeout) == ("udp", 1, 60.0)
    assert tcp.policy.inactivity_timeout == 3600.0 and quick.policy.inactivity_timeout == 2.0
    assert dns.listen_keys() != tcp.listen_keys()  # one port, two listeners: UDP and TCP
    assert len(table.by_listener) == 3


def test_udp_routes_run_with_workers() -> None:
    table = compile_table(config(udp_route(targets=["127.0.0.1:53"]), workers=2))
    assert table.routes[0].protocol == "udp"


def test_udp_offload_rules_and_a_tcp_one_on_the_same_port() -> None:
    table = compile_table(
        config(
            udp_route("dns", ports=[53], action="offload", targets=["127.0.0.1:5353"]),
            route("dns-tcp", ports=[53], action="offload", targets=["127.0.0.1:5353"]),
        )
    )
    text = ruleset_text(table)
    assert "udp dport @ports_dns " in text and "tcp dport @ports_dns-tcp " in text
    assert "ct original protocol udp" in text
    errors = errors_of(
        udp_route("a", ports=[53], action="offload", targets=["127.0.0.1:5353"]),
        udp_route("b", ports=[53], action="offload", targets=["127.0.0.1:5354"]),
    )
    assert any("both claim IPv4 UDP port 53" in line for line in errors)


def test_the_example_dns_route_file_checks() -> None:
    table = load_table(pathlib.Path(__file__).parent.parent / "routes" / "dns.toml")
    assert any(r.protocol == "udp" and r.responses == 1 for r in table.routes)


# -- sessions ---------------------------------------------------------------------------


@bounded(60)
async def test_datagrams_both_ways_one_session_per_flow() -> None:
    log = AccessLogCapture()
    async with udp_target() as (target, seen), forwarder(config(udp_route(targets=[target])), access_log=log) as fwd:
        sock = client()
        for i in range(3):
            assert await exchange(sock, address_of(fwd), b"ping %d" % i) == b"ping %d" % i
        [row] = [conn.describe() for conn in fwd.connections.values()]
        assert row["protocol"] == "udp" and row["state"] == "established" and row["target"] == target
        assert (row["datagrams_in"], row["datagrams_out"], row["bytes_in"], row["bytes_out"]) == (3, 3, 18, 18)
        assert len(set(seen)) == 1  # the session's one connected socket
        stats = fwd.stats()["routes"]["u"]
        assert stats["udp"] == {"datagrams_in": 3, "datagrams_out": 3, "drops": {}}
        fwd.connections[row["id"]].kill()
        [line] = await log.wait(1)
        assert not fwd.connections
        assert await exchange(sock, address_of(fwd), b"again") == b"again"  # a new session
        sock.close()
    assert (line["reason"], line["protocol"], line["datagrams_in"], line["datagrams_out"]) == ("killed", "udp", 3, 3)
    assert (line["bytes_in"], line["bytes_out"], line["target"]) == (18, 18, target)


class SessionSteps(trio.abc.Instrument):
    """Counts the steps (wakeups) of session tasks."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("run_session"):
            self.steps += 1


@bounded(60)
async def test_no_session_task_wakes_per_datagram() -> None:
    async with udp_target() as (target, _), forwarder(config(udp_route(targets=[target]))) as fwd:
        sock = client()
        assert await exchange(sock, address_of(fwd), b"first") == b"first"  # the session is up
        steps = SessionSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            for i in range(300):
                assert await exchange(sock, address_of(fwd), b"%d" % i) == b"%d" % i
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.steps == 0  # the mover moved 600 datagrams; the session's task slept
        assert fwd.connections[next(iter(fwd.connections))].describe()["datagrams_in"] == 301
        sock.close()


@bounded(60)
async def test_replies_reach_the_right_client_among_many() -> None:
    async with udp_target() as (target, _), forwarder(config(udp_route(targets=[target]))) as fwd:
        clients = [client() for _ in range(50)]
        for round_ in range(3):
            for i, sock in enumerate(clients):
                await sock.sendto(b"%d:%d" % (i, round_), address_of(fwd))
            for i, sock in enumerate(clients):
                with trio.fail_after(2):
                    assert await sock.recv(100) == b"%d:%d" % (i, round_)
        assert len(fwd.connections) == 50
        for sock in clients:
            sock.close()


@bounded(60)
async def test_a_datagram_from_another_source_is_never_delivered() -> None:
    async with udp_target() as (target, seen), forwarder(config(udp_route(targets=[target]))) as fwd:
        sock = client()
        assert await exchange(sock, address_of(fwd), b"hello") == b"hello"
        session_address = seen[0]  # the session's own socket, connected to the target
        intruder = client()
        await intruder.sendto(b"spoofed", session_address)
        assert await nothing_arrives(sock)
        assert await exchange(sock, address_of(fwd), b"still") == b"still"
        intruder.close()
        sock.close()


@bounded(60)
async def test_a_wildcard_listener_answers_from_the_address_the_client_used() -> None:
    async with udp_target() as (target, _), forwarder(config(udp_route(targets=[target], bind="0.0.0.0"))) as fwd:
        port = address_of(fwd)[1]
        for local in ("127.0.0.2", "127.0.0.1"):
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw.connect((local, port))  # a connected socket takes replies from (local, port) only
            sock = trio.socket.from_stdlib_socket(raw)
            await sock.send(b"from " + local.encode())
            with trio.fail_after(2):
                assert await sock.recv(100) == b"from " + local.encode()
            sock.close()


@bounded(60)
async def test_inactivity_timeout_ends_a_session_with_its_reason() -> None:
    log = AccessLogCapture()
    async with udp_target() as (target, _), forwarder(config(udp_route(targets=[target], inactivity_timeout="300ms")), access_log=log) as fwd:
        sock = client()
        assert await exchange(sock, address_of(fwd), b"x") == b"x"
        began = trio.current_time()
        [line] = await log.wait(1, timeout=3)
        assert 0.25 < trio.current_time() - began < 2.0
        assert not fwd.connections
        sock.close()
    assert line["reason"] == "inactivity_timeout"


@bounded(60)
async def test_responses_end_a_session_at_its_last_reply() -> None:
    log = AccessLogCapture()
    async with udp_target() as (target, _), forwarder(config(udp_route(targets=[target], responses=2)), access_log=log) as fwd:
        sock = client()
        assert await exchange(sock, address_of(fwd), b"1") == b"1"
        assert len(fwd.connections) == 1
        assert await exchange(sock, address_of(fwd), b"2") == b"2"
        [line] = await log.wait(1)
        assert not fwd.connections
        sock.close()
    assert (line["reason"], line["datagrams_in"], line["datagrams_out"]) == ("normal", 2, 2)


@bounded(60)
async def test_sessions_cap_exact_refusal_logged_once_per_flow() -> None:
    log = AccessLogCapture()
    async with udp_target() as (target, _), forwarder(config(udp_route(targets=[target], max_connections=3)), access_log=log) as fwd:
        clients = [client() for _ in range(5)]
        for sock in clients[:3]:
            assert await exchange(sock, address_of(fwd), b"in") == b"in"
        for sock in clients[3:]:
            for _ in range(4):
                await sock.sendto(b"out", address_of(fwd))
            assert await nothing_arrives(sock)
        refused = await log.wait(2)
        assert await nothing_arrives(clients[3], 0.1)
        assert len(log.lines) == 2  # once per flow, not per datagram
        assert len(fwd.connections) == 3
        drops = fwd.stats()["routes"]["u"]["udp"]["drops"]
        assert drops == {"capacity": 8}
        for sock in clients:
            sock.close()
    assert [r["reason"] for r in refused] == ["capacity", "capacity"]


@bounded(60)
async def test_per_ip_cap_exact() -> None:
    log = AccessLogCapture()
    async with udp_target() as (target, _), forwarder(config(udp_route(targets=[target], max_connections_per_ip=2)), access_log=log) as fwd:
        port = address_of(fwd)[1]
        first = [client("127.0.0.1") for _ in range(3)]
        second = [client("127.0.0.2") for _ in range(2)]
        for sock in first[:2] + second:
            assert await exchange(sock, ("127.0.0.1", port), b"ok") == b"ok"
        await first[2].sendto(b"no", ("127.0.0.1", port))
        assert await nothing_arrives(first[2])
        [line] = await log.wait(1)
        assert len(fwd.connections) == 4
        for sock in first + second:
            sock.close()
    assert (line["reason"], line["client"].split(":")[0]) == ("ip_limit", "127.0.0.1")


@bounded(60)
async def test_icmp_port_unreachable_ends_the_session_with_connect_refused() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    target = "127.0.0.1:%d" % closed.getsockname()[1]
    closed.close()
    log = AccessLogCapture()
    async with forwarder(config(udp_route(targets=[target])), access_log=log) as fwd:
        sock = client()
        await sock.sendto(b"anyone?", address_of(fwd))
        [line] = await log.wait(1)
        assert not fwd.connections
        sock.close()
    assert (line["reason"], line["datagrams_in"]) == ("connect_refused", 1)


@bounded(60)
async def test_64_kib_datagrams() -> None:
    big = os.urandom(65507)  # the largest UDP payload over IPv4
    async with udp_target() as (target, _), forwarder(config(udp_route(targets=[target]))) as fwd:
        sock = client()
        assert await exchange(sock, address_of(fwd), big) == big
        sock.close()


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback (::1) here")
@bounded(60)
async def test_ipv6() -> None:
    log = AccessLogCapture()
    async with udp_target("::1") as (target, _), forwarder(config(udp_route(targets=[target], bind="::1", responses=1)), access_log=log) as fwd:
        sock = client("::1")
        assert await exchange(sock, address_of(fwd), b"six") == b"six"
        [line] = await log.wait(1)
        sock.close()
    assert line["client"].startswith("[::1]:") and line["target"] == target and line["reason"] == "normal"


@bounded(60)
async def test_reload_keeps_live_sessions_on_their_route() -> None:
    log = AccessLogCapture()
    async with (
        udp_target(reply=lambda d: b"old " + d) as (old, _),
        udp_target(reply=lambda d: b"new " + d) as (new, _),
        forwarder(config(udp_route(targets=[old])), access_log=log) as fwd,
    ):
        address = address_of(fwd)
        live = client()
        assert await exchange(live, address, b"a") == b"old a"
        await fwd.reload(config(udp_route(targets=[new])))  # the same listener (port 0 of route "u")
        assert address_of(fwd) == address  # the listener stays
        assert await exchange(live, address, b"b") == b"old b"  # its session, its target
        fresh = client()
        assert await exchange(fresh, address, b"c") == b"new c"
        await fwd.reload(config(udp_route("other", targets=[new])))  # the route (and its port) gone
        assert await exchange(live, address, b"d") == b"old d"  # the session still has its socket
        late = client()
        await late.sendto(b"e", address)
        assert await nothing_arrives(late)  # no new flow on a listener that stopped
        for sock in (live, fresh, late):
            sock.close()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@bounded(60)
async def test_a_reload_adding_a_port_back_adopts_the_socket_its_old_sessions_hold() -> None:
    log = AccessLogCapture()
    port = free_udp_port()
    async with (
        udp_target(reply=lambda d: b"old " + d) as (old, _),
        udp_target(reply=lambda d: b"new " + d) as (new, _),
        forwarder(config(udp_route("u", ports=[port], targets=[old])), access_log=log) as fwd,
    ):
        address = ("127.0.0.1", port)
        live = client()
        assert await exchange(live, address, b"a") == b"old a"
        await fwd.reload(config(udp_route("elsewhere", targets=[new])))  # port gone; its session lives on
        assert await exchange(live, address, b"b") == b"old b"
        # A reload that fails (another port is busy) changes nothing, and leaves the socket
        # to close with its last session as before.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
            busy.bind(("127.0.0.1", 0))
            with pytest.raises(triofwd.ListenError):
                await fwd.reload(config(udp_route("v", ports=[port, busy.getsockname()[1]], targets=[new])))
        assert await exchange(live, address, b"c") == b"old c"
        # The port back, on another route: the open socket is taken back, not bound twice.
        await fwd.reload(config(udp_route("v", ports=[port], targets=[new])))
        assert fwd.addresses["v"] == [f"127.0.0.1:{port}"]
        assert await exchange(live, address, b"d") == b"old d"  # the old session replies through it
        fresh = client()
        assert await exchange(fresh, address, b"e") == b"new e"  # a new flow: the new route
        rows = sorted((conn.route, conn.client) for conn in fwd.connections.values())
        assert rows == sorted([("u", "127.0.0.1:%d" % live.getsockname()[1]), ("v", "127.0.0.1:%d" % fresh.getsockname()[1])])
        # The old session's end leaves the listener to the new route.
        [old_session] = [conn for conn in fwd.connections.values() if conn.route == "u"]
        old_session.kill()
        await log.wait(1)
        assert await exchange(live, address, b"f") == b"new f"
        # Dropped and taken back by two reloads in a row (no step of the listener's task between).
        await fwd.reload(config(udp_route("elsewhere", targets=[new])))
        await fwd.reload(config(udp_route("w", ports=[port], targets=[old])))
        assert await exchange(fresh, address, b"g") == b"new g"  # its session, on v
        newest = client()
        assert await exchange(newest, address, b"h") == b"old h"  # w's
        # And a port a reload drops for good is released once its last session has left.
        await fwd.reload(config(udp_route("elsewhere", targets=[new])))
        for conn in list(fwd.connections.values()):
            conn.kill()
        await log.wait(4)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(address)
        for sock in (live, fresh, newest):
            sock.close()
    assert sorted((r["route"], r["reason"]) for r in log.records) == [("u", "killed"), ("v", "killed"), ("v", "killed"), ("w", "killed")]


@bounded(60)
async def test_shutdown_ends_live_sessions_with_shutdown() -> None:
    log = AccessLogCapture()
    async with udp_target() as (target, _):
        async with trio.open_nursery() as nursery:
            fwd = await nursery.start(lambda task_status: triofwd.serve(config(udp_route(targets=[target])), access_log=log, task_status=task_status))
            socks = [client() for _ in range(3)]
            for sock in socks:
                assert await exchange(sock, address_of(fwd), b"x") == b"x"
            fwd.shutdown(grace=0.2)
            with trio.fail_after(3):
                await fwd.wait_stopped()
            for sock in socks:
                sock.close()
    assert sorted(r["reason"] for r in log.records) == ["shutdown"] * 3


@bounded(60)
async def test_control_socket_rows_kill_stats_and_metrics(tmp_path: pathlib.Path) -> None:
    log = AccessLogCapture()
    async with udp_target() as (target, _), forwarder(config(udp_route(targets=[target], max_connections=1)), access_log=log) as fwd:
        async with trio.open_nursery() as nursery:
            path = await nursery.start(functools.partial(triofwd.serve_control, fwd, tmp_path / "c.sock"))
            async with triofwd.open_control(path) as control:
                sock, other = client(), client()
                assert await exchange(sock, address_of(fwd), b"m") == b"m"
                await other.sendto(b"full", address_of(fwd))  # refused: capacity
                await log.wait(1)
                [row] = await control.request("connections")
                assert (row["protocol"], row["route"], row["datagrams_in"], row["datagrams_out"]) == ("udp", "u", 1, 1)
                [route_row] = await control.request("routes")
                assert route_row["protocol"] == "udp"
                stats = await control.request("stats")
                assert stats["routes"]["u"]["udp"] == {"datagrams_in": 1, "datagrams_out": 1, "drops": {"capacity": 1}}
                text = await control.request("metrics")
                assert 'triofwd_udp_datagrams_total{route="u",direction="in"} 1' in text
                assert 'triofwd_udp_datagrams_total{route="u",direction="out"} 1' in text
                assert 'triofwd_udp_datagrams_dropped_total{route="u",reason="capacity"} 1' in text
                await control.request("kill", id=row["id"])
                records = await log.wait(2)
                assert not fwd.connections
                sock.close()
                other.close()
            nursery.cancel_scope.cancel()
    assert [r["reason"] for r in records] == ["capacity", "killed"]


# -- handler routes ---------------------------------------------------------------------


async def echo_handler(session: triofwd.DatagramSession, info: triofwd.HandlerInfo) -> None:
    """A tiny DNS-ish server: each datagram answered with its id (the first 2 bytes) and
    who asked, until the session ends."""
    while True:
        query = await session.receive()
        await session.send(query[:2] + b" for %s:%d via %s" % (info.client[0].encode(), info.client[1], info.route.encode()))


def handler_route(handler: Any, name: str = "u", **kw: Any) -> triofwd.Route:
    return udp_route(name, action="handler", handler=handler, **kw)


@bounded(60)
async def test_a_handler_answers_each_of_several_clients() -> None:
    log = AccessLogCapture()
    seen: list[tuple[tuple[str, int], tuple[str, int], tuple[str, int]]] = []

    async def handler(session: triofwd.DatagramSession, info: triofwd.HandlerInfo) -> None:
        seen.append((session.client, info.client, info.local))
        await echo_handler(session, info)

    async with forwarder(config(handler_route(handler)), access_log=log) as fwd:
        address = address_of(fwd)
        clients = [client() for _ in range(5)]
        for round_ in range(3):
            for i, sock in enumerate(clients):
                await sock.sendto(b"%d%d?" % (i, round_), address)
            for i, sock in enumerate(clients):
                name = sock.getsockname()
                with trio.fail_after(2):
                    assert await sock.recv(100) == b"%d%d for %s:%d via u" % (i, round_, name[0].encode(), name[1])
        assert len(fwd.connections) == 5
        assert {row.describe()["state"] for row in fwd.connections.values()} == {"handler"}
        for conn in list(fwd.connections.values()):
            conn.kill()
        lines = await log.wait(5)
        for sock in clients:
            sock.close()
    assert sorted(s[0] for s in seen) == sorted(s[1] for s in seen) == sorted(sock_name for sock_name in [split(line["client"]) for line in lines])
    assert {s[2] for s in seen} == {address}
    for line in lines:
        assert (line["protocol"], line["route"], line["datagrams_in"], line["datagrams_out"], line["bytes_in"], line["target"]) == ("udp", "u", 3, 3, 9, None)
        assert line["bytes_out"] == 3 * len(b"00 for %s via u" % line["client"].encode())


@bounded(60)
async def test_a_handler_session_ends_after_responses_replies() -> None:
    log = AccessLogCapture()

    async def twice(session: triofwd.DatagramSession, info: triofwd.HandlerInfo) -> None:
        query = await session.receive()
        await session.send(b"one " + query)
        await session.send(b"two " + query)  # past responses = 1: the session has ended
        await trio.sleep_forever()

    async with forwarder(config(handler_route(twice, responses=1)), access_log=log) as fwd:
        sock = client()
        assert await exchange(sock, address_of(fwd), b"q1") == b"one q1"
        [line] = await log.wait(1)
        assert not fwd.connections
        assert await nothing_arrives(sock)
        # The client's next query is a new session, served at once (a handler's end is no refusal).
        assert await exchange(sock, address_of(fwd), b"q2") == b"one q2"
        await log.wait(2)
        sock.close()
    assert (line["reason"], line["datagrams_in"], line["datagrams_out"], line["bytes_out"]) == ("normal", 1, 1, 6)
    assert fwd.stats()["routes"]["u"]["udp"]["drops"] == {}


@bounded(60)
async def test_a_handler_session_ends_with_inactivity_timeout() -> None:
    log = AccessLogCapture()
    async with forwarder(config(handler_route(echo_handler, inactivity_timeout="300ms")), access_log=log) as fwd:
        sock = client()
        for _ in range(3):  # traffic either way keeps it: 3 x 200 ms is past one window
            assert (await exchange(sock, address_of(fwd), b"id"))[:2] == b"id"
            await trio.sleep(0.2)
        assert len(fwd.connections) == 1
        [line] = await log.wait(1, timeout=3)
        assert not fwd.connections
        sock.close()
    assert (line["reason"], line["datagrams_in"], line["datagrams_out"]) == ("inactivity_timeout", 3, 3)
    assert 0.7 * 1000 <= line["duration_ms"] < 3000  # its last datagram at 0.4 s or later, then 0.3 s quiet


@bounded(60)
async def test_a_raising_handler_ends_its_session_and_the_next_is_served(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLogCapture()

    async def fragile(session: triofwd.DatagramSession, info: triofwd.HandlerInfo) -> None:
        while True:
            query = await session.receive()
            if query == b"boom":
                raise ValueError("the handler's own bug")
            await session.send(b"ok " + query)

    async with forwarder(config(handler_route(fragile)), access_log=log) as fwd:
        sock, other = client(), client()
        assert await exchange(sock, address_of(fwd), b"1") == b"ok 1"
        await sock.sendto(b"boom", address_of(fwd))
        [line] = await log.wait(1)
        assert not fwd.connections
        assert await exchange(other, address_of(fwd), b"2") == b"ok 2"  # the next flow
        assert await exchange(sock, address_of(fwd), b"3") == b"ok 3"  # and the same client again
        assert len(fwd.connections) == 2
        sock.close()
        other.close()
    assert (line["reason"], line["datagrams_in"], line["datagrams_out"]) == ("internal_error", 2, 1)
    assert any("internal error" in r.getMessage() and r.exc_info for r in caplog.records)


@bounded(60)
async def test_kill_ends_a_handler_session() -> None:
    log = AccessLogCapture()
    async with forwarder(config(handler_route(echo_handler)), access_log=log) as fwd:
        sock = client()
        assert await exchange(sock, address_of(fwd), b"k?") == b"k? for 127.0.0.1:%d via u" % sock.getsockname()[1]
        [conn] = fwd.connections.values()
        conn.kill()
        [line] = await log.wait(1)
        assert not fwd.connections
        assert (await exchange(sock, address_of(fwd), b"k2"))[:2] == b"k2"  # a new session
        sock.close()
    assert (line["reason"], line["datagrams_in"], line["datagrams_out"]) == ("killed", 1, 1)


@bounded(60)
async def test_a_handler_queue_is_bounded_and_drops_are_counted() -> None:
    from triofwd._datagrams import INBOX_BYTES, INBOX_MAX

    log = AccessLogCapture()
    go = trio.Event()

    async def slow(session: triofwd.DatagramSession, info: triofwd.HandlerInfo) -> None:
        await session.send(b"ready " + await session.receive())
        await go.wait()  # receives nothing meanwhile: the datagrams queue, then drop
        while True:
            await session.send((await session.receive())[:8])

    async with forwarder(config(handler_route(slow)), access_log=log) as fwd:
        address = address_of(fwd)
        small, big = client(), client()
        assert await exchange(small, address, b"s") == b"ready s"
        assert await exchange(big, address, b"b") == b"ready b"
        for i in range(INBOX_MAX + 10):
            await small.sendto(b"%d" % i, address)
        large = INBOX_BYTES // 32  # 32 of them fill the bytes bound before the count bound
        for i in range(32 + 8):
            await big.sendto(bytes([i]) * large, address)
        await wait_for(lambda: fwd.stats()["routes"]["u"]["udp"]["drops"].get("busy") == 10 + 8)
        rows = {conn.client: conn.describe() for conn in fwd.connections.values()}
        assert rows["%s:%d" % small.getsockname()]["datagrams_in"] == 1 + INBOX_MAX
        assert rows["%s:%d" % big.getsockname()]["datagrams_in"] == 1 + 32
        go.set()
        with trio.fail_after(5):
            assert [await small.recv(100) for _ in range(INBOX_MAX)] == [b"%d" % i for i in range(INBOX_MAX)]  # the first ones, in order
            assert [await big.recv(100) for _ in range(32)] == [bytes([i]) * 8 for i in range(32)]
        assert await nothing_arrives(small)
        small.close()
        big.close()


# -- real DNS: dnsmasq as the target, dig as the client --------------------------------

DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)
DIG = shutil.which("dig")
needs_dns = pytest.mark.skipif(
    DNSMASQ is None or DIG is None, reason="dnsmasq and dig are not installed (Debian: apt-get install dnsmasq bind9-dnsutils; `make system-deps`)"
)
ANSWER = "192.0.2.7"
# The scale the route is meant for: about 5 s here (2 CPUs); fewer for a quick run.
QUERIES = int(os.environ.get("TRIOFWD_UDP_DNS_QUERIES", "10000"))


def free_port_both() -> int:
    """A port free on 127.0.0.1 for UDP and for TCP (dnsmasq listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@contextlib.contextmanager
def dnsmasq(tmp_path: pathlib.Path) -> Any:
    """dnsmasq serving the zone example.test on 127.0.0.1 at a free port, with its own config;
    yields the port; stopped by pid."""
    port = free_port_both()
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(
        "\n".join(
            [
                f"port={port}",
                "listen-address=127.0.0.1",
                "bind-interfaces",
                "no-resolv",
                "no-hosts",
                "no-poll",
                "local=/example.test/",
                f"host-record=www.example.test,{ANSWER}",
                f"pid-file={tmp_path / 'dnsmasq.pid'}",
                "cache-size=0",
                "log-facility=-",
            ]
        )
        + "\n"
    )
    assert DNSMASQ is not None
    logfile = tmp_path / "dnsmasq.log"
    with logfile.open("w") as log:
        process = subprocess.Popen([DNSMASQ, "--keep-in-foreground", f"--conf-file={conf}"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield port, process, logfile
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def dig(port: int, *names: str, batch: pathlib.Path | None = None) -> list[str]:
    assert DIG is not None
    args = [DIG, "@127.0.0.1", "-p", str(port), "+short", "+tries=1", "+time=2"]
    args += ["-f", str(batch)] if batch is not None else list(names)
    done = await trio.run_process(args, capture_stdout=True, check=False)
    return done.stdout.decode().split()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_dns
@bounded(60)
async def test_dns_through_a_udp_route(tmp_path: pathlib.Path) -> None:
    log = AccessLogCapture()
    with dnsmasq(tmp_path) as (port, process, logfile):
        with trio.fail_after(10):
            while await dig(port, "www.example.test") != [ANSWER]:  # dnsmasq is up
                assert process.poll() is None, logfile.read_text()
                await trio.sleep(0.05)
        dns = udp_route("dns", targets=[f"127.0.0.1:{port}"], responses=1)
        async with forwarder(config(dns), access_log=log) as fwd:
            listen = address_of(fwd, "dns")[1]
            # One query: its answer, and the session ends right after it.
            assert await dig(listen, "www.example.test") == [ANSWER]
            [line] = await log.wait(1)
            assert not fwd.connections
            assert (line["reason"], line["datagrams_in"], line["datagrams_out"], line["protocol"]) == ("normal", 1, 1, "udp")
            assert line["duration_ms"] < 1000
            # Many: every answer, nothing left behind.
            fds = open_fds()
            batch = tmp_path / "queries"
            batch.write_text("www.example.test\n" * QUERIES)
            with trio.fail_after(120):
                answers = await dig(listen, batch=batch)
                await wait_for(lambda: len(log.lines) == 1 + QUERIES)
            assert answers == [ANSWER] * QUERIES
            assert not fwd.connections
            assert open_fds() == fds
            reasons = {r["reason"] for r in log.records}
            assert reasons == {"normal"}
            stats = fwd.stats()["routes"]["dns"]
            assert stats["udp"]["datagrams_in"] == stats["udp"]["datagrams_out"] == 1 + QUERIES
