"""Target selection: round-robin, first, random, least-connections; holds."""

from __future__ import annotations

import random

import pytest

from triofwd._balance import Balancer

T3 = [("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)]


def test_round_robin_rotates_the_first_pick() -> None:
    b = Balancer(T3, "round-robin")
    assert b.order(3) == [0, 1, 2]
    assert b.order(3) == [1, 2, 0]
    assert b.order(3) == [2, 0, 1]
    assert b.order(3) == [0, 1, 2]


def test_round_robin_rotates_even_with_one_attempt() -> None:
    b = Balancer(T3, "round-robin")
    assert [b.order(1)[0] for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_first_always_starts_at_zero() -> None:
    b = Balancer(T3, "first")
    for _ in range(5):
        assert b.order(3) == [0, 1, 2]
    with b.hold(0), b.hold(0):
        assert b.order(2) == [0, 1]  # holds do not matter to "first"


def test_random_is_a_seeded_permutation() -> None:
    b = Balancer(T3, "random", random.Random(1234))
    orders = [b.order(3) for _ in range(50)]
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    assert len({o[0] for o in orders}) == 3  # every target gets to be first
    again = Balancer(T3, "random", random.Random(1234))
    assert [again.order(3) for _ in range(50)] == orders  # reproducible from the seed


def test_random_with_retries_tries_every_target_once_before_repeating() -> None:
    b = Balancer(T3, "random", random.Random(7))
    for _ in range(20):
        seq = b.order(6)
        assert sorted(seq[:3]) == [0, 1, 2]
        assert seq[3:] == seq[:3]


def test_least_connections_prefers_fewer_holds() -> None:
    b = Balancer(T3, "least-connections")
    with b.hold(0), b.hold(0), b.hold(1):
        assert b.active == [2, 1, 0]
        for _ in range(4):
            assert b.order(3) == [2, 1, 0]
    assert b.active == [0, 0, 0]


def test_least_connections_ties_rotate() -> None:
    b = Balancer(T3, "least-connections")
    assert [b.order(1)[0] for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    with b.hold(1):
        firsts = [b.order(3) for _ in range(4)]
    # 0 and 2 tie (no holds) and share the first place; 1 (held) comes last.
    assert {o[0] for o in firsts} == {0, 2}
    assert all(o[2] == 1 for o in firsts)


def test_least_connections_follows_holds_as_they_change() -> None:
    b = Balancer(T3[:2], "least-connections")
    picks = []
    with b.hold(b.order(1)[0]):
        picks.append(b.order(1)[0])
        with b.hold(picks[-1]):
            pass
    assert picks == [1]  # 0 was held, so 1


@pytest.mark.parametrize("mode", ["round-robin", "first", "least-connections"])
def test_attempts_longer_than_targets_cycles(mode: str) -> None:
    b = Balancer(T3[:2], mode)
    assert b.order(5) == [0, 1, 0, 1, 0]


def test_random_attempts_longer_than_targets_cycles() -> None:
    b = Balancer(T3[:2], "random", random.Random(0))
    seq = b.order(5)
    assert seq[0] != seq[1]
    assert seq[2:] == [seq[0], seq[1], seq[0]]


@pytest.mark.parametrize("mode", ["round-robin", "first", "least-connections", "random"])
def test_single_target(mode: str) -> None:
    b = Balancer(T3[:1], mode)
    assert b.order(3) == [0, 0, 0]


@pytest.mark.parametrize("mode", ["round-robin", "first", "least-connections", "random"])
def test_no_targets_or_no_attempts(mode: str) -> None:
    assert Balancer([], mode).order(3) == []
    b = Balancer(T3, mode)
    assert b.order(0) == []
    assert b.order(-1) == []


def test_order_with_no_attempts_does_not_rotate() -> None:
    b = Balancer(T3, "round-robin")
    b.order(0)
    assert b.order(1) == [0]


def test_hold_decrements_even_on_exception() -> None:
    b = Balancer(T3, "least-connections")
    with pytest.raises(OSError):
        with b.hold(2):
            assert b.active == [0, 0, 1]
            raise OSError("connect failed")
    assert b.active == [0, 0, 0]
    with b.hold(1), b.hold(1):
        assert b.active == [0, 2, 0]
    assert b.active == [0, 0, 0]


def test_targets_are_kept() -> None:
    b = Balancer(iter(T3), "first")
    assert b.targets == tuple(T3)
    assert b.mode == "first"
