"""The control socket: a Unix socket speaking WebSocket, one JSON object per message.

messages     the wire messages, typed structs both ends encode and decode
socketfile   the socket file: mode 0600, the peer's uid, replacing a stale one
server       the commands, served to each client in its own session
client       `open_control`: one connection to a daemon's control socket
inspector    `triofwd inspect`: the commands for people, and `top`
"""

from __future__ import annotations

from . import inspector
from .client import ControlClient, open_control
from .server import ControlServer, metrics_text, serve_control, stats_json
from .socketfile import bind_control_socket, default_control_path, peer_credentials

__all__ = [
    "ControlClient",
    "ControlServer",
    "inspector",
    "bind_control_socket",
    "default_control_path",
    "metrics_text",
    "open_control",
    "peer_credentials",
    "serve_control",
    "stats_json",
]
