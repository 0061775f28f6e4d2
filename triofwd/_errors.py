"""Errors that stop a forwarder from starting (or a reload from taking effect)."""

from __future__ import annotations

__all__ = ["ListenError"]


class ListenError(OSError):
    """A listen address that cannot be bound (in use, not permitted, not local), or another
    resource the route table asks for that cannot be taken up (nftables rules)."""

    def __str__(self) -> str:
        return str(self.strerror)  # one line for people: the errno number is in .errno
