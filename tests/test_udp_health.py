"""Health checks of UDP targets: a datagram out, a reply back, on real UDP sockets.

The real serve() with UDP targets on 127.0.0.1 that a test stops (the port is closed, so
the kernel answers with ICMP port unreachable) and starts again on the same port. A target
answers a check's PING with PONG, and any other datagram with its name, so every test
sees where each session went.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import triofwd
from tests.conftest import AccessLogCapture, config, forwarder, route, run_triofwd, split, wait_for
from triofwd._table import compile_table

CHECKS = triofwd.HealthCheck(interval="50ms", timeout="200ms", rise=2, fall=2, send="PING", expect="PONG")


class UdpTarget:
    """A UDP server on a fixed 127.0.0.1 port: PING gets `pong` (None: no answer at all),
    anything else its name and the datagram; `probes` counts the PINGs."""

    def __init__(self, name: str, pong: bytes | None = b"PONG") -> None:
        self.name = name
        self.pong = pong
        self.port = 0
        self.probes = 0
        self._scope: trio.CancelScope | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._run)

    def stop(self) -> None:
        """Close the socket: a datagram to the port gets ICMP port unreachable from now on."""
        assert self._scope is not None
        self._scope.cancel()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, trio.CancelScope() as self._scope:
            await sock.bind(("127.0.0.1", self.port))
            self.port = sock.getsockname()[1]
            task_status.started()
            while True:
                data, peer = await sock.recvfrom(65536)
                if data == b"PING":
                    self.probes += 1
                    answer = self.pong
                else:
                    answer = self.name.encode() + b":" + data
                if answer is not None:
                    await sock.sendto(answer, peer)


@asynccontextmanager
async def udp_targets(*targets: UdpTarget) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        for target in targets:
            await target.start(nursery)
        yield nursery
        nursery.cancel_scope.cancel()


def udp_route(targets: list[str], **kw: Any) -> triofwd.Route:
    return route("u", protocol="udp", targets=targets, health_check=CHECKS, **kw)


def states(fwd: triofwd.Forwarder) -> dict[str, dict[str, Any]]:
    return {row["target"]: row for row in fwd.target_states()["u"]}


async def sessions(fwd: triofwd.Forwarder, count: int) -> list[bytes]:
    """`count` new sessions (a client socket each), one datagram each: every reply, or b"" for none."""
    address = split(fwd.addresses["u"][0])
    replies = []
    for _ in range(count):
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.connect(address)
            await sock.send(b"hi")
            reply = b""
            with trio.move_on_after(1.0):
                reply = await sock.recv(65536)
            replies.append(reply)
    return replies


async def test_a_udp_target_is_checked_by_datagram_taken_out_on_port_unreachable_and_brought_back() -> None:
    a, b = UdpTarget("a"), UdpTarget("b")
    with trio.fail_after(20):
        async with udp_targets(a, b) as nursery, forwarder(config(udp_route([a.address, b.address]))) as fwd:
            await wait_for(lambda: all(row["last_check"] == "ok" for row in states(fwd).values()))
            assert a.probes >= 1 and b.probes >= 1
            assert set(await sessions(fwd, 8)) == {b"a:hi", b"b:hi"}, "both targets take sessions"
            a.stop()
            await wait_for(lambda: not states(fwd)[a.address]["up"])
            row = states(fwd)[a.address]
            assert row["last_check"] == "connect_refused (ICMP port unreachable)" and not row["usable"]
            assert row["checks_failed"] >= CHECKS.fall
            assert await sessions(fwd, 8) == [b"b:hi"] * 8, "new sessions skip the target that is down"
            await a.start(nursery)  # the same port again
            await wait_for(lambda: states(fwd)[a.address]["up"])
            assert set(await sessions(fwd, 8)) == {b"a:hi", b"b:hi"}, "both targets take sessions"


async def test_a_wrong_reply_or_none_takes_a_udp_target_out_and_sessions_end_at_once() -> None:
    wrong, silent = UdpTarget("wrong", pong=b"NOPE"), UdpTarget("silent", pong=None)
    log = AccessLogCapture()
    with trio.fail_after(20):
        async with udp_targets(wrong, silent), forwarder(config(udp_route([wrong.address, silent.address])), access_log=log) as fwd:
            await wait_for(lambda: not any(row["up"] for row in states(fwd).values()))
            assert states(fwd)[wrong.address]["last_check"] == "no expected reply within 0.2s"
            assert states(fwd)[silent.address]["last_check"] == "no reply within 0.2s"
            probed = wrong.probes + silent.probes
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                await client.sendto(b"hi", split(fwd.addresses["u"][0]))
                [record] = await log.wait(1)
    assert record["reason"] == "target_unreachable" and record["target"] is None
    assert probed >= 2 * CHECKS.fall


def test_a_udp_health_check_needs_send_and_circuit_breaker_stays_refused(tmp_path: Any) -> None:
    no_send = triofwd.HealthCheck(interval="1s")
    with pytest.raises(triofwd.ConfigError) as info:
        compile_table(
            config(
                route("u", protocol="udp", targets=["127.0.0.1:53"], health_check=no_send),
                route("v", protocol="udp", targets=["127.0.0.1:53"], circuit_breaker=triofwd.CircuitBreaker()),
            )
        )
    paths = [line.rpartition(" - at ")[2].strip("`") for line in info.value.errors]
    assert paths == ["$.routes[0].health_check.send", "$.routes[1].circuit_breaker"]
    assert "needs send" in info.value.errors[0]
    [checked] = compile_table(config(udp_route(["127.0.0.1:53"]))).routes
    assert checked.health is not None and checked.health.udp and checked.health.send == b"PING"
    # `triofwd check` says the same, with the path
    path = tmp_path / "routes.toml"
    path.write_text('[[routes]]\nname = "dns"\nports = [5353]\nprotocol = "udp"\ntargets = ["127.0.0.1:53"]\nhealth_check = { interval = "5s" }\n')
    result = run_triofwd("check", str(path))
    assert result.returncode == 1
    assert "`$.routes[0].health_check.send`" in result.stdout + result.stderr
