"""The JSON access log: one line per connection, written when it ends.

A log file is reopened on request (SIGUSR1, nginx's habit), so logrotate can rename it
without `copytruncate`: lines up to the reopen go to the renamed file, later ones to a new
file at the path. Lines are written whole (one write and a flush each, on the event loop's
thread), and the reopen runs between two of them, so none is lost or split.
"""

from __future__ import annotations

import logging
import time
from typing import IO, Protocol

import msgspec

from ._log import iso_utc
from ._record import Connection, Session

__all__ = ["AccessLog", "AccessLogFile", "AccessRecord", "LineSink"]

log = logging.getLogger("triofwd.accesslog")

# A log that cannot be written (disk full, a closed pipe) is warned about at most this often;
# the lines lost meanwhile are counted, and no connection is held up or ended by it.
WARN_INTERVAL = 10.0


class AccessRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One access log line: the README's "Access log" fields; a UDP session's line also has
    `protocol` ("udp") and its datagrams each way (a TCP connection's has neither)."""

    ts: str
    id: int
    route: str | None
    client: str
    target: str | None  # the address connected to
    destination: str | None  # socks5 / http_connect: "host:port" the client asked for; null elsewhere
    started: str
    duration_ms: float
    connect_ms: float | None  # time to connect to the target (~0 for a warm socket); null: none was connected
    bytes_in: int
    bytes_out: int
    reason: str
    protocol: str = "tcp"
    datagrams_in: int | None = None
    datagrams_out: int | None = None


class LineSink(Protocol):
    """Where access log lines go: a text file, sys.stdout, an AccessLogFile, a test's list."""

    def write(self, text: str, /) -> object: ...
    def flush(self) -> object: ...


class AccessLogFile:
    """An access log file at `path`, appended to, that reopen() opens anew at the same path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = self._open()  # OSError: the caller says it cannot start

    def _open(self) -> IO[str]:
        # Appending, so that two writers (an upgrade's old and new generation) never overwrite
        # each other, and a line lands whole at the end of the file.
        return open(self.path, "a", encoding="utf-8")  # kept open until reopen() or close()

    def write(self, text: str, /) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """Open the path anew and close the old file (which logrotate has renamed, or not).

        Raises OSError when the path cannot be opened; the old file then stays in use, so
        lines keep being written somewhere (nginx does the same).
        """
        new = self._open()
        old, self._file = self._file, new
        old.close()  # every line was flushed as it was written: nothing is left in its buffer

    def close(self) -> None:
        self._file.close()


class AccessLog:
    """Writes AccessRecords as JSON lines to a text file (or stdout)."""

    def __init__(self, file: LineSink) -> None:
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
            destination=conn.destination,
            started=iso_utc(conn.started),
            duration_ms=round(duration * 1000, 3),
            connect_ms=None if conn.connect_time is None else round(conn.connect_time * 1000, 3),
            bytes_in=conn.bytes_in,
            bytes_out=conn.bytes_out,
            reason=str(conn.reason),
        )
        if isinstance(conn, Session):
            record.protocol, record.datagrams_in, record.datagrams_out = conn.protocol, conn.datagrams_in, conn.datagrams_out
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
