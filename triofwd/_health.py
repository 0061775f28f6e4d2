"""One target's health: active checks (rise/fall) and the passive circuit breaker.

Pure code: no sockets, no trio. Time comes in as an argument, randomness from an
injectable generator, so every transition is tested with a fake clock.

    active checks:   up ──fall failures in a row──► down ──rise passes in a row──► up
    passive circuit: closed ──`failures` in a row──► open (back-off)
                     open ──back-off over──► half-open: the next connection is the one probe
                     half-open ──probe connects──► closed (back-off reset)
                     half-open ──probe fails──► open, back-off doubled (to max_backoff), with jitter

A target takes new connections when it is up and its circuit is closed, or half-open
with no probe out yet.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from typing import Any

__all__ = ["Attempt", "CheckPolicy", "Circuit", "CircuitPolicy", "TargetHealth"]

# The open period is the nominal back-off stretched by up to this fraction, at random, so
# that targets (and forwarders) that failed together do not all probe at the same moment.
JITTER = 0.25


@dataclasses.dataclass(frozen=True, slots=True)
class CheckPolicy:
    """A route's active health check, parsed (seconds, bytes)."""

    interval: float
    timeout: float
    rise: int
    fall: int
    send: bytes = b""
    expect: bytes = b""
    udp: bool = False  # a datagram with `send`, and a reply, instead of a connect


@dataclasses.dataclass(frozen=True, slots=True)
class CircuitPolicy:
    """A route's circuit breaker, parsed (seconds)."""

    failures: int
    backoff: float
    max_backoff: float


class Circuit(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Attempt(enum.Enum):
    NORMAL = "normal"
    PROBE = "probe"  # the one connection a half-open circuit lets through


class TargetHealth:
    """What is known about one target; the balancer asks `usable`, the dial reports outcomes."""

    def __init__(self, circuit: CircuitPolicy | None = None, rng: random.Random | None = None) -> None:
        self.circuit_policy = circuit
        self._rng = rng or random.Random()
        # active checks
        self.up = True  # as HAProxy: a target starts up; `fall` failed checks take it out
        self.passes = 0  # in a row, while down
        self.fails = 0  # in a row, while up
        self.checks_passed = 0
        self.checks_failed = 0
        self.last_check = ""  # "ok", or why the last check failed
        # passive: the circuit breaker
        self.circuit = Circuit.CLOSED
        self.consecutive_failures = 0
        self.failures_total = 0
        self.opens_total = 0
        self.backoff = 0.0  # the nominal back-off of the current (or last) open period; 0: never opened since closed
        self.open_until = -math.inf
        self.probing = False  # half-open: the one probe connection is out

    def adopt(self, checks: CheckPolicy | None, circuit: CircuitPolicy | None) -> None:
        """The route's policies as of a reload: state whose policy is gone is forgotten."""
        self.circuit_policy = circuit
        if checks is None:
            self.up, self.passes, self.fails = True, 0, 0
        if circuit is None:
            self.circuit, self.probing, self.backoff, self.open_until = Circuit.CLOSED, False, 0.0, -math.inf

    # -- what the balancer asks -----------------------------------------------------------

    def usable(self, now: float) -> bool:
        """May a new connection be sent here now?"""
        if not self.up:
            return False
        if self.circuit is Circuit.OPEN:
            return now >= self.open_until
        if self.circuit is Circuit.HALF_OPEN:
            return not self.probing
        return True

    def begin(self, now: float) -> Attempt | None:
        """A connection is about to try this target: None if it may not (anymore).

        An open circuit whose back-off is over turns half-open here, and this attempt is
        its probe: only the probe's outcome moves a half-open circuit.
        """
        if not self.usable(now):
            return None
        if self.circuit is Circuit.CLOSED:
            return Attempt.NORMAL
        self.circuit = Circuit.HALF_OPEN
        self.probing = True
        return Attempt.PROBE

    # -- what the dial reports ------------------------------------------------------------

    def connected(self, attempt: Attempt) -> None:
        """The connect succeeded: a probe closes the circuit."""
        if attempt is Attempt.PROBE and self.circuit is Circuit.HALF_OPEN:
            self.circuit = Circuit.CLOSED
            self.probing = False
            self.backoff = 0.0
            self.consecutive_failures = 0

    def failed(self, now: float, attempt: Attempt = Attempt.NORMAL) -> None:
        """A connect failed, or the target reset a connection: one more failure in a row."""
        self.failures_total += 1
        self.consecutive_failures += 1
        policy = self.circuit_policy
        if policy is None:
            self.probing = False
            return
        if self.circuit is Circuit.HALF_OPEN:
            if attempt is Attempt.PROBE:
                self._open(now, min(policy.max_backoff, self.backoff * 2))
        elif self.circuit is Circuit.CLOSED and self.consecutive_failures >= policy.failures:
            self._open(now, policy.backoff)

    def succeeded(self) -> None:
        """A connection through this target ended without the target failing it."""
        self.consecutive_failures = 0

    def abandoned(self, attempt: Attempt) -> None:
        """An attempt ended with no verdict (the client left, the forwarder stopped): the next one probes."""
        if attempt is Attempt.PROBE and self.circuit is Circuit.HALF_OPEN:
            self.probing = False

    def _open(self, now: float, backoff: float) -> None:
        self.circuit = Circuit.OPEN
        self.probing = False
        self.backoff = backoff
        self.open_until = now + backoff * (1 + JITTER * self._rng.random())
        self.opens_total += 1

    # -- what the health checker reports --------------------------------------------------

    def check_passed(self, policy: CheckPolicy) -> bool:
        """One check passed; True when this brought the target back up."""
        self.checks_passed += 1
        self.last_check = "ok"
        return self._in_a_row(up=True, needed=policy.rise)

    def check_failed(self, policy: CheckPolicy, why: str) -> bool:
        """One check failed; True when this took the target down."""
        self.checks_failed += 1
        self.last_check = why
        return self._in_a_row(up=False, needed=policy.fall)

    def follow(self, up: bool) -> bool:
        """The verdict of checks run elsewhere (a worker's supervisor checks for all its
        workers); True when it turned the target."""
        turned = self.up != up
        self.up, self.passes, self.fails = up, 0, 0
        return turned

    def _in_a_row(self, *, up: bool, needed: int) -> bool:
        """A check that says `up` (or down): it breaks the other run, and `needed` of them
        in a row turn a target that is the other way round; True when this one did."""
        if up:
            self.fails = 0
        else:
            self.passes = 0
        if self.up == up:
            return False
        run = (self.passes if up else self.fails) + 1
        if run < needed:
            if up:
                self.passes = run
            else:
                self.fails = run
            return False
        self.up, self.passes, self.fails = up, 0, 0
        return True

    def describe(self, now: float) -> dict[str, Any]:
        """The state as the control socket and metrics show it."""
        return {
            "up": self.up,
            "circuit": self.circuit.value,
            "usable": self.usable(now),
            "consecutive_failures": self.consecutive_failures,
            "failures_total": self.failures_total,
            "circuit_opens_total": self.opens_total,
            "backoff_s": self.backoff,
            "retry_in_s": round(max(0.0, self.open_until - now), 3) if self.circuit is Circuit.OPEN else 0.0,
            "checks_passed": self.checks_passed,
            "checks_failed": self.checks_failed,
            "last_check": self.last_check,
        }
