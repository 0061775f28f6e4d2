"""The one-word vocabulary for why a connection ended.

Every connection ends with exactly one of these, recorded once, by the first cause.
The access log, stats, metrics and the inspector all use these words. How a reason is
made into an exception and read back out of one is `_endings`.
"""

from __future__ import annotations

import enum

__all__ = ["Reason"]


class Reason(enum.StrEnum):
    """Why a connection ended."""

    NORMAL = "normal"
    CLIENT_RESET = "client_reset"
    TARGET_RESET = "target_reset"
    INITIAL_DATA_TIMEOUT = "initial_data_timeout"
    INACTIVITY_TIMEOUT = "inactivity_timeout"
    HALF_CLOSE_TIMEOUT = "half_close_timeout"
    LIFETIME_EXCEEDED = "lifetime_exceeded"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    TARGET_UNREACHABLE = "target_unreachable"
    DNS_ERROR = "dns_error"
    NO_ROUTE = "no_route"
    REJECTED = "rejected"
    IP_BLOCKED = "ip_blocked"
    IP_LIMIT = "ip_limit"
    RATE_LIMITED = "rate_limited"
    CAPACITY = "capacity"
    TLS_ERROR = "tls_error"
    BRIDGE_ERROR = "bridge_error"
    OFFLOADED = "offloaded"
    KILLED = "killed"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    AUTH_FAILED = "auth_failed"
    DESTINATION_DENIED = "destination_denied"
