"""A target's health state machine, on a fake clock: rise/fall, the circuit, its back-off."""

from __future__ import annotations

import random

from triofwd._balance import Balancer
from triofwd._health import JITTER, Attempt, CheckPolicy, Circuit, CircuitPolicy, TargetHealth

CHECKS = CheckPolicy(interval=1.0, timeout=0.5, rise=2, fall=3)
BREAKER = CircuitPolicy(failures=3, backoff=1.0, max_backoff=8.0)


def test_fall_failed_checks_in_a_row_take_a_target_down_and_rise_passes_bring_it_back() -> None:
    h = TargetHealth()
    assert h.up and h.usable(0)
    assert [h.check_failed(CHECKS, "connect_refused") for _ in range(2)] == [False, False]
    assert h.check_passed(CHECKS) is False  # a pass in between starts the count again
    assert [h.check_failed(CHECKS, "connect_refused") for _ in range(3)] == [False, False, True]
    assert not h.up and not h.usable(0) and h.last_check == "connect_refused"
    assert h.check_passed(CHECKS) is False
    assert h.check_failed(CHECKS, "connect_timeout") is False  # a failure while down resets the passes
    assert [h.check_passed(CHECKS) for _ in range(2)] == [False, True]
    assert h.up and h.usable(0) and h.last_check == "ok"
    assert (h.checks_passed, h.checks_failed) == (4, 6)


def test_without_a_breaker_failures_are_counted_but_nothing_opens() -> None:
    h = TargetHealth()
    for t in range(10):
        assert h.begin(t) is Attempt.NORMAL
        h.failed(t)
    assert h.circuit is Circuit.CLOSED and h.failures_total == 10 and h.usable(10)


def test_the_circuit_opens_after_failures_in_a_row_and_a_success_resets_the_count() -> None:
    h = TargetHealth(BREAKER, random.Random(1))
    h.failed(0)
    h.failed(0)
    h.succeeded()  # a connection that ended well: the run of failures is broken
    h.failed(0)
    h.failed(0)
    assert h.circuit is Circuit.CLOSED
    h.failed(10.0)
    assert h.circuit is Circuit.OPEN and h.backoff == 1.0 and h.opens_total == 1
    assert 11.0 <= h.open_until <= 11.0 + JITTER
    assert not h.usable(10.5) and h.begin(10.5) is None


def test_half_open_lets_exactly_one_probe_through_and_its_failure_doubles_the_backoff() -> None:
    h = TargetHealth(BREAKER, random.Random(2))
    for _ in range(3):
        h.failed(0.0)
    backoffs = [h.backoff]
    now = 0.0
    for _ in range(5):
        now = h.open_until
        probe = h.begin(now)
        assert probe is Attempt.PROBE and h.circuit is Circuit.HALF_OPEN
        assert h.begin(now) is None and not h.usable(now)  # one probe at a time
        h.failed(now, probe)
        assert h.circuit is Circuit.OPEN
        assert h.backoff <= h.open_until - now <= h.backoff * (1 + JITTER)
        backoffs.append(h.backoff)
    assert backoffs == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # doubled, up to max_backoff
    probe = h.begin(h.open_until)
    h.connected(probe)
    assert h.circuit is Circuit.CLOSED and h.backoff == 0.0 and h.consecutive_failures == 0
    for _ in range(3):
        h.failed(100.0)
    assert h.backoff == 1.0  # the next opening starts from the beginning again


def test_only_the_probe_decides_a_half_open_circuit() -> None:
    h = TargetHealth(BREAKER, random.Random(3))
    for _ in range(3):
        h.failed(0.0)
    probe = h.begin(h.open_until)
    h.failed(h.open_until, Attempt.NORMAL)  # an older connection's reset arrives meanwhile
    h.connected(Attempt.NORMAL)
    assert h.circuit is Circuit.HALF_OPEN and h.probing
    h.abandoned(probe)  # the probing client went away before the connect finished
    assert h.circuit is Circuit.HALF_OPEN and not h.probing
    assert h.begin(h.open_until) is Attempt.PROBE  # so the next connection probes


def test_a_target_taken_down_by_checks_is_not_usable_whatever_its_circuit() -> None:
    h = TargetHealth(BREAKER)
    for _ in range(3):
        h.check_failed(CHECKS, "connect_refused")
    assert h.circuit is Circuit.CLOSED and h.begin(0) is None


def test_describe_shows_the_state_in_words() -> None:
    h = TargetHealth(BREAKER, random.Random(4))
    for _ in range(3):
        h.failed(0.0)
    row = h.describe(0.5)
    assert row["circuit"] == "open" and row["usable"] is False and row["failures_total"] == 3
    assert row["backoff_s"] == 1.0 and 0.5 <= row["retry_in_s"] <= 0.5 + JITTER


def test_the_balancer_skips_targets_that_are_not_usable_and_spreads_their_share() -> None:
    b = Balancer([("a", 1), ("b", 1), ("c", 1)], "round-robin")
    picks = [b.order(1, usable=[0, 2])[0] for _ in range(6)]
    assert picks == [0, 2, 0, 2, 0, 2]
    assert b.order(4, usable=[1]) == [1, 1, 1, 1]
    assert b.order(3, usable=[]) == []
    lc = Balancer([("a", 1), ("b", 1), ("c", 1)], "least-connections")
    with lc.hold(2):
        assert lc.order(2, usable=[1, 2]) == [1, 2]


def test_a_reload_that_drops_a_policy_forgets_the_state_it_made() -> None:
    h = TargetHealth(BREAKER, random.Random(5))
    for _ in range(3):
        h.check_failed(CHECKS, "connect_refused")
        h.failed(0.0)
    assert not h.up and h.circuit is Circuit.OPEN
    h.adopt(CHECKS, BREAKER)  # both policies stay: so does the state
    assert not h.up and h.circuit is Circuit.OPEN
    h.adopt(None, BREAKER)  # no more checks: nothing will ever bring it back, so it is up
    assert h.up and h.circuit is Circuit.OPEN
    h.adopt(None, None)  # no more breaker: closed, and failures only counted
    assert h.circuit is Circuit.CLOSED and h.usable(0.0) and h.failures_total == 3


def test_a_probe_that_fails_after_its_breaker_is_gone_does_not_stay_out() -> None:
    h = TargetHealth(BREAKER, random.Random(6))
    for _ in range(3):
        h.failed(0.0)
    probe = h.begin(h.open_until)
    h.circuit_policy = None  # the breaker removed while the probe was out
    h.failed(h.open_until, probe)
    assert not h.probing
