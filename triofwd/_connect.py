"""Opening one TCP connection to a host and port, and what its failure means.

Errors are translated to reasons here, at the layer boundary, by `connect_failure`: the
rest of the program never looks at an errno. The dial (`_dial`), the warm pools and the
health checks (`_targets`) all connect through `open_target`.
"""

from __future__ import annotations

import errno
import socket

import trio

from . import _rawsock as rawsock
from ._endings import leaves
from ._health import Attempt, TargetHealth
from ._reasons import Reason

__all__ = ["connect_failed", "connect_failure", "literal_family", "open_target"]

_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EADDRNOTAVAIL}
# No socket could be made here (out of fds or memory): the limit is ours, not the target's.
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_TIMEOUT = {errno.ETIMEDOUT}
# The target accepted and reset at once: seen by connect() (ECONNRESET in SO_ERROR) or, a
# moment later, by getpeername() (ENOTCONN). It was reached; it said no.
_RESET = {errno.ECONNRESET, errno.ENOTCONN}

_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
# Delay before happy eyeballs (RFC 8305) starts the next address of a hostname; trio's default.
HAPPY_EYEBALLS_DELAY = 0.25


def connect_failure(exc: OSError | trio.TooSlowError) -> Reason:
    """The reason for a failed connect: dns_error, connect_refused, connect_timeout,
    target_reset, target_unreachable, or capacity when no socket could be made at all."""
    if isinstance(exc, trio.TooSlowError):
        return Reason.CONNECT_TIMEOUT
    if isinstance(exc, socket.gaierror):
        return Reason.DNS_ERROR
    # trio.open_tcp_stream reports "all attempts failed" as an OSError caused by a group.
    cause = exc.__cause__
    found = list(leaves(cause)) if isinstance(cause, BaseExceptionGroup) else [exc]
    codes = {leaf.errno for leaf in found if isinstance(leaf, OSError)}
    if codes & _OUT_OF_RESOURCES:
        return Reason.CAPACITY
    if errno.ECONNREFUSED in codes:
        return Reason.CONNECT_REFUSED
    if codes & _RESET:
        return Reason.TARGET_RESET
    if codes & _TIMEOUT:
        return Reason.CONNECT_TIMEOUT
    return Reason.TARGET_UNREACHABLE


def literal_family(host: str) -> int | None:
    """AF_INET or AF_INET6 when `host` is an IP address, not a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


async def open_target(host: str, port: int, timeout: float) -> socket.socket:
    """A fresh connection to a target, within `timeout` (trio.TooSlowError past it): a plain
    non-blocking socket with TCP_NODELAY, as the data engine relays it."""
    with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:  # fail_after, without its generator
        family = literal_family(host)
        if family is not None:
            # An address has nothing to race: one non-blocking connect, without open_tcp_stream's
            # nursery and task per attempt (a sixth of the forwarder's time per new connection).
            return await rawsock.connect(family, (host, port))
        stream = await trio.open_tcp_stream(host, port, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY)
        sock = rawsock.raw_socket(stream.socket)
        # trio's SocketStream caps the unsent bytes at 16 KiB (TCP_NOTSENT_LOWAT), which makes
        # bulk wait for every 16 KiB: back to the system's value (0: the sysctl's).
        sock.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, 0)
        return sock
    assert scope.cancelled_caught
    raise trio.TooSlowError


def connect_failed(health: TargetHealth, reason: Reason, attempt: Attempt = Attempt.NORMAL) -> None:
    """A connect to the target failed with `reason`: against its health, unless the fault
    was ours (capacity: out of fds here), which gives no verdict."""
    if reason is Reason.CAPACITY:
        health.abandoned(attempt)
    else:
        health.failed(trio.current_time(), attempt)
