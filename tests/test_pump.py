"""Timing logic of the relay on in-memory streams with trio's autojump clock: hours pass in microseconds."""

from __future__ import annotations

import logging
import math

import pytest
import trio
import trio.testing

from triofwd._errors import ConnectionEnded
from triofwd._policy import Policy
from triofwd._pump import relay
from triofwd._reasons import Reason
from triofwd._record import Connection

HOUR = 3600.0


def policy(**kw: object) -> Policy:
    values: dict[str, object] = dict(
        connect_timeout=10.0, initial_data_timeout=30.0, inactivity_timeout=HOUR, half_close_timeout=math.inf,
        max_lifetime=math.inf, keepalive="standard", keepalive_multiplier=6, tcp_keepalive=math.inf,
    )  # fmt: skip
    values.update(kw)
    return Policy(**values)  # type: ignore[arg-type]


def connection() -> Connection:
    now = trio.current_time()
    return Connection(id=7, client_ip="127.0.0.1", client_port=1, listener=("127.0.0.1", 0, "r"), started=0.0, opened=now, last_activity=now)


async def run_relay(p: Policy, script, *, expect: Reason | None) -> tuple[Connection, float]:
    """Relay between two memory stream pairs while `script(client, target)` plays the peers.

    Returns the connection and the time the relay ended, measured from its start.
    """
    client_outer, client_inner = trio.testing.memory_stream_pair()
    target_inner, target_outer = trio.testing.memory_stream_pair()
    conn = connection()
    start = trio.current_time()
    ended: list[float] = []

    async def run() -> None:
        try:
            await relay(conn, client_inner, target_inner, p)
        except ConnectionEnded as exc:
            assert exc.reason == expect
        else:
            assert expect is None
        ended.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await script(client_outer, target_outer)
    return conn, ended[0]


async def idle(client: trio.abc.Stream, target: trio.abc.Stream) -> None:
    pass


async def test_standard_inactivity_closes_after_exactly_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    _, at = await run_relay(policy(), idle, expect=Reason.INACTIVITY_TIMEOUT)
    assert at == pytest.approx(HOUR)


async def test_every_byte_moves_the_inactivity_deadline(autojump_clock: trio.abc.Clock) -> None:
    async def chat(client: trio.abc.Stream, target: trio.abc.Stream) -> None:
        await trio.sleep(0.75 * HOUR)
        await client.send_all(b"up")
        assert await target.receive_some() == b"up"
        await trio.sleep(0.75 * HOUR)
        await target.send_all(b"down!")
        assert await client.receive_some() == b"down!"

    conn, at = await run_relay(policy(), chat, expect=Reason.INACTIVITY_TIMEOUT)
    assert at == pytest.approx(2.5 * HOUR)
    assert (conn.bytes_in, conn.bytes_out) == (2, 5)


async def test_extended_keepalive_warns_once_then_grants_one_grace_period(autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="triofwd"):
        _, at = await run_relay(policy(keepalive="extended"), idle, expect=Reason.INACTIVITY_TIMEOUT)
    assert at == pytest.approx(7 * HOUR)  # 1h x 6, then one more hour of grace
    warnings = [r for r in caplog.records if "keepalive extended" in r.getMessage()]
    assert len(warnings) == 1
    assert "connection 7 idle for 21600s" in warnings[0].getMessage()


async def test_extended_keepalive_traffic_before_the_warning_means_no_warning(autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture) -> None:
    async def then_close(client: trio.abc.HalfCloseableStream, target: trio.abc.HalfCloseableStream) -> None:
        await trio.sleep(5 * HOUR)
        await client.send_eof()
        await target.send_eof()

    with caplog.at_level(logging.WARNING, logger="triofwd"):
        _, at = await run_relay(policy(keepalive="extended"), then_close, expect=None)
    assert at == pytest.approx(5 * HOUR)
    assert not [r for r in caplog.records if "keepalive extended" in r.getMessage()]


async def test_immortal_has_no_inactivity_limit(autojump_clock: trio.abc.Clock) -> None:
    async def a_month_later(client: trio.abc.HalfCloseableStream, target: trio.abc.HalfCloseableStream) -> None:
        await trio.sleep(30 * 24 * HOUR)
        await client.send_eof()
        await target.send_eof()

    _, at = await run_relay(policy(keepalive="immortal"), a_month_later, expect=None)
    assert at == pytest.approx(30 * 24 * HOUR)


async def test_half_close_timeout_starts_at_the_first_eof(autojump_clock: trio.abc.Clock) -> None:
    async def client_done(client: trio.abc.HalfCloseableStream, target: trio.abc.HalfCloseableStream) -> None:
        await trio.sleep(10)
        await client.send_eof()
        assert await target.receive_some() == b""  # the EOF was passed on

    _, at = await run_relay(policy(half_close_timeout=30.0), client_done, expect=Reason.HALF_CLOSE_TIMEOUT)
    assert at == pytest.approx(40)


async def test_without_half_close_timeout_inactivity_governs_a_half_open_connection(autojump_clock: trio.abc.Clock) -> None:
    async def client_done(client: trio.abc.HalfCloseableStream, target: trio.abc.HalfCloseableStream) -> None:
        await trio.sleep(10)
        await client.send_eof()

    _, at = await run_relay(policy(), client_done, expect=Reason.INACTIVITY_TIMEOUT)
    assert at == pytest.approx(10 + HOUR)


async def test_both_eofs_end_the_relay_normally(autojump_clock: trio.abc.Clock) -> None:
    async def both(client: trio.abc.HalfCloseableStream, target: trio.abc.HalfCloseableStream) -> None:
        await client.send_all(b"q")
        await client.send_eof()
        assert await target.receive_some() == b"q"
        assert await target.receive_some() == b""
        await target.send_all(b"answer")
        await target.send_eof()
        assert await client.receive_some() == b"answer"

    conn, at = await run_relay(policy(), both, expect=None)
    assert (conn.bytes_in, conn.bytes_out, at) == (1, 6, 0)


@pytest.mark.parametrize("keepalive", ["standard", "extended"])
def test_a_quiet_limit_that_came_has_passed_whatever_the_float_rounding(keepalive: str) -> None:
    """0.7 + 0.1 <= now while now - 0.7 < 0.1: the deadline the watch gives has come, so it
    must say the limit passed (else the engine's timers re-arm it at the same moment, for
    ever: a hang the feature matrix found)."""
    from triofwd._idle import IdleWatch

    conn = Connection(id=7, client_ip="127.0.0.1", client_port=1, listener=("127.0.0.1", 0, "r"), started=0.0, opened=0.0, last_activity=0.7)
    p = policy(inactivity_timeout=0.1, keepalive=keepalive, keepalive_multiplier=1)
    watch = IdleWatch(conn, p)
    now = watch.deadline()
    assert now - 0.7 < 0.1  # the rounding this is about
    if keepalive == "extended":
        assert watch.passed(now) is None  # the warning, then the grace period
        now = watch.deadline()
        assert watch.passed(now) is Reason.INACTIVITY_TIMEOUT
    else:
        assert watch.passed(now) is Reason.INACTIVITY_TIMEOUT
