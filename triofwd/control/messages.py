"""The control protocol's wire messages: the typed structs both ends encode and decode.

    request  {"id": 1, "cmd": "connections", "args": {"route": "web"}}
    reply    {"id": 1, "ok": true, "result": [...]}   or   {"id": 1, "ok": false, "error": "..."}
    event    {"event": "open"|"close", ...connection row}   (after a `watch` request)

One JSON object per WebSocket text message, encoded with msgspec. A command's `args` are
decoded by the command's own struct once `cmd` is known.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any

import msgspec

__all__ = [
    "COMMANDS",
    "MAX_REQUEST_BYTES",
    "ConnectionsArgs",
    "IdArgs",
    "NoArgs",
    "Reply",
    "Request",
    "RequestId",
    "UNDECODABLE",
    "WatchRequest",
    "decode_request",
    "encode",
    "salvage_id",
]

# A request larger than this gets an error reply and the connection stays usable; no
# command needs more than a few hundred bytes.
MAX_REQUEST_BYTES = 64 * 1024


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """One command. `args` is decoded by the command's own type once `cmd` is known."""

    cmd: str
    id: int | None = None
    args: msgspec.Raw = msgspec.Raw(b"{}")


# A request's id is an integer; a malformed request's error echoes whatever number or
# string it named as its id, so that the client can match the error to what it sent.
RequestId = int | float | str | None


class Reply(msgspec.Struct, omit_defaults=True):
    """The answer to one request: `result` when ok, else `error`."""

    id: RequestId
    ok: bool
    result: Any = None
    error: str | None = None


class IdOnly(msgspec.Struct):
    """Enough of a bad request to answer it under its id, when it has one."""

    id: Any = None


@dataclasses.dataclass(frozen=True)
class WatchRequest:
    """A valid `watch` request: the session, not a command function, runs it."""

    id: int | None


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    pass


class ConnectionsArgs(msgspec.Struct, forbid_unknown_fields=True):
    route: str | None = None
    client: str | None = None  # "ip", "ip:port" or a CIDR


class IdArgs(msgspec.Struct, forbid_unknown_fields=True):
    id: Annotated[int, msgspec.Meta(ge=1)]


_request_decoder = msgspec.json.Decoder(Request)
_id_decoder = msgspec.json.Decoder(IdOnly)
_encoder = msgspec.json.Encoder()
# What a malformed message raises: msgspec reports bytes that are not UTF-8 inside a JSON
# string as UnicodeDecodeError, not DecodeError (found by fuzz/fuzz_control.py).
UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError)


# Each command and the struct its args decode into; `watch` runs in the session, beside requests.
COMMANDS: dict[str, type[msgspec.Struct]] = {
    "connections": ConnectionsArgs,
    "connection": IdArgs,
    "kill": IdArgs,
    "stats": NoArgs,
    "routes": NoArgs,
    "reload": NoArgs,
    "drain": NoArgs,
    "metrics": NoArgs,
    "watch": NoArgs,
}


def encode(message: Request | Reply | Any) -> str:
    """One message as the text of a WebSocket text frame (JSON is UTF-8 text, RFC 6455 5.6)."""
    return _encoder.encode(message).decode()


def decode_request(data: bytes) -> Request:
    """A request's envelope (UNDECODABLE errors for what is not one)."""
    return _request_decoder.decode(data)


# The id of a message that is not JSON (cut short, say), where the object starts with it:
# '{"id": 7, "cmd": ...' or '{"id": "a-7", ...'. Anywhere else it cannot be told apart
# from a string that merely looks like one.
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")\s*[,}]', re.DOTALL)


def salvage_id(data: bytes) -> RequestId:
    """The id of a request too malformed to decode, when it has one, to answer it under:
    a number or a string (of any request that is JSON, or that starts with its id)."""
    try:
        found = _id_decoder.decode(data).id
    except UNDECODABLE:
        match = _LEADING_ID.match(data)
        if match is None:
            return None
        try:
            found = msgspec.json.decode(match[1])
        except UNDECODABLE:
            return None
    # bool is an int to Python, not an id to anyone.
    return found if isinstance(found, int | float | str) and not isinstance(found, bool) else None
