"""Fault injection for the daemon under test: slow and failing name resolution.

The reliability tests put this folder on the daemon's PYTHONPATH, so Python imports it at
start-up. It wraps socket.getaddrinfo — the call trio makes in a worker thread for every
host name — and answers names under `.invalid` itself (RFC 6761: such names never resolve),
so no query ever leaves the machine:

    ok-<ms>.invalid      sleeps <ms> milliseconds, then resolves to 127.0.0.1
    fail-<ms>.invalid    sleeps <ms> milliseconds, then fails as an unknown name
    any other .invalid   fails at once as an unknown name

Every other name, and trio's numeric-only first try, goes to the real getaddrinfo.
"""

from __future__ import annotations

import socket
import time

_real_getaddrinfo = socket.getaddrinfo


def _delay(label: str, prefix: str) -> float | None:
    if label.startswith(prefix) and label[len(prefix):].isdigit():
        return int(label[len(prefix):]) / 1000
    return None


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
    if flags & socket.AI_NUMERICHOST or not isinstance(name, str) or not name.rstrip(".").endswith(".invalid"):
        return _real_getaddrinfo(host, port, family, type, proto, flags)
    label = name.split(".", 1)[0]
    if (seconds := _delay(label, "ok-")) is not None:
        time.sleep(seconds)
        return _real_getaddrinfo("127.0.0.1", port, family, type, proto, flags)
    if (seconds := _delay(label, "fail-")) is not None:
        time.sleep(seconds)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


socket.getaddrinfo = getaddrinfo
