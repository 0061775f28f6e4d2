"""The zero-downtime upgrade (SIGUSR2, with workers > 1): the listening sockets go from one
generation of triofwd to the next, over a Unix socket (SCM_RIGHTS), never closed between.

    old supervisor                               new supervisor: the same command line, with
      starts the new one ─────────────────────►  TRIOFWD_UPGRADE naming its end of a socket
      hand_over(): each listener's sockets,      take_over(): those sockets, used instead of
        the control socket, the metrics port       binding (the same queues: nothing refused)
                         ◄────────────────────── "ready", once every new worker is ready
      its workers drain (stop accepting, finish
      within shutdown_grace), it exits 0

A new generation that exits, or is not ready within UPGRADE_TIMEOUT, changes nothing: the
old one goes on serving.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Protocol

from ._addresses import ListenKey
from ._errors import ListenError
from ._worker import FDS_MAX, MESSAGE_MAX, carrying, receive_fds

__all__ = ["UPGRADE_ENV", "Handed", "hand_over", "take_over"]

UPGRADE_ENV = "TRIOFWD_UPGRADE"
# How long the new generation waits for the old one's sockets (they are sent at once).
TAKE_OVER_TIMEOUT = 10.0


@dataclasses.dataclass
class Handed:
    """What the generation before handed over."""

    channel: socket.socket  # "ready" goes back on it
    groups: dict[ListenKey, list[socket.socket]]
    control: socket.socket | None
    metrics: list[socket.socket]


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def _send(channel: socket.socket, message: object, sockets: Sequence[HasFileno]) -> None:
    channel.sendmsg([json.dumps(message).encode()], carrying([sock.fileno() for sock in sockets]))


def hand_over(channel: socket.socket, groups: Mapping[ListenKey, Sequence[HasFileno]], control: HasFileno | None, metrics: Sequence[HasFileno]) -> None:
    """Send every listening socket to the new generation (blocking: small messages, sent at once)."""
    for key, sockets in groups.items():
        for start in range(0, len(sockets), FDS_MAX):
            _send(channel, {"group": list(key)}, sockets[start : start + FDS_MAX])
    if control is not None:
        _send(channel, {"control": True}, [control])
    if metrics:
        _send(channel, {"metrics": True}, metrics)
    _send(channel, {"end": True}, [])


def take_over() -> Handed | None:
    """The sockets the generation before handed over, when this process is an upgrade
    (TRIOFWD_UPGRADE, taken out of the environment); else None. ListenError when it fails."""
    text = os.environ.pop(UPGRADE_ENV, None)
    if text is None:
        return None
    channel = socket.socket(fileno=int(text))
    channel.settimeout(TAKE_OVER_TIMEOUT)
    handed = Handed(channel, {}, None, [])
    try:
        while True:
            data, ancdata, _, _ = channel.recvmsg(MESSAGE_MAX, socket.CMSG_SPACE(FDS_MAX * 4), socket.MSG_CMSG_CLOEXEC)
            sockets = receive_fds(ancdata)
            if not data:
                raise ListenError(0, "upgrade: the running triofwd stopped handing over its sockets")
            message = json.loads(data)
            if "group" in message:
                bind, port, owner = message["group"]
                handed.groups.setdefault((bind, port, owner), []).extend(sockets)
            elif "control" in message:
                handed.control = sockets[0]
            elif "metrics" in message:
                handed.metrics = sockets
            else:
                return handed
    except OSError as exc:
        raise ListenError(exc.errno or 0, f"upgrade: cannot take over the running triofwd's sockets: {exc.strerror or exc}") from None
