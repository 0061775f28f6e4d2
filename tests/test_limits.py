"""Connection limits: capacity, per-IP count, per-IP rate (token bucket), with an explicit clock."""

from __future__ import annotations

import contextlib

import pytest

from triofwd._errors import ConnectionEnded
from triofwd._limits import SWEEP_AT, Gate, Limits, RateLimiter
from triofwd._reasons import Reason


def refused(gate: Gate, ip: str, now: float = 0.0) -> Reason:
    with pytest.raises(ConnectionEnded) as info:
        with gate.admitted(ip, now):
            pytest.fail("admitted")  # pragma: no cover
    return info.value.reason


def admit_once(gate: Gate, ip: str, now: float = 0.0) -> None:
    with gate.admitted(ip, now):
        pass


# -- counts ---------------------------------------------------------------------------


def test_no_limits_admits_everything() -> None:
    gate = Gate(Limits())
    with contextlib.ExitStack() as stack:
        for _ in range(1000):
            stack.enter_context(gate.admitted("10.0.0.1", 0.0))
        assert gate.active == 1000
        assert gate.per_ip["10.0.0.1"] == 1000
    assert gate.active == 0
    assert gate.rate is None


def test_capacity() -> None:
    gate = Gate(Limits(max_connections=2))
    with gate.admitted("10.0.0.1", 0.0), gate.admitted("10.0.0.2", 0.0):
        assert gate.active == 2
        assert refused(gate, "10.0.0.3") is Reason.CAPACITY
        assert gate.active == 2  # a refusal holds nothing
    assert gate.active == 0
    admit_once(gate, "10.0.0.3")  # room again


def test_per_ip_limit() -> None:
    gate = Gate(Limits(max_connections_per_ip=2))
    with gate.admitted("10.0.0.1", 0.0), gate.admitted("10.0.0.1", 0.0):
        assert refused(gate, "10.0.0.1") is Reason.IP_LIMIT
        admit_once(gate, "10.0.0.2")  # another address is not affected
        assert gate.per_ip == {"10.0.0.1": 2}
    assert gate.per_ip == {}  # no zero entries left behind
    admit_once(gate, "10.0.0.1")


def test_capacity_is_checked_before_per_ip() -> None:
    gate = Gate(Limits(max_connections=1, max_connections_per_ip=1))
    with gate.admitted("10.0.0.1", 0.0):
        assert refused(gate, "10.0.0.1") is Reason.CAPACITY


def test_released_when_the_body_raises() -> None:
    gate = Gate(Limits(max_connections=1, max_connections_per_ip=1))
    with pytest.raises(RuntimeError):
        with gate.admitted("10.0.0.1", 0.0):
            assert gate.active == 1
            raise RuntimeError("boom")
    assert gate.active == 0
    assert gate.per_ip == {}
    with pytest.raises(ConnectionEnded):  # even a ConnectionEnded from inside the body
        with gate.admitted("10.0.0.1", 0.0):
            raise ConnectionEnded(Reason.TARGET_RESET)
    assert gate.active == 0
    admit_once(gate, "10.0.0.1")


def test_released_on_base_exception() -> None:
    gate = Gate(Limits(max_connections=1))
    with pytest.raises(KeyboardInterrupt):
        with gate.admitted("10.0.0.1", 0.0):
            raise KeyboardInterrupt
    assert gate.active == 0


# -- rate -----------------------------------------------------------------------------


def test_rate_bucket_refills_over_time() -> None:
    gate = Gate(Limits(connection_rate_per_ip=(3, 1.0)))
    for _ in range(3):
        admit_once(gate, "10.0.0.1", 0.0)
    assert refused(gate, "10.0.0.1", 0.0) is Reason.RATE_LIMITED
    assert refused(gate, "10.0.0.1", 0.2) is Reason.RATE_LIMITED  # 0.6 of a token
    admit_once(gate, "10.0.0.1", 0.34)  # one token back after 1/3 s
    assert refused(gate, "10.0.0.1", 0.35) is Reason.RATE_LIMITED
    for _ in range(3):  # long idle: full again, but never more than the burst
        admit_once(gate, "10.0.0.1", 100.0)
    assert refused(gate, "10.0.0.1", 100.0) is Reason.RATE_LIMITED


def test_rate_is_per_ip() -> None:
    gate = Gate(Limits(connection_rate_per_ip=(1, 60.0)))
    admit_once(gate, "10.0.0.1", 0.0)
    assert refused(gate, "10.0.0.1", 1.0) is Reason.RATE_LIMITED
    admit_once(gate, "10.0.0.2", 1.0)
    admit_once(gate, "10.0.0.1", 60.0)


def test_rate_counts_new_connections_not_concurrent_ones() -> None:
    gate = Gate(Limits(connection_rate_per_ip=(2, 10.0)))
    admit_once(gate, "10.0.0.1", 0.0)
    admit_once(gate, "10.0.0.1", 0.0)  # the first one has ended; still a second token used
    assert refused(gate, "10.0.0.1", 0.0) is Reason.RATE_LIMITED


def test_count_refusal_does_not_use_a_rate_token() -> None:
    gate = Gate(Limits(max_connections_per_ip=1, connection_rate_per_ip=(2, 60.0)))
    with gate.admitted("10.0.0.1", 0.0):
        for _ in range(5):
            assert refused(gate, "10.0.0.1", 0.0) is Reason.IP_LIMIT
    admit_once(gate, "10.0.0.1", 0.0)  # the second token is still there
    assert refused(gate, "10.0.0.1", 0.0) is Reason.RATE_LIMITED


def test_rate_refusal_holds_nothing() -> None:
    gate = Gate(Limits(connection_rate_per_ip=(1, 60.0)))
    admit_once(gate, "10.0.0.1", 0.0)
    assert refused(gate, "10.0.0.1", 0.0) is Reason.RATE_LIMITED
    assert gate.active == 0
    assert gate.per_ip == {}


def test_rate_limiter_directly() -> None:
    rl = RateLimiter(300, 60.0)  # 5 per second, burst 300
    assert rl.capacity == 300.0
    assert rl.per_second == 5.0
    assert all(rl.allow("k", 0.0) for _ in range(300))
    assert not rl.allow("k", 0.0)
    assert not rl.allow("k", 0.19)
    assert rl.allow("k", 0.2)
    assert len(rl) == 1


def test_refused_attempts_do_not_push_the_refill_back() -> None:
    rl = RateLimiter(1, 1.0)
    assert rl.allow("k", 0.0)
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        assert not rl.allow("k", t)
    assert rl.allow("k", 1.0)


def test_sweep_keeps_the_bucket_map_bounded() -> None:
    rl = RateLimiter(10, 1.0)  # one token back every 0.1 s
    now = 0.0
    for i in range(3 * SWEEP_AT):
        now += 0.2  # every earlier bucket is full again by the next insert
        assert rl.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now)
        assert len(rl) <= SWEEP_AT
    assert len(rl) < SWEEP_AT


def test_sweep_keeps_buckets_that_still_matter() -> None:
    rl = RateLimiter(2, 1000.0)  # slow refill: a used bucket stays non-full
    assert rl.allow("hot", 0.0)
    assert rl.allow("hot", 0.0)
    for i in range(SWEEP_AT + 10):
        rl.allow(f"cold{i}", 1.0 + i * 1e-6)
    assert not rl.allow("hot", 2.0)  # still remembered as empty after the sweeps


# -- update ---------------------------------------------------------------------------


def test_update_keeps_counts() -> None:
    gate = Gate(Limits(max_connections=10))
    with gate.admitted("10.0.0.1", 0.0), gate.admitted("10.0.0.1", 0.0):
        gate.update(Limits(max_connections=2, max_connections_per_ip=1))
        assert gate.active == 2
        assert gate.per_ip["10.0.0.1"] == 2
        assert refused(gate, "10.0.0.2") is Reason.CAPACITY
    assert gate.active == 0
    assert gate.per_ip == {}
    admit_once(gate, "10.0.0.2")


def test_update_lower_per_ip() -> None:
    gate = Gate(Limits())
    with gate.admitted("10.0.0.1", 0.0):
        gate.update(Limits(max_connections_per_ip=1))
        assert refused(gate, "10.0.0.1") is Reason.IP_LIMIT
        admit_once(gate, "10.0.0.2")


def test_update_rate_on_off_and_same() -> None:
    gate = Gate(Limits())
    gate.update(Limits(connection_rate_per_ip=(1, 60.0)))
    admit_once(gate, "10.0.0.1", 0.0)
    assert refused(gate, "10.0.0.1", 0.0) is Reason.RATE_LIMITED
    limiter = gate.rate
    gate.update(Limits(max_connections=5, connection_rate_per_ip=(1, 60.0)))  # same rate: buckets kept
    assert gate.rate is limiter
    assert refused(gate, "10.0.0.1", 0.0) is Reason.RATE_LIMITED
    gate.update(Limits())
    assert gate.rate is None
    admit_once(gate, "10.0.0.1", 0.0)
    assert gate.limits == Limits()


def test_sweep_work_is_amortized_when_nothing_can_be_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    import triofwd._limits as limits_module

    monkeypatch.setattr(limits_module, "SWEEP_AT", 64)
    work = [0]
    sweep = RateLimiter._sweep

    def counting_sweep(self: RateLimiter, now: float) -> None:
        work[0] += len(self)
        sweep(self, now)

    monkeypatch.setattr(RateLimiter, "_sweep", counting_sweep)
    rl = RateLimiter(300, 3600.0)  # "300/hour": a used bucket takes 12 s to be full again
    n = 2000
    for i in range(n):
        assert rl.allow(f"k{i}", i * 1e-4)  # 10 000 new addresses per second
    assert work[0] <= 10 * n  # amortized O(1) per new connection (now about 2 000 000)
