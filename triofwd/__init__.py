"""triofwd: a TCP forwarder on Trio. Every connection lives in its own nursery.

import trio, triofwd

async def main():
    config = triofwd.load_config("routes/demo.toml")
    async with trio.open_nursery() as nursery:
        fwd = await nursery.start(triofwd.serve, config)
        ...
"""

from __future__ import annotations

from ._actions import HandlerInfo
from ._config import TLS, CircuitBreaker, Config, HealthCheck, Route, Settings, User, parse_config
from ._datagrams import DatagramSession
from ._errors import ConfigError, ConnectionEnded, ControlConnectionError, ControlError, ListenError, OffloadError
from ._metrics_http import serve_metrics, status_json
from ._reasons import Reason
from ._record import Connection
from ._server import Forwarder, serve
from ._table import RouteTable, load_config, load_table
from .control import ControlClient, metrics_text, open_control, serve_control

__all__ = [
    "TLS",
    "CircuitBreaker",
    "Config",
    "ConfigError",
    "Connection",
    "ConnectionEnded",
    "ControlClient",
    "ControlConnectionError",
    "ControlError",
    "DatagramSession",
    "Forwarder",
    "HandlerInfo",
    "HealthCheck",
    "ListenError",
    "OffloadError",
    "Reason",
    "Route",
    "RouteTable",
    "Settings",
    "User",
    "load_config",
    "load_table",
    "metrics_text",
    "open_control",
    "parse_config",
    "serve",
    "serve_control",
    "serve_metrics",
    "status_json",
]

__version__ = "0.1.0"
