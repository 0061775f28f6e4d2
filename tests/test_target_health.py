"""Targets that die, come back, flap and black-hole; the circuit's back-off; warm sockets.

The real serve() with real targets on 127.0.0.1. Targets answer with their own name, so
every test sees where each connection went.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import triofwd
from tests.conftest import (
    AccessLogCapture,
    backend,
    black_hole,
    config,
    connect,
    forwarder,
    free_port,
    receive_all,
    refused_address,
    route,
    rst_close,
    wait_for,
)
from tests.test_inspect import inspector
from tests.test_metrics import parse_exposition, value

FAST_CHECKS = triofwd.HealthCheck(interval="50ms", timeout="200ms", rise=2, fall=2)


class Target:
    """A target on a fixed 127.0.0.1 port that a test can stop and start again.

    It answers each connection with its name once the client has sent something, then
    closes. `mute` accepts and never answers (a black hole above TCP).
    """

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.accepted: list[float] = []  # trio clock, one per accepted connection
        self.served: list[float] = []  # when each answered connection was accepted
        self.mute = False
        self.hung_up = 0  # idle connections closed by hang_up_idle()
        self.abandoned = 0  # connections the client closed without sending anything
        self._idle: set[trio.CancelScope] = set()
        self._scope: trio.CancelScope | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hang_up_idle(self) -> None:
        """Close every connection that has not sent anything yet (as a server's idle timeout does)."""
        for scope in self._idle:
            scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        accepted = trio.current_time()
        self.accepted.append(accepted)
        async with stream:
            if self.mute:
                await trio.sleep_forever()
            with trio.CancelScope() as idle:
                self._idle.add(idle)
                try:
                    data = await stream.receive_some()
                finally:
                    self._idle.discard(idle)
            if idle.cancelled_caught:
                self.hung_up += 1
                return
            if not data:
                self.abandoned += 1
                return
            with contextlib.suppress(trio.BrokenResourceError):
                self.served.append(accepted)
                await stream.send_all(self.name.encode())

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, self.port, host="127.0.0.1"))
                self.port = listeners[0].socket.getsockname()[1]
                task_status.started()

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._run)

    def stop(self) -> None:
        """Close the listener and every connection: connects are refused from now on."""
        assert self._scope is not None
        self._scope.cancel()


async def ask(fwd: triofwd.Forwarder, name: str = "r") -> bytes:
    """One client: connect, send, everything the target answers."""
    async with await connect(fwd, name) as client:
        await client.send_all(b"hi")
        return await receive_all(client)


def states(fwd: triofwd.Forwarder, name: str = "r") -> dict[str, dict[str, Any]]:
    return {row["target"]: row for row in fwd.target_states()[name]}


@contextlib.asynccontextmanager
async def targets(*names: str) -> AsyncIterator[tuple[trio.Nursery, list[Target]]]:
    async with trio.open_nursery() as nursery:
        started = [Target(n) for n in names]
        for t in started:
            await t.start(nursery)
        yield nursery, started
        nursery.cancel_scope.cancel()


async def test_a_dead_target_is_taken_out_and_comes_back_after_rise_passes() -> None:
    log = AccessLogCapture()
    with trio.fail_after(20):
        async with targets("a", "b") as (nursery, (a, b)):
            cfg = config(route(targets=[a.address, b.address], health_check=FAST_CHECKS, connect_retries=0))
            async with forwarder(cfg, access_log=log) as fwd:
                assert sorted([await ask(fwd) for _ in range(4)]) == [b"a", b"a", b"b", b"b"]
                for _ in range(2):  # it flaps: down, up, down, up
                    a.stop()
                    await wait_for(lambda: not states(fwd)[a.address]["up"])
                    row = states(fwd)[a.address]
                    assert row["last_check"] == "connect_refused" and not row["usable"]
                    # Taken out: every client goes to b, none is sent to a and refused.
                    assert [await ask(fwd) for _ in range(6)] == [b"b"] * 6
                    await a.start(nursery)  # the same port again
                    checks = states(fwd)[a.address]["checks_passed"]
                    await wait_for(lambda: states(fwd)[a.address]["up"])
                    assert states(fwd)[a.address]["checks_passed"] - checks >= FAST_CHECKS.rise
                    assert sorted([await ask(fwd) for _ in range(4)]) == [b"a", b"a", b"b", b"b"]
                records = await log.wait(4 + 2 * (6 + 4))
    assert {r["reason"] for r in records} == {"normal"}  # no client ever met a dead target


async def test_when_every_target_is_down_clients_end_at_once_with_target_unreachable() -> None:
    log = AccessLogCapture()
    checks = triofwd.HealthCheck(interval="50ms", timeout="100ms", rise=1, fall=1)
    with trio.fail_after(20), black_hole() as hole:
        async with forwarder(config(route(targets=[hole], health_check=checks, connect_timeout="30s")), access_log=log) as fwd:
            await wait_for(lambda: not states(fwd)[hole]["up"])
            assert states(fwd)[hole]["last_check"] == "connect_timeout"
            began = trio.current_time()
            assert await ask(fwd) == b""
            waited = trio.current_time() - began
    [record] = log.records
    assert record["reason"] == "target_unreachable" and record["target"] is None
    assert waited < 5, f"the client waited {waited:.1f}s on a target known to be down (connect_timeout 30s)"


async def test_a_protocol_check_takes_out_a_target_that_accepts_but_never_answers() -> None:
    checks = triofwd.HealthCheck(interval="50ms", timeout="100ms", rise=1, fall=2, send="PING\r\n", expect="pong")
    with trio.fail_after(20):
        async with targets("pong", "mute") as (_, (good, mute)):
            mute.mute = True
            async with forwarder(config(route(targets=[good.address, mute.address], health_check=checks, connect_retries=0))) as fwd:
                await wait_for(lambda: not states(fwd)[mute.address]["up"])
                row = states(fwd)
                assert row[mute.address]["last_check"] == "no reply within 0.1s"
                assert row[good.address]["up"] and row[good.address]["last_check"] == "ok"
                assert [await ask(fwd) for _ in range(4)] == [b"pong"] * 4


async def test_the_circuit_opens_its_backoff_doubles_to_the_cap_and_resets_when_the_probe_connects() -> None:
    log = AccessLogCapture()
    port = free_port()
    address = f"127.0.0.1:{port}"
    breaker = triofwd.CircuitBreaker(failures=2, backoff="100ms", max_backoff="400ms")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with forwarder(config(route(targets=[address], circuit_breaker=breaker, connect_retries=0)), access_log=log) as fwd:
                assert [await ask(fwd) for _ in range(2)] == [b"", b""]
                row = states(fwd)[address]
                assert (row["circuit"], row["backoff_s"], row["failures_total"]) == ("open", 0.1, 2)
                assert await ask(fwd) == b""  # open: ended at once, the target is not even tried
                assert states(fwd)[address]["failures_total"] == 2
                backoffs = []
                for _ in range(3):
                    await wait_for(lambda: states(fwd)[address]["usable"])
                    assert await ask(fwd) == b""  # the half-open probe, refused again
                    backoffs.append(states(fwd)[address]["backoff_s"])
                assert backoffs == [0.2, 0.4, 0.4]
                target = Target("back", port)
                await target.start(nursery)
                await wait_for(lambda: states(fwd)[address]["usable"])
                assert await ask(fwd) == b"back"  # the probe connects: closed again
                row = states(fwd)[address]
                assert (row["circuit"], row["backoff_s"], row["consecutive_failures"], row["circuit_opens_total"]) == ("closed", 0.0, 0, 4)
                assert [await ask(fwd) for _ in range(3)] == [b"back"] * 3
                records = await log.wait(10)
            nursery.cancel_scope.cancel()
    reasons = [r["reason"] for r in records]
    assert reasons == ["connect_refused"] * 2 + ["target_unreachable"] + ["connect_refused"] * 3 + ["normal"] * 4


async def test_a_target_that_resets_connections_opens_its_circuit() -> None:
    async def resets(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        rst_close(stream)

    log = AccessLogCapture()
    breaker = triofwd.CircuitBreaker(failures=3, backoff="1m")
    with trio.fail_after(20):
        async with backend(resets) as bad, targets("good") as (_, (good,)):
            cfg = config(route(targets=[bad, good.address], circuit_breaker=breaker, balance="first", connect_retries=0))
            async with forwarder(cfg, access_log=log) as fwd:
                for _ in range(3):
                    await ask(fwd)
                assert states(fwd)[bad]["circuit"] == "open"
                assert [await ask(fwd) for _ in range(3)] == [b"good"] * 3
                records = await log.wait(6)
    assert [r["reason"] for r in records] == ["target_reset"] * 3 + ["normal"] * 3


async def test_warm_sockets_are_used_refilled_and_replaced_when_the_target_closes_them() -> None:
    with trio.fail_after(20):
        async with targets("warm") as (_, (target,)):
            async with forwarder(config(route(targets=[target.address], warm=2))) as fwd:
                await wait_for(lambda: states(fwd)[target.address]["warm"] == 2)
                assert len(target.accepted) == 2
                client_connects = trio.current_time()
                assert await ask(fwd) == b"warm"
                assert target.served[-1] < client_connects  # its target socket was connected before the client came
                await wait_for(lambda: states(fwd)[target.address]["warm"] == 2)  # refilled
                assert len(target.accepted) == 3
                target.hang_up_idle()  # the target closes the two pooled sockets
                await wait_for(lambda: target.hung_up == 2)
                await wait_for(lambda: len(target.accepted) == 5 and states(fwd)[target.address]["warm"] == 2)  # replaced
            await wait_for(lambda: target.abandoned == 2)  # the forwarder stopped: its warm sockets closed


async def test_a_warm_socket_the_target_closed_is_never_handed_to_a_client() -> None:
    log = AccessLogCapture()
    with trio.fail_after(20):
        async with targets("fresh") as (_, (target,)):
            async with forwarder(config(route(targets=[target.address], warm=3)), access_log=log) as fwd:
                await wait_for(lambda: states(fwd)[target.address]["warm"] == 3)
                target.hang_up_idle()
                await wait_for(lambda: target.hung_up == 3)
                # The forwarder has not swept its pool yet; each client's socket is checked as it is taken.
                answers = [await ask(fwd) for _ in range(5)]
                records = await log.wait(5)
    assert answers == [b"fresh"] * 5
    assert [r["reason"] for r in records] == ["normal"] * 5


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


async def test_warm_sockets_cut_the_connect_to_first_byte_time(capsys: pytest.CaptureFixture[str]) -> None:
    """Targets by name: a fresh connect resolves the name and connects; a warm socket has done both."""
    log = AccessLogCapture()
    rounds = 40
    with trio.fail_after(30):
        async with targets("t") as (_, (target,)):
            by_name = f"localhost:{target.port}"
            cfg = config(route("cold", targets=[by_name]), route("warm", targets=[by_name], warm=4))
            async with forwarder(cfg, access_log=log) as fwd:
                await wait_for(lambda: states(fwd, "warm")[by_name]["warm"] == 4)
                first_byte: dict[str, list[float]] = {"cold": [], "warm": []}
                for _ in range(rounds):
                    for name in ("cold", "warm"):
                        began = time.perf_counter()
                        async with await connect(fwd, name) as client:
                            await client.send_all(b"hi")
                            assert await client.receive_some() == b"t"
                            first_byte[name].append(time.perf_counter() - began)
                        await wait_for(lambda: states(fwd, "warm")[by_name]["warm"] == 4)
                records = await log.wait(2 * rounds)
    connect_ms = {name: median_ms([r["connect_ms"] / 1000 for r in records if r["route"] == name]) for name in ("cold", "warm")}
    with capsys.disabled():
        print(f"\nconnect-to-first-byte median over {rounds}: cold {median_ms(first_byte['cold'])} ms, warm {median_ms(first_byte['warm'])} ms;"
              f" forwarder's connect time median: cold {connect_ms['cold']} ms, warm {connect_ms['warm']} ms")  # fmt: skip
    # The client's own time to first byte is reported, not asserted: on a shared machine its
    # noise (scheduling of four processes' worth of work) can exceed the connect it saves.
    assert connect_ms["warm"] < connect_ms["cold"]


async def test_reload_keeps_the_state_of_targets_that_did_not_change() -> None:
    # The checks send a byte, so a target tells them from warm sockets (which a client has not used yet).
    checks = triofwd.HealthCheck(interval="50ms", timeout="200ms", rise=2, fall=2, send="?")
    with trio.fail_after(20):
        async with targets("a", "b", "c") as (_, (a, b, c)):
            a.stop()
            cfg = config(route(targets=[a.address, b.address], health_check=checks, warm=1))
            async with forwarder(cfg) as fwd:
                await wait_for(lambda: not states(fwd)[a.address]["up"] and states(fwd)[b.address]["warm"] == 1)
                before = states(fwd)
                kept = fwd._context.targets.get("r")
                pooled = kept.targets[1].warm[0][1]
                await fwd.reload(cfg)  # nothing changed: the same state, nothing restarted
                assert fwd._context.targets.get("r") is kept
                await fwd.reload(config(route(targets=[a.address, b.address, c.address], health_check=checks, warm=1)))
                after = states(fwd)
                assert fwd._context.targets.get("r") is not kept
                assert not after[a.address]["up"] and after[a.address]["checks_failed"] >= before[a.address]["checks_failed"]
                assert fwd._context.targets.get("r").targets[1].warm[0][1] is pooled  # b's warm socket carried over, not reconnected
                assert after[c.address]["up"] and after[c.address]["checks_failed"] == 0
                await wait_for(lambda: states(fwd)[c.address]["warm"] == 1)
                assert b.abandoned == c.abandoned == 0
                await fwd.reload(config(route(targets=[c.address])))  # a and b gone: b's warm socket is closed
                assert list(states(fwd)) == [c.address] and not fwd._context.targets.get("r").watched
                await wait_for(lambda: b.abandoned == 1)
            await wait_for(lambda: c.abandoned == 1)  # c's, when the forwarder stopped


async def test_targets_show_in_routes_stats_metrics_and_the_inspector(tmp_path: Any) -> None:
    with trio.fail_after(20), refused_address() as hole:
        async with targets("a") as (_, (a,)):
            cfg = config(route(targets=[a.address, hole], health_check=FAST_CHECKS, circuit_breaker=triofwd.CircuitBreaker(), warm=1))
            async with forwarder(cfg) as fwd, trio.open_nursery() as nursery:
                path = await nursery.start(triofwd.serve_control, fwd, tmp_path / "c.sock")
                await wait_for(lambda: not states(fwd)[hole]["up"] and states(fwd)[a.address]["warm"] == 1)
                async with triofwd.open_control(path) as control:
                    [r] = await control.request("routes")
                    stats = await control.request("stats")
                    metrics = await control.request("metrics")
                nursery.cancel_scope.cancel()
    assert [(t["target"], t["up"], t["warm"]) for t in r["target_state"]] == [(a.address, True, 1), (hole, False, 0)]
    assert [t["target"] for t in stats["targets"]["r"]] == [a.address, hole]
    fams = parse_exposition(metrics)  # strictly: grammar, one TYPE per family, no duplicate series
    assert value(fams, "triofwd_target_up", route="r", target=a.address) == 1
    assert value(fams, "triofwd_target_up", route="r", target=hole) == 0
    assert [value(fams, "triofwd_target_circuit_state", route="r", target=hole, state=c) for c in ("closed", "open", "half-open")] == [1, 0, 0]
    assert value(fams, "triofwd_target_warm_connections", route="r", target=a.address) == 1
    assert value(fams, "triofwd_target_checks_total", route="r", target=hole, result="failed") >= 2
    # The warm pool tried the hole (refused) before the second failed check took it out.
    assert value(fams, "triofwd_target_failures_total", route="r", target=hole) >= 1
    lines = inspector.format_routes([r])
    assert lines[-3].split() == ["ROUTE", "TARGET", "HEALTH", "CIRCUIT", "ACTIVE", "WARM", "FAILURES", "LAST", "CHECK"]
    assert lines[-2].split() == ["r", a.address, "up", "closed", "0", "1", "0", "ok"]
    # (the hole's failures count the warm pool's refused connects, made until the checks took it out)
    assert lines[-1].split()[:6] + lines[-1].split()[7:] == ["r", hole, "DOWN", "closed", "0", "0", "connect_refused"]


async def test_a_health_check_that_finds_us_out_of_fds_gives_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE here says nothing about the target: it must not be taken out for it."""
    import triofwd._targets as targets_module

    probes = 0

    async def out_of_fds(address: Any, policy: Any) -> str:
        nonlocal probes
        probes += 1
        return "capacity"

    monkeypatch.setattr(targets_module, "probe", out_of_fds)
    with trio.fail_after(10):
        async with targets("a") as (_, (a,)):
            async with forwarder(config(route(targets=[a.address], health_check=FAST_CHECKS))) as fwd:
                await wait_for(lambda: probes >= 2 * FAST_CHECKS.fall)  # enough to have taken it out
                row = states(fwd)[a.address]
    assert row["up"] and row["checks_failed"] == 0 and row["checks_passed"] == 0


async def test_a_reload_to_fewer_warm_sockets_closes_the_extra_ones() -> None:
    with trio.fail_after(10):
        async with targets("w") as (_, (w,)):
            async with forwarder(config(route(targets=[w.address], warm=3))) as fwd:
                await wait_for(lambda: states(fwd)[w.address]["warm"] == 3)
                await fwd.reload(config(route(targets=[w.address], warm=1)))
                assert states(fwd)[w.address]["warm"] == 1
                await wait_for(lambda: w.abandoned == 2)  # the target saw two of them closed
                await fwd.reload(config(route(targets=[w.address])))
                assert states(fwd)[w.address]["warm"] == 0
                await wait_for(lambda: w.abandoned == 3)
