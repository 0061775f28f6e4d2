"""Every exception triofwd raises to its users, in one place.

ConfigError             a route file (or a Config built in code) that cannot be served
ListenError             an address, socket file or kernel resource that cannot be taken up
  OffloadError          offload routes whose nftables rules cannot be installed
ConnectionEnded         raised inside a connection's scopes to end it with a reason
ControlError            the daemon answered a control request with an error
ControlConnectionError  the control connection could not be opened, or it closed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._reasons import Reason

__all__ = ["ConfigError", "ConnectionEnded", "ControlConnectionError", "ControlError", "ListenError", "OffloadError", "listen_error"]


class ConfigError(Exception):
    """A route file (or a Config built in code) that cannot be served.

    `errors` holds one line per problem, each naming the path of the bad value.
    """

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(errors))


class ListenError(OSError):
    """A listen address that cannot be bound (in use, not permitted, not local), or another
    resource the route table asks for that cannot be taken up (a socket file, nftables rules)."""

    def __str__(self) -> str:
        return str(self.strerror)  # one line for people: the errno number is in .errno


def listen_error(exc: OSError, what: str) -> ListenError:
    """The one-line error for `what` ("listen on 127.0.0.1:80", "create control socket PATH")
    that could not be done: "cannot WHAT: the system's reason"."""
    return ListenError(exc.errno, f"cannot {what}: {exc.strerror or exc}")


class OffloadError(ListenError):
    """Offload routes that cannot be installed (nft missing or not permitted) and have no fallback.

    A kind of ListenError: like a port that cannot be bound, it is a resource the forwarder
    was told to take up and cannot, so start-up fails (exit 2) and a reload keeps the old table.
    """

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


class ConnectionEnded(Exception):
    """Raised inside a connection's scopes to end it with `reason`.

    Errors are translated into this at the layer boundary (the pump, the dial, the
    route table), so the code that records an ending sees a reason, never an errno.
    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(reason.value if not detail else f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class ControlError(Exception):
    """The daemon answered a control request with ok: false; the text is its error."""


class ControlConnectionError(ConnectionError):
    """The control connection could not be opened, or it closed."""
