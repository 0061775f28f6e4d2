"""triofwd: a TCP forwarder on Trio. Every connection lives in its own nursery.

    import trio, triofwd

    async def main():
        config = triofwd.load_config("routes/demo.toml")
        async with trio.open_nursery() as nursery:
            fwd = await nursery.start(triofwd.serve, config)
            ...
"""

from __future__ import annotations

from ._config import TLS, Config, ConfigError, HealthCheck, Route, Settings, load_config, parse_config
from ._connection import Connection, HandlerInfo
from ._reasons import ConnectionEnded, Reason
from ._server import Forwarder, ListenError, serve

__all__ = [
    "TLS",
    "Config",
    "ConfigError",
    "Connection",
    "ConnectionEnded",
    "Forwarder",
    "HandlerInfo",
    "HealthCheck",
    "ListenError",
    "Reason",
    "Route",
    "Settings",
    "load_config",
    "parse_config",
    "serve",
]

__version__ = "0.1.0"
