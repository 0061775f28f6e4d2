"""The JSON access log: one line per connection, written when it ends."""

from __future__ import annotations

import logging
import time
from typing import IO, TYPE_CHECKING

import msgspec

from ._log import iso_utc

if TYPE_CHECKING:
    from ._record import Connection

__all__ = ["AccessLog", "AccessRecord"]

log = logging.getLogger("triofwd.accesslog")

# A log that cannot be written (disk full, a closed pipe) is warned about at most this often;
# the lines lost meanwhile are counted, and no connection is held up or ended by it.
WARN_INTERVAL = 10.0


class AccessRecord(msgspec.Struct, kw_only=True):
    """One access log line: the README's "Access log" fields."""

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


class AccessLog:
    """Writes AccessRecords as JSON lines to a text file (or stdout)."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self._encoder = msgspec.json.Encoder()
        self.lost = 0  # lines that could not be written
        self._warned_at = -WARN_INTERVAL

    def write(self, conn: Connection, duration: float) -> None:
        """The line of a connection that ended after `duration` seconds."""
        record = AccessRecord(
            ts=iso_utc(conn.started + duration),
            id=conn.id,
            route=conn.route,
            client=conn.client,
            target=conn.target,
            started=iso_utc(conn.started),
            duration_ms=round(duration * 1000, 3),
            connect_ms=None if conn.connect_time is None else round(conn.connect_time * 1000, 3),
            bytes_in=conn.bytes_in,
            bytes_out=conn.bytes_out,
            reason=str(conn.reason),
        )
        # One write per line, flushed: a reader (or a crash) never sees half a line.
        try:
            self.file.write(self._encoder.encode(record).decode() + "\n")
            self.file.flush()
        except (OSError, ValueError) as exc:  # ValueError: the file was closed
            self.lost += 1
            now = time.monotonic()
            if now - self._warned_at >= WARN_INTERVAL:
                self._warned_at = now
                log.warning("cannot write the access log (%d lines lost so far): %s", self.lost, exc)
