"""The record of one connection: what the table, the inspector, stats and the access log see.

A leaf: it imports nothing of the program but the words for why a connection ended, so
every layer that reads or writes a connection's state can use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import trio

from ._addresses import ListenKey, format_address
from ._reasons import Reason

__all__ = ["Connection", "Session"]


@dataclasses.dataclass(eq=False, slots=True)
class Connection:
    """One live connection, as the table, the inspector and the access log see it."""

    protocol: ClassVar[str] = "tcp"
    id: int
    client_ip: str
    client_port: int
    listener: ListenKey
    started: float  # wall clock (time.time()), for logs
    opened: float  # trio clock, for ages and deadlines
    route: str | None = None
    target: str | None = None  # "ip:port" connected to (while connecting: the one tried)
    destination: str | None = None  # socks5 / http_connect: "host:port" as the client asked for it
    state: str = "accepted"
    bytes_in: int = 0  # client -> target
    bytes_out: int = 0  # target -> client
    last_activity: float = 0.0
    connect_time: float | None = None  # seconds the successful connect to the target took
    local: tuple[str, int] | None = None  # the address the client connected to: read when first needed
    path: str = ""  # how bytes move: "splice" (in the kernel) or "copy" (through Python)
    reason: Reason | None = None
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope, repr=False)

    @property
    def client(self) -> str:
        """The client's address, "ip:port" ("[ip]:port" for IPv6): made when asked for, not
        held by every connection."""
        return format_address((self.client_ip, self.client_port))

    def settle(self, reason: Reason) -> Reason:
        """Record why the connection ended, unless a cause came first; return the recorded one."""
        if self.reason is None:
            self.reason = reason
        return self.reason

    def end(self, reason: Reason) -> None:
        """End the connection now with `reason` (if it is the first cause)."""
        self.settle(reason)
        self.scope.cancel(reason.value)

    def kill(self) -> None:
        """End the connection with reason `killed`; both sockets close at once."""
        self.end(Reason.KILLED)

    def age(self, now: float | None = None) -> float:
        return (trio.current_time() if now is None else now) - self.opened

    def idle(self, now: float | None = None) -> float:
        return (trio.current_time() if now is None else now) - self.last_activity

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """The row the inspector and the watch stream show."""
        now = trio.current_time() if now is None else now
        return {
            "id": self.id,
            "protocol": self.protocol,
            "route": self.route,
            "client": self.client,
            "target": self.target,
            "destination": self.destination,
            "state": self.state,
            "age_s": round(self.age(now), 3),
            "idle_s": round(self.idle(now), 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "reason": None if self.reason is None else self.reason.value,
        }


@dataclasses.dataclass(eq=False, slots=True)
class Session(Connection):
    """One UDP session (a `protocol = "udp"` route's client flow): a connection's record, with
    its datagrams counted each way beside its bytes."""

    protocol: ClassVar[str] = "udp"
    datagrams_in: int = 0  # client -> target
    datagrams_out: int = 0  # target -> client

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """The connection's row, with the datagram counts."""
        row = Connection.describe(self, now)
        row["datagrams_in"] = self.datagrams_in
        row["datagrams_out"] = self.datagrams_out
        return row
