"""The JSON access log: one line per connection, written when it ends."""

from __future__ import annotations

import datetime
from typing import IO, TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["AccessLog", "AccessRecord"]


class AccessRecord(msgspec.Struct, kw_only=True):
    """One access log line (CONTRACT.md "Access log")."""

    ts: str
    id: int
    route: str | None
    client: str
    target: str | None
    started: str
    duration_ms: float
    connect_ms: float | None  # time to connect to the target (~0 for a warm socket); null: none was connected
    bytes_in: int
    bytes_out: int
    reason: str


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AccessLog:
    """Writes AccessRecords as JSON lines to a text file (or stdout)."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self._encoder = msgspec.json.Encoder()

    def write(self, conn: Connection, duration: float) -> None:
        """The line of a connection that ended after `duration` seconds."""
        record = AccessRecord(
            ts=_iso(conn.started + duration),
            id=conn.id,
            route=conn.route,
            client=conn.client,
            target=conn.target,
            started=_iso(conn.started),
            duration_ms=round(duration * 1000, 3),
            connect_ms=None if conn.connect_time is None else round(conn.connect_time * 1000, 3),
            bytes_in=conn.bytes_in,
            bytes_out=conn.bytes_out,
            reason=str(conn.reason),
        )
        # One write per line, flushed: a reader (or a crash) never sees half a line.
        self.file.write(self._encoder.encode(record).decode() + "\n")
        self.file.flush()
