"""The plain non-blocking socket under a trio socket, for the syscalls trio would wrap in waits.

The data path tries each syscall first and waits in trio only when it would block (a
recv_into, a send, an accept); trio's own methods put checkpoints around every call. trio
keeps the standard-library socket as a private attribute: this is the one place that
reaches for it, and tests/test_rawsock.py fails if trio changes that.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["raw_socket"]


def raw_socket(sock: trio.socket.SocketType) -> socket.socket:
    """The non-blocking stdlib socket a trio socket wraps (same fd, same object every time)."""
    raw = sock._sock  # type: ignore[attr-defined]  # noqa: SLF001 - see the module docstring
    if not isinstance(raw, socket.socket):
        raise TypeError(f"trio socket {sock!r} no longer wraps a socket.socket")
    return raw
