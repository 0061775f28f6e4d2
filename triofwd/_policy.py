"""A route's timeouts and keepalive treatment, parsed: what the connection and its traffic keep.

Pure data. The table compiles one per route (its own keys over [settings]); the connection
takes its deadlines from it and the relay its idle and half-close windows.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["DURATION_KEYS", "Policy"]

# The policy's keys that are durations ("30s", "0" for off): parsed into seconds.
DURATION_KEYS = frozenset({"connect_timeout", "initial_data_timeout", "inactivity_timeout", "half_close_timeout", "max_lifetime", "tcp_keepalive"})


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """A route's effective timeouts and keepalive treatment, in seconds (math.inf = off)."""

    connect_timeout: float
    initial_data_timeout: float
    inactivity_timeout: float
    half_close_timeout: float
    max_lifetime: float
    keepalive: str
    keepalive_multiplier: int
    tcp_keepalive: float

    @property
    def idle_warning_after(self) -> float:
        """extended keepalive: idle this long, a warning is logged and the grace period starts."""
        if self.keepalive != "extended":
            return math.inf
        return self.inactivity_timeout * self.keepalive_multiplier

    @property
    def idle_window(self) -> float:
        """How long a connection may go without a byte in either direction."""
        if self.keepalive == "immortal":
            return math.inf
        if self.keepalive == "extended":
            # One grace period of the plain inactivity_timeout after the warning.
            return self.idle_warning_after + self.inactivity_timeout
        return self.inactivity_timeout
