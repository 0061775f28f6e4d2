"""Route files: typed structures decoded by msgspec, and the small value parsers.

msgspec checks the *shape* of a route file (types, ranges, unknown keys) and reports
the path of the bad value. What msgspec cannot express — durations, rates, CIDRs,
targets, cross-route rules — is checked when the file is compiled into a route table
(`triofwd._table.compile_table`, the layer above), with errors in the same
"message - at `$.path`" form. This module is the schema and the value parsers only.
"""

from __future__ import annotations

import ipaddress
import math
import pathlib
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec

from ._errors import ConfigError

__all__ = [
    "CircuitBreaker",
    "Config",
    "ConfigError",
    "HealthCheck",
    "Route",
    "Settings",
    "TLS",
    "parse_config",
    "read_config",
]

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PortRange = Annotated[str, msgspec.Meta(pattern=r"^\d{1,5}-\d{1,5}$")]
Duration = str  # "250ms" | "30s" | "5m" | "4h" | "7d" | "0"; parsed by parse_duration
Rate = str  # "300/min" | "0"; parsed by parse_rate
Keepalive = Literal["standard", "immortal", "extended"]
Action = Literal["forward", "bridge", "offload", "reject", "handler"]
Balance = Literal["round-robin", "least-connections", "random", "first"]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class _Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, weakref=True):
    pass


class Settings(_Struct):
    """Process-wide defaults; every key optional (docs/routes.md)."""

    connect_timeout: Duration = "10s"
    initial_data_timeout: Duration = "30s"
    inactivity_timeout: Duration = "1h"
    half_close_timeout: Duration = "0"
    max_lifetime: Duration = "24h"
    keepalive: Keepalive = "standard"
    keepalive_multiplier: PositiveInt = 6
    tcp_keepalive: Duration = "60s"
    max_connections: Count = 10000
    max_connections_per_ip: Count = 0
    connection_rate_per_ip: Rate = "0"
    shutdown_grace: Duration = "30s"
    trusted_proxies: list[str] = []


class TLS(_Struct):
    """TLS options for `domains` routes and `action = "bridge"`."""

    mode: Literal["passthrough", "terminate", "reencrypt"] = "passthrough"
    cert: str = ""
    key: str = ""
    min_version: Literal["1.2", "1.3"] = "1.2"
    target_ca: str = ""
    target_sni: str = ""


class HealthCheck(_Struct):
    """Active health check of a route's targets: connect (and optionally send, then expect) every interval."""

    interval: Duration = "5s"
    timeout: Duration = "1s"
    rise: PositiveInt = 2  # passes in a row that bring a down target back
    fall: PositiveInt = 3  # failures in a row that take a target out
    send: str = ""  # bytes sent once connected (UTF-8; TOML escapes such as "\r\n" work)
    expect: str = ""  # bytes the reply must contain within timeout


class CircuitBreaker(_Struct):
    """Passive health: connect failures and target resets in a row open a target's circuit."""

    failures: PositiveInt = 5  # in a row, to open the circuit
    backoff: Duration = "1s"  # the first open period; doubled (with jitter) each time the probe fails
    max_backoff: Duration = "5m"


class Route(_Struct):
    """One route: which connections it takes (ports, addresses, names) and what it does."""

    name: str
    ports: list[Port | PortRange]
    bind: str = "0.0.0.0"
    priority: int = 0
    domains: list[str] = []
    client_ips: list[str] = []
    block_ips: list[str] = []
    action: Action = "forward"
    targets: list[str] = []
    balance: Balance = "round-robin"
    connect_retries: Count = 2
    proxy_protocol: Literal["", "v1", "v2"] = ""
    accept_proxy_protocol: bool = False
    bridge_to: str = "internal"
    # A "package.module:function" string in a route file; in code, the async callable itself.
    handler: Any = ""
    offload_fallback: Literal["", "forward"] = ""
    preserve_source_ip: bool = False
    warm: Count = 0
    health_check: HealthCheck | None = None
    circuit_breaker: CircuitBreaker | None = None
    tls: TLS | None = None
    # Per-route overrides of [settings]; None means "as in [settings]".
    connect_timeout: Duration | None = None
    initial_data_timeout: Duration | None = None
    inactivity_timeout: Duration | None = None
    half_close_timeout: Duration | None = None
    max_lifetime: Duration | None = None
    keepalive: Keepalive | None = None
    keepalive_multiplier: PositiveInt | None = None
    tcp_keepalive: Duration | None = None
    max_connections: Count | None = None
    max_connections_per_ip: Count | None = None
    connection_rate_per_ip: Rate | None = None


# Keys of [settings] that a route may repeat to override them for itself: the ones both declare.
ROUTE_OVERRIDES = tuple(name for name in Settings.__struct_fields__ if name in Route.__struct_fields__)


class Config(_Struct):
    """A whole route file: settings and routes."""

    settings: Settings = msgspec.field(default_factory=Settings)
    routes: list[Route] = []


_DECODERS: dict[str, Callable[..., Any]] = {
    ".toml": msgspec.toml.decode,
    ".yaml": msgspec.yaml.decode,
    ".yml": msgspec.yaml.decode,
    ".json": msgspec.json.decode,
}


def parse_config(data: bytes | str, suffix: str, source: str = "") -> Config:
    """Decode a route file's text; `suffix` (".toml", ".yaml", ".yml", ".json") picks the format."""
    decode = _DECODERS.get(suffix.lower())
    if decode is None:
        raise ConfigError([f"unknown route file type {suffix!r}: expected .toml, .yaml, .yml or .json"], source)
    try:
        config: Config = decode(data, type=Config)
        return config
    except msgspec.ValidationError as exc:
        message = str(exc)
        if " - at `" not in message:  # msgspec names no path for the top level; we always do
            message += " - at `$`"
        raise ConfigError([message], source) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Syntax errors carry their own position ("line 3, column 1") instead of a path.
        raise ConfigError([f"invalid {suffix.lstrip('.').upper()}: {exc}"], source) from None


def read_config(path: str | pathlib.Path) -> Config:
    """Read a route file (TOML, YAML or JSON by its extension) into its typed structures.

    Raises ConfigError naming the file and the path of each value of the wrong shape. What
    the shape cannot say (durations, CIDRs, targets, certificates, cross-route rules) is
    checked when the table is compiled (`triofwd.load_config` does both).
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read route file: {exc.strerror or exc}"], str(path)) from None
    config = parse_config(data, path.suffix, str(path))
    _resolve_paths(config, path.parent)
    return config


def _resolve_paths(config: Config, base: pathlib.Path) -> None:
    """Relative certificate paths in a route file are relative to the file's folder."""
    for route in config.routes:
        if route.tls is not None:
            for key in ("cert", "key", "target_ca"):
                value = getattr(route.tls, key)
                if value and not pathlib.Path(value).is_absolute():
                    setattr(route.tls, key, str(base / value))


# -- value parsers (pure) -------------------------------------------------------------

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"^(\d+)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour)$")
_RATE_UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
}  # fmt: skip


def parse_duration(text: str) -> float:
    """Seconds for "250ms", "30s", "5m", "4h", "7d"; "0" (or any zero, "0s") means off: math.inf."""
    if text.strip() == "0":
        return math.inf
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f'invalid duration {text!r}: expected a number and a unit (ms, s, m, h, d), e.g. "250ms", "30s", "5m", or "0" for off')
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return seconds if seconds > 0 else math.inf  # a zero timeout would end everything at once


def parse_rate(text: str) -> tuple[int, float] | None:
    """(count, period in seconds) for "300/min", "10/5s"; "0" means off and gives None."""
    if text.strip() == "0":
        return None
    m = _RATE_RE.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f'invalid rate {text!r}: expected COUNT/UNIT with unit s, min or hour, e.g. "300/min", or "0" for off')
    per = float(m.group(2) or 1) * _RATE_UNITS[m.group(3)]
    if per <= 0:
        raise ValueError(f"invalid rate {text!r}: the period must be longer than zero")
    return int(m.group(1)), per


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network for "10.0.0.0/8", "::1" or "192.0.2.7" (a host is a /32 or /128)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"invalid CIDR {text!r}: expected an address or address/prefix") from None


# Used with fullmatch: a "$" would let a final "\n" through.
_HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?")


def parse_target(text: str) -> tuple[str, int]:
    """(host, port) for "10.0.0.5:22", "[::1]:22" or "db.internal:5432"."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid target {text!r}: expected [IPv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid target {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"invalid target {text!r}: expected host:port")
        if ":" in host:
            raise ValueError(f"invalid target {text!r}: write an IPv6 target as [address]:port")
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"invalid target {text!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"invalid target {text!r}: port must be 1-65535")
    return host, int(port)


def parse_ports(spec: int | str) -> range:
    """The listen ports of one `ports` entry: 2222 or "8000-8010"."""
    if isinstance(spec, int):
        if not 0 <= spec <= 65535:  # a Config built in code has not been through msgspec's check
            raise ValueError(f"invalid port {spec!r}: expected 0-65535")
        return range(spec, spec + 1)
    lo, _, hi = spec.partition("-")
    first, last = int(lo), int(hi)
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"invalid port range {spec!r}: expected LOW-HIGH within 1-65535")
    return range(first, last + 1)
