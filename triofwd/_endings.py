"""How a connection's end travels: made into ConnectionEnded where an error or a deadline
meets the connection's code, and read back out of whatever its scopes raised.

    failure_means(reason)       a stream or socket failure in the block ends it with `reason`
    deadline_at(t, reason)      a deadline that ends the block ends it with `reason`
    reason_of(exc)              the reason in what the scopes raised, at any depth of groups
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from ._errors import ConnectionEnded
from ._reasons import Reason

__all__ = ["deadline_at", "deadline_means", "failure_means", "leaves", "reason_of"]


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside `exc`, however deep its exception groups nest (`exc` itself if
    it is no group). Iterative, so no nesting depth can make the walk itself fail."""
    stack = [exc]
    while stack:
        current = stack.pop()
        if isinstance(current, BaseExceptionGroup):
            stack.extend(reversed(current.exceptions))
        else:
            yield current


def reason_of(exc: BaseException) -> Reason:
    """The reason a connection ended with, read from what its scopes raised, at any depth.

    A bug (any exception that is not a ConnectionEnded nor trio's Cancelled) is
    internal_error, even beside a ConnectionEnded: it must be seen. Otherwise the first
    ConnectionEnded names the reason; only cancellations from outside mean shutdown.
    """
    ended: Reason | None = None
    for leaf in leaves(exc):
        if isinstance(leaf, ConnectionEnded):
            ended = ended or leaf.reason
        elif isinstance(leaf, KeyboardInterrupt):
            return Reason.SHUTDOWN  # the operator stops the program: not a bug of this connection
        elif not isinstance(leaf, trio.Cancelled):
            return Reason.INTERNAL_ERROR
    return ended or Reason.SHUTDOWN


@contextlib.contextmanager
def deadline_at(deadline: float, reason: Reason) -> Iterator[trio.CancelScope]:
    """A scope ending at `deadline`; if the deadline ends the block, the connection ends with `reason`."""
    with trio.CancelScope(deadline=deadline) as scope:
        yield scope
    if scope.cancelled_caught:
        raise ConnectionEnded(reason)


def deadline_means(seconds: float, reason: Reason) -> contextlib.AbstractContextManager[trio.CancelScope]:
    """deadline_at, `seconds` from now."""
    return deadline_at(trio.current_time() + seconds, reason)


@contextlib.contextmanager
def failure_means(reason: Reason) -> Iterator[None]:
    """Translate a stream or socket failure (reset, broken pipe) into the connection's end."""
    try:
        yield
    except (trio.BrokenResourceError, OSError) as exc:
        raise ConnectionEnded(reason, str(exc.__cause__ or exc)) from exc
