"""The little protocol the feature matrix's far ends speak: its target server and its handler.

The client's first line names what the far end does and which case it belongs to,
`COMMAND CASE [N]\n`; the bytes after it are the payload:

    echo N     echo N bytes of payload as they come, then say b"bye" and end (EOF) and
               close: the far end ends first, so no case's orderly end depends on a
               client's EOF, which TLS cannot carry
    hold N     echo N bytes, then stay open and silent for HOLD seconds (after a peer's
               EOF there is no telling when it closes), then close
    stream     echo until the client's EOF, then say b"bye" and end
    halfclose  say b"bye" and end its sending direction (EOF), then read until the client's
               EOF (what it read is recorded for the case), then close
    reset      reset the connection at once (SO_LINGER 0; not for a handler)

This module is imported by the daemon too (the matrix's handler route), so it needs
nothing but trio.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

BYE = b"bye"
MAX_LINE = 256
# How long `hold` stays silent: longer than any half_close_timeout of the matrix.
HOLD = 3.0


class Record:
    """What the far ends saw, per case: the PROXY header's addresses, the bytes after a half-close."""

    def __init__(self) -> None:
        self.headers: dict[str, Any] = {}
        self.after_halfclose: dict[str, bytes] = {}
        self.commands: collections.Counter[str] = collections.Counter()


async def read_line(stream: trio.abc.ReceiveStream, data: bytes = b"") -> tuple[bytes, bytes]:
    """The first line (without its newline) and the bytes after it."""
    while b"\n" not in data:
        if len(data) > MAX_LINE:
            raise ValueError(f"no command line in {data[:40]!r}")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError("closed before its command line")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line, rest


async def echo_until_eof(stream: trio.abc.Stream, first: bytes) -> None:
    if first:
        await stream.send_all(first)
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def echo_exactly(stream: trio.abc.Stream, first: bytes, count: int) -> None:
    """Echo `count` bytes (the first of them already read)."""
    if len(first) > count:
        raise ValueError(f"{len(first)} bytes of payload, {count} announced")
    if first:
        await stream.send_all(first)
    count -= len(first)
    while count:
        data = await stream.receive_some(min(count, 65536))
        if not data:
            raise EOFError("closed before its payload was complete")
        await stream.send_all(data)
        count -= len(data)


async def read_until_eof(stream: trio.abc.ReceiveStream, first: bytes) -> bytes:
    data = bytearray(first)
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def reset(sock: Any) -> None:
    """Close with SO_LINGER 0: the peer sees a reset."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def serve_commands(
    stream: trio.abc.Stream,
    record: Record,
    *,
    end_sending: Callable[[], Awaitable[None]],
    raw: Any = None,
    header: Any = None,
    first: bytes = b"",
) -> None:
    """Speak the protocol on `stream`; `end_sending` ends this side's sending direction
    (an EOF), `raw` is the socket under it (None for a handler, which cannot reset)."""
    line, rest = await read_line(stream, first)
    command, case, *count = line.decode().split(" ")
    record.commands[command] += 1
    if header is not None:
        record.headers[case] = header
    if command == "reset" and raw is not None:
        reset(raw)
    elif command == "halfclose":
        await stream.send_all(BYE)
        await end_sending()
        record.after_halfclose[case] = await read_until_eof(stream, rest)
    elif command == "hold":
        await echo_exactly(stream, rest, int(count[0]))
        await trio.sleep(HOLD)
    elif command in ("echo", "stream"):
        if command == "echo":
            await echo_exactly(stream, rest, int(count[0]))
        else:
            await echo_until_eof(stream, rest)
        await stream.send_all(BYE)
        await end_sending()
    else:
        raise ValueError(f"unknown command {line!r}")


HANDLER_RECORD = Record()


async def handler(stream: Any, info: Any) -> None:
    """The matrix's handler route: the protocol on the connection itself."""
    with contextlib.suppress(EOFError):
        await serve_commands(stream, HANDLER_RECORD, end_sending=stream.send_eof)
