"""Route files: typed structures decoded by msgspec, and the small value parsers.

msgspec checks the *shape* of a route file (types, ranges, unknown keys) and reports
the path of the bad value. What msgspec cannot express — durations, rates, CIDRs,
targets, cross-route rules — is checked when the file is compiled into a route table
(`triofwd._table.compile_table`, the layer above), with errors in the same
"message - at `$.path`" form. This module is the schema and the value parsers only.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import ipaddress
import math
import os
import pathlib
import re
import types
import typing
from collections.abc import Callable, Iterable
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
    "ShapeError",
    "User",
    "parse_config",
    "read_config",
    "worker_count",
]

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PortRange = Annotated[str, msgspec.Meta(pattern=r"^\d{1,5}-\d{1,5}$")]
# Durations and rates are strings that the table parses (parse_duration, parse_rate). Their
# patterns, which accept what those parsers accept, are for the JSON Schema editors check
# route files with (`triofwd schema`); the loader's own errors say more than a regex.
DURATION_PATTERN = r"^\s*(0|\d+(\.\d+)?(ms|s|m|h|d))\s*$"
RATE_PATTERN = r"^\s*(0|\d+\s*/\s*\d*\s*(s|sec|second|m|min|minute|h|hour))\s*$"
Duration = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": DURATION_PATTERN})]  # "250ms" | "30s" | "5m" | "4h" | "7d" | "0"
Rate = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": RATE_PATTERN})]  # "300/min" | "10/5s" | "0"
Keepalive = Literal["standard", "immortal", "extended"]
Action = Literal["forward", "bridge", "offload", "reject", "handler", "socks5", "http_connect"]
Protocol = Literal["tcp", "udp"]
Balance = Literal["round-robin", "least-connections", "random", "first"]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Count = Annotated[int, msgspec.Meta(ge=0)]
# Worker processes: a number, or "auto" for one per CPU this process may run on. ("auto" by
# a pattern, not a Literal: a Literal in a union would make the table check the key as a choice.)
Workers = PositiveInt | Annotated[str, msgspec.Meta(pattern="^auto$")]


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
    workers: Workers = 1


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


class User(_Struct):
    """One user of a `socks5` or `http_connect` route. The password is the password itself,
    "env:VARIABLE" (read from the environment when the file is loaded) or a salted hash,
    "scrypt$<salt>$<hash>" (`triofwd._credentials.hash_password` makes one)."""

    name: str
    password: str


class Route(_Struct):
    """One route: which connections it takes (ports, addresses, names) and what it does."""

    name: str
    ports: list[Port | PortRange]
    bind: str = "0.0.0.0"
    priority: int = 0
    domains: list[str] = []
    client_ips: list[str] = []
    block_ips: list[str] = []
    protocol: Protocol = "tcp"
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
    # socks5 / http_connect: where clients may ask to go ("CIDR:ports", "name:ports",
    # "*.example.com:ports"), and who may ask (empty: no authentication).
    destinations: list[str] = []
    users: list[User] = []
    # protocol = "udp": a session ends after this many replies from its target (0: its
    # inactivity_timeout governs).
    responses: Count = 0
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


class ShapeError(ConfigError):
    """A route file of the wrong shape: every such error, and the part of the file that is sound.

    `sound` is the file without its routes that have errors and without its bad [settings]
    keys (their defaults instead), so that `triofwd check` can look for the errors only a
    compile finds (durations, CIDRs, targets...) in the rest of the file too, as `haproxy -c`
    reports every error in one run. `kept[i]` is the index in the file of `sound.routes[i]`.
    """

    def __init__(
        self, errors: list[str], source: str = "", sound: Config | None = None, kept: tuple[int, ...] = (), dropped: frozenset[str] = frozenset()
    ) -> None:
        super().__init__(errors, source)
        self.sound = sound
        self.kept = kept
        self.dropped = dropped  # [settings] keys left out of `sound`

    def with_compile_errors(self, lines: list[str]) -> list[str]:
        """These errors and those a compile of `sound` found (`lines`), in the file's terms and
        order: route paths renumbered to the file's, [settings] first, then route by route;
        lines that may only follow from a dropped [settings] key left out (a route's
        `accept_proxy_protocol` without trusted_proxies)."""
        renumber = functools.partial(_ROUTE_PATH_RE.sub, lambda m: f"$.routes[{self.kept[int(m.group(1))]}]")
        mentions = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(self.dropped))) + r")\b") if self.dropped else None
        more = [renumber(line) for line in lines if mentions is None or not mentions.search(line.partition(" - at `")[0])]
        return sorted([*self.errors, *more], key=_place_in_file)


_ROUTE_PATH_RE = re.compile(r"\$\.routes\[(\d+)\]")


def _place_in_file(line: str) -> tuple[int, int]:
    """Where an error line's path is: the top level, [settings], then the routes in order."""
    path = line.rpartition(" - at `")[2]
    if path.startswith("$.settings"):
        return 1, 0
    route = _ROUTE_PATH_RE.match(path)
    return (2, int(route.group(1))) if route else (0, 0)


# Conversion as msgspec.toml and msgspec.yaml do it after parsing (dates stay dates).
_CONVERT: dict[str, Any] = {"builtin_types": (datetime.datetime, datetime.date, datetime.time), "str_keys": True}
_BAD = object()  # a list item with errors, in the sound part of a file


def parse_config(data: bytes | str, suffix: str, source: str = "") -> Config:
    """Decode a route file's text; `suffix` (".toml", ".yaml", ".yml", ".json") picks the format.

    A file of the wrong shape raises ShapeError with every error of its shape, each naming
    the path of the bad value, and a close match for a misspelt key ("did you mean ...").
    """
    decode = _DECODERS.get(suffix.lower())
    if decode is None:
        raise ConfigError([f"unknown route file type {suffix!r}: expected .toml, .yaml, .yml or .json"], source)
    try:
        raw = decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Syntax errors carry their own position ("line 3, column 1") instead of a path.
        raise ConfigError([f"invalid {suffix.lstrip('.').upper()}: {exc}"], source) from None
    try:
        config: Config = msgspec.convert(raw, Config, **_CONVERT)
        return config
    except msgspec.ValidationError:
        pass  # msgspec stops at the first error: walk the file for all of them
    errors: list[str] = []
    sound = _check_struct(Config, raw, "$", errors)
    if not errors:  # msgspec saw an error the walk did not: report msgspec's own
        errors.append(_at(_convert_error(raw, Config), "$"))
    raise _shape_error(errors, source, raw, sound)


def _shape_error(errors: list[str], source: str, raw: Any, sound: Any) -> ShapeError:
    """The ShapeError for `errors`, with the sound part of the file (`sound`, from the walk)."""
    if not isinstance(sound, dict):
        return ShapeError(errors, source)
    routes = sound.get("routes") or []
    settings = sound.get("settings") or {}
    kept = tuple(i for i, route in enumerate(routes) if route is not _BAD)
    try:
        config = msgspec.convert({"settings": settings, "routes": [routes[i] for i in kept]}, Config, **_CONVERT)
    except msgspec.ValidationError:  # not expected: every part was checked; then no second look
        return ShapeError(errors, source)
    given = raw.get("settings")
    # Known [settings] keys the file gives but `sound` leaves out (all of them when [settings] is no table).
    dropped = set(given) if isinstance(given, dict) else set(Settings.__struct_fields__) if "settings" in raw else set()
    return ShapeError(errors, source, config, kept, frozenset((dropped & set(Settings.__struct_fields__)) - set(settings)))


def _check_struct(struct: type[msgspec.Struct], raw: Any, path: str, errors: list[str]) -> Any:
    """Add an error for each bad value of `raw` against `struct`; return its sound keys (a
    dict without the bad ones), or _BAD when `raw` is not an object at all."""
    if not isinstance(raw, dict):
        errors.append(_at(_convert_error(raw, struct), path))
        return _BAD
    fields = _fields_of(struct)
    sound: dict[str, Any] = {}
    for key, value in raw.items():
        field = fields.get(key)
        if field is None:
            errors.append(f"Object contains unknown field `{key}`{did_you_mean(str(key), fields) or _one_level_down(str(key), struct)} - at `{path}`")
            continue
        before = len(errors)
        checked = _check_value(field.type, value, f"{path}.{key}", errors)
        # A table keeps its sound keys and a list of tables its sound items (the bad ones
        # marked, so that indices hold); any other value with an error is left out whole.
        if len(errors) == before or (checked is not _BAD and _has_tables(field.type)):
            sound[key] = checked
    errors.extend(f"Object missing required field `{name}` - at `{path}`" for name, f in fields.items() if f.required and name not in raw)
    return sound


def _check_value(hint: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Check one value against its type hint: structs key by key, lists item by item, the
    rest by msgspec. Returns the value (a struct's sound keys; a bad list item as _BAD)."""
    struct, optional = _struct_in(hint)
    if struct is not None:
        if value is None and optional:
            return None
        return _check_struct(struct, value, path, errors) if isinstance(value, dict) else _convert(hint, value, path, errors)
    if typing.get_origin(hint) is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        checked = []
        for i, element in enumerate(value):
            before = len(errors)
            result = _check_value(item, element, f"{path}[{i}]", errors)
            checked.append(result if len(errors) == before else _BAD)
        return checked
    return _convert(hint, value, path, errors)


@functools.cache
def _fields_of(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    # Once per struct: msgspec evaluates the annotations on every call (3 s for 1,500 routes).
    return {f.name: f for f in msgspec.structs.fields(struct)}


def _has_tables(hint: Any) -> bool:
    """A struct, or a list of them."""
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return _struct_in(hint)[0] is not None


def _struct_in(hint: Any) -> tuple[type[msgspec.Struct] | None, bool]:
    """The struct type of `hint` (a Struct, or a Struct | None) and whether None is allowed."""
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return hint, False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        structs = [a for a in args if isinstance(a, type) and issubclass(a, msgspec.Struct)]
        if len(structs) == 1 and set(args) == {structs[0], type(None)}:
            return structs[0], True
    return None, False


def _convert(hint: Any, value: Any, path: str, errors: list[str]) -> Any:
    try:
        return msgspec.convert(value, hint, **_CONVERT)
    except msgspec.ValidationError as exc:
        errors.append(_at(exc, path))
        return _BAD


def _convert_error(raw: Any, hint: Any) -> msgspec.ValidationError:
    try:
        msgspec.convert(raw, hint, **_CONVERT)
    except msgspec.ValidationError as exc:
        return exc
    return msgspec.ValidationError("Invalid value")


def _at(exc: msgspec.ValidationError, path: str) -> str:
    """msgspec's message for a value checked on its own, with the value's path in the file."""
    message = str(exc)
    if " - at `$" in message:  # a path inside the value: `$[0]` -> `$.routes[1].ports[0]`
        return message.replace(" - at `$", f" - at `{path}", 1)
    return f"{message} - at `{path}`"


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """' (did you mean `name`?)' for the valid key closest to a misspelt one, else ''."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _one_level_down(key: str, struct: type[msgspec.Struct]) -> str:
    """' (did you mean `tls.mode`?)' for a key of a table inside this one (a route's `mode`)."""
    for field in _fields_of(struct).values():
        inner, _ = _struct_in(field.type)
        if inner is not None and key in inner.__struct_fields__:
            return f" (did you mean `{field.name}.{key}`?)"
    return ""


def read_config(path: str | pathlib.Path) -> Config:
    """Read a route file (TOML, YAML or JSON by its extension) into its typed structures.

    Raises ConfigError naming the file and the path of each value of the wrong shape (a
    ShapeError, with the sound rest of the file). What the shape cannot say (durations,
    CIDRs, targets, certificates, cross-route rules) is checked when the table is compiled
    (`triofwd.load_config` does both).
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read route file: {exc.strerror or exc}"], str(path)) from None
    try:
        config = parse_config(data, path.suffix, str(path))
    except ShapeError as exc:
        if exc.sound is not None:
            _resolve_paths(exc.sound, path.parent)
        raise
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


def worker_count(workers: int | str) -> int:
    """How many worker processes `[settings] workers` asks for: "auto" is one per usable CPU."""
    return len(os.sched_getaffinity(0)) if workers == "auto" else int(workers)


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
