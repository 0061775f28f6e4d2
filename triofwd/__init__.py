"""triofwd: a TCP forwarder on Trio. Every connection lives in its own nursery.

    import trio, triofwd

    async def main():
        config = triofwd.load_config("routes/demo.toml")
        async with trio.open_nursery() as nursery:
            fwd = await nursery.start(triofwd.serve, config)
            ...
"""

from __future__ import annotations

from ._config import TLS, CircuitBreaker, Config, HealthCheck, Route, Settings, parse_config
from ._table import load_config
from ._errors import ConfigError
from ._actions import HandlerInfo
from ._record import Connection
from ._control import metrics_text, open_control, serve_control
from ._errors import ControlError
from ._metrics_http import serve_metrics
from ._errors import OffloadError
from ._reasons import Reason
from ._errors import ConnectionEnded
from ._server import Forwarder, serve
from ._errors import ListenError

__all__ = [
    "TLS",
    "CircuitBreaker",
    "Config",
    "ConfigError",
    "Connection",
    "ConnectionEnded",
    "ControlError",
    "Forwarder",
    "HandlerInfo",
    "HealthCheck",
    "ListenError",
    "OffloadError",
    "Reason",
    "Route",
    "Settings",
    "load_config",
    "metrics_text",
    "open_control",
    "parse_config",
    "serve",
    "serve_control",
    "serve_metrics",
]

__version__ = "0.1.0"
