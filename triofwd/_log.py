"""Logging: one line per event; text for people, JSON (--log-format json) for machines.

Structured values go in `extra={"fields": {...}}`; the text form appends them as
key=value, the JSON form merges them into the object.
"""

from __future__ import annotations

import datetime
import logging
import sys
import traceback
from typing import Any

import msgspec

__all__ = ["iso_utc", "setup_logging"]

_encoder = msgspec.json.Encoder()


def iso_utc(ts: float) -> str:
    """A Unix time as the logs and the access log write it: ISO 8601, UTC, milliseconds, "Z"."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        line = f"{iso_utc(record.created)} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        for key, value in fields.items():
            line += f" {key}={_encoder.encode(value).decode()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"ts": iso_utc(record.created), "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        obj.update(getattr(record, "fields", {}))
        if record.exc_info:
            obj["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return _encoder.encode(obj).decode()


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send the `triofwd` loggers to stderr at `level` in `fmt` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("triofwd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
