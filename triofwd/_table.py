"""The route table: a Config compiled into what the accept path needs, and matching.

Pure code: no sockets, no trio. `compile_table` is where every semantic check of a
route file lives (durations, CIDRs, targets, handlers, cross-route rules), so a file
that `triofwd check` accepts is one `serve` can run, and a Config built in code gets
the same checks. `RouteTable.match` picks the route for one connection.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import ipaddress
import math
import pathlib
import re
import ssl
import types
import typing
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ._addresses import UDP_OWNER, IPNetwork, ListenKey, client_address, in_any
from ._config import ROUTE_OVERRIDES, TLS, Config, Route, Settings, parse_cidr, parse_duration, parse_ports, parse_rate, parse_target, read_config
from ._credentials import Users, compile_users
from ._destinations import Destinations, compile_destinations
from ._errors import ConfigError
from ._health import CheckPolicy, CircuitPolicy
from ._limits import Limits
from ._nft import ROUTE_NAME_RE, NftError, OffloadRule, check_rules, validate_rule
from ._policy import DURATION_KEYS, Policy
from ._reasons import Reason
from ._tls import RouteTLS

# What stats, metrics and the status page call connections that no route took: no route
# may have that name (the stats module's UNROUTED; tests check the two agree).
UNROUTED_NAME = "-"

__all__ = ["CompiledRoute", "RouteTable", "as_table", "compile_table", "load_config", "load_table", "route_changes"]


# What a route does with a connection, decided when the table is compiled: action =
# "bridge" is one of three things, by where the TLS ends.
BRIDGES = ("terminate", "reencrypt", "bridge_to")
DIALING = ("forward", *BRIDGES)
# The client names its destination (SOCKS5, HTTP CONNECT): checked against `destinations`.
DYNAMIC = ("socks5", "http_connect")
KINDS = (*DIALING, *DYNAMIC, "handler", "reject", "offload")

# protocol = "udp": a session's inactivity_timeout when the route sets none (a UDP flow has
# no end of its own; [settings]' hour is a TCP connection's).
UDP_INACTIVITY_TIMEOUT = "60s"
# What a UDP route may do; and the keys that mean nothing without a TCP stream, each
# refused on a UDP route with the reason.
UDP_ACTIONS = ("forward", "reject", "offload", "handler")
UDP_REFUSED_KEYS = {
    "domains": "there is no TLS ClientHello to read a name from",
    "tls": "there is no TLS stream to pass through or terminate",
    "proxy_protocol": "the PROXY header is sent at the start of a TCP stream",
    "accept_proxy_protocol": "the PROXY header comes at the start of a TCP stream",
    "half_close_timeout": "a datagram flow has no half-close",
    "initial_data_timeout": "every datagram is routed as it comes",
    "tcp_keepalive": "kernel keep-alive probes are TCP's",
    "warm": "a session's socket is connected when its first datagram comes",
    "circuit_breaker": "a UDP target does not refuse a connect",
}

# Route names appear in logs, metric labels and (offload) nftables rules: keep them plain.
DOMAIN_PATTERN_RE = re.compile(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class CompiledRoute:
    """One route, checked and ready for the accept path."""

    name: str
    index: int
    priority: int
    bind: str
    ports: tuple[int, ...]
    domains: tuple[str, ...]
    client_ips: tuple[IPNetwork, ...]
    block_ips: tuple[IPNetwork, ...]
    action: str  # as written: forward | bridge | offload | reject | handler | socks5 | http_connect
    kind: str  # what runs, decided here: one of KINDS
    targets: tuple[tuple[str, int], ...]
    balance: str
    connect_retries: int
    handler: Callable[..., Any] | None
    policy: Policy
    limits: Limits  # this route's own limits, where it overrides [settings]
    proxy_protocol: str  # "", "v1", "v2": header sent to the target
    accept_proxy_protocol: bool
    tls: RouteTLS | None
    bridge_to: tuple[str, int] | None  # action = "bridge" to an external terminator; None: built-in
    health: CheckPolicy | None  # active health checks of the targets
    circuit: CircuitPolicy | None  # passive health: the targets' circuit breaker
    warm: int  # connected sockets kept ready per target
    spec: Route  # as written, for the inspector and for reload diffs
    destinations: Destinations | None = None  # socks5 / http_connect: the allow-list
    users: Users | None = None  # socks5 / http_connect: who may use it (empty: anyone)
    protocol: str = "tcp"  # tcp | udp
    responses: int = 0  # udp: replies after which a session ends (0: inactivity governs)

    @property
    def dials(self) -> bool:
        """It connects to targets in user space (and keeps their health, warm sockets)."""
        return self.kind in DIALING

    def listen_keys(self) -> list[ListenKey]:
        udp = UDP_OWNER if self.protocol == "udp" else ""
        if self.ports == (0,):
            return [(self.bind, 0, self.name + udp)]
        return [(self.bind, port, udp) for port in self.ports]


@dataclasses.dataclass(frozen=True, eq=False)
class RouteTable:
    """Compiled routes, grouped by the listener they arrive on."""

    routes: tuple[CompiledRoute, ...]
    by_listener: dict[ListenKey, tuple[CompiledRoute, ...]]
    policy: Policy  # [settings], for connections not (yet) on a route
    limits: Limits  # process-wide
    shutdown_grace: float
    trusted_proxies: tuple[IPNetwork, ...]
    config: Config

    def route(self, name: str) -> CompiledRoute | None:
        return next((r for r in self.routes if r.name == name), None)

    # Per listener, whether connections must send first bytes before routing: known once the
    # table is built, so the accept path looks it up instead of scanning the routes each time.
    _accepts_proxy: frozenset[ListenKey] = dataclasses.field(init=False, repr=False)
    _reads_hello: frozenset[ListenKey] = dataclasses.field(init=False, repr=False)
    _first_bytes_timeout: dict[ListenKey, float] = dataclasses.field(init=False, repr=False)
    _keepalive: dict[ListenKey, float] = dataclasses.field(init=False, repr=False)
    _filters_ips: frozenset[ListenKey] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        items = self.by_listener.items()
        object.__setattr__(self, "_accepts_proxy", frozenset(k for k, rs in items if any(r.accept_proxy_protocol for r in rs)))
        object.__setattr__(self, "_reads_hello", frozenset(k for k, rs in items if any(r.domains or r.kind in BRIDGES for r in rs)))
        object.__setattr__(self, "_first_bytes_timeout", {k: max(r.policy.initial_data_timeout for r in rs) for k, rs in items})
        object.__setattr__(self, "_filters_ips", frozenset(k for k, rs in items if any(r.client_ips or r.block_ips for r in rs)))
        shared = {k: {r.policy.tcp_keepalive for r in rs} for k, rs in items}
        object.__setattr__(self, "_keepalive", {k: values.pop() for k, values in shared.items() if len(values) == 1})

    def listener_keepalive(self, key: ListenKey) -> float | None:
        """The tcp_keepalive every route of this listener has (its accepted sockets inherit
        it from the listening socket), or None when they differ (each sets its own)."""
        return self._keepalive.get(key)

    def accepts_proxy(self, key: ListenKey) -> bool:
        """Connections on this listener may start with a PROXY header (from trusted_proxies).

        The header comes before any route is chosen, so it is a property of the port: one
        route on it with accept_proxy_protocol makes the whole port accept the header.
        """
        return key in self._accepts_proxy

    def reads_client_hello(self, key: ListenKey) -> bool:
        """Routing on this listener needs the TLS ClientHello (SNI domains, or a bridge)."""
        return key in self._reads_hello

    def reads_first_bytes(self, key: ListenKey) -> bool:
        return key in self._accepts_proxy or key in self._reads_hello

    def first_bytes_timeout(self, key: ListenKey) -> float:
        """How long this listener waits for the first bytes that pick a route.

        The bytes decide the route, so no route's own initial_data_timeout applies yet:
        the listener waits as long as the most patient of its routes (each one's own
        value, else [settings]), so no route's clients are cut off sooner than it allows.
        """
        return self._first_bytes_timeout.get(key, self.policy.initial_data_timeout)

    def is_trusted_proxy(self, ip: str) -> bool:
        return bool(self.trusted_proxies) and in_any(client_address(ip), self.trusted_proxies)

    def match(self, key: ListenKey, client_ip: str, sni: str | None = None) -> CompiledRoute | Reason:
        """The route for a connection, or the reason there is none.

        Routes are tried by priority (higher first), then file order. A route whose
        `client_ips` does not include the client, or whose `domains` do not match, is
        skipped. A route that matches but lists the client in `block_ips` ends the
        connection with `ip_blocked`. Nothing left: `ip_blocked` if an allow list turned
        the client away, else `no_route`.
        """
        # Parsing the address costs more than the rest of the match: only where a list needs it.
        ip = client_address(client_ip) if key in self._filters_ips else None
        turned_away = False
        for route in self.by_listener.get(key, ()):
            if route.domains and not (sni and any(domain_matches(p, sni) for p in route.domains)):
                continue
            if ip is not None:
                if route.client_ips and not in_any(ip, route.client_ips):
                    turned_away = True
                    continue
                if in_any(ip, route.block_ips):
                    return Reason.IP_BLOCKED
            return route
        return Reason.IP_BLOCKED if turned_away else Reason.NO_ROUTE


def route_changes(old: RouteTable, new: RouteTable) -> dict[str, list[str]]:
    """What a reload changes, by route name: added, removed, and changed (its spec differs)."""
    before, after = {r.name: r for r in old.routes}, {r.name: r for r in new.routes}
    return {
        "added": sorted(after.keys() - before.keys()),
        "removed": sorted(before.keys() - after.keys()),
        "changed": sorted(n for n in before.keys() & after.keys() if before[n].spec != after[n].spec),
    }


def domain_matches(pattern: str, name: str) -> bool:
    """SNI pattern match: exact ("example.com") or one-label wildcard ("*.example.com").

    As in certificates (RFC 6125 6.4.3), "*" stands for exactly one label, so
    "*.example.com" matches "a.example.com" but neither "example.com" nor "a.b.example.com".
    """
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return pattern == name


# -- compiling ------------------------------------------------------------------------


class _Errors:
    """Collects "message - at `$.path`" lines, the msgspec form, so all errors read alike."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{message} - at `{path}`")

    def parse(self, path: str, parser: Callable[[Any], Any], value: Any, default: Any = None) -> Any:
        try:
            return parser(value)
        except ValueError as exc:
            self.add(path, str(exc))
            return default


def _policy(errors: _Errors, path: str, values: dict[str, Any], fallback: Policy | None = None) -> Policy:
    """Parse the policy keys of `values`; a None value takes `fallback`'s (already parsed) one."""
    parsed: dict[str, Any] = {}
    for field in dataclasses.fields(Policy):
        value = values[field.name]
        if value is None and fallback is not None:
            parsed[field.name] = getattr(fallback, field.name)
        elif field.name in DURATION_KEYS:
            parsed[field.name] = errors.parse(f"{path}.{field.name}", parse_duration, value, math.inf)
        else:
            parsed[field.name] = value
    return Policy(**parsed)


def _limits(errors: _Errors, path: str, values: dict[str, Any]) -> Limits:
    rate = values.get("connection_rate_per_ip")
    return Limits(
        max_connections=values.get("max_connections") or 0,
        max_connections_per_ip=values.get("max_connections_per_ip") or 0,
        connection_rate_per_ip=None if rate is None else errors.parse(f"{path}.connection_rate_per_ip", parse_rate, rate),
    )


def _is_async(obj: Any) -> bool:
    # A callable object's __call__ is async: an instance with `async def __call__` is a handler too.
    return inspect.iscoroutinefunction(obj) or (callable(obj) and inspect.iscoroutinefunction(type(obj).__call__))


def _resolve_handler(spec: Any) -> Callable[..., Any]:
    if callable(spec):
        if not _is_async(spec):
            raise ValueError(f"handler {spec!r} must be an async callable (stream, info), or (session, info) on a UDP route")
        handler: Callable[..., Any] = spec
        return handler
    if not isinstance(spec, str) or not spec:
        raise ValueError('action = "handler" needs handler = "package.module:function"')
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f'invalid handler {spec!r}: expected "package.module:function"')
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - an import runs arbitrary code: report any failure as a config error
        raise ValueError(f"cannot import handler module {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise ValueError(f"handler {spec!r} is not a callable in {module_name!r}")
    if not _is_async(obj):
        raise ValueError(f"handler {spec!r} must be an async callable (stream, info), or (session, info) on a UDP route")
    found: Callable[..., Any] = obj
    return found


def _check_choices(errors: _Errors, path: str, obj: Route | Settings) -> None:
    """A Config built in code skips msgspec's decoding: check its fixed-choice keys here too."""
    for name, choices in _choices_of(type(obj)).items():
        value = getattr(obj, name)
        if value is not None and value not in choices:
            errors.add(f"{path}.{name}", f"invalid value {value!r}: expected one of {', '.join(map(repr, choices))}")


@functools.cache
def _choices_of(struct: type) -> dict[str, tuple[Any, ...]]:
    """The fixed-choice keys of a struct and their choices: read from its type hints once
    (evaluating them was half the time of compiling a table of a thousand routes)."""
    hints = typing.get_type_hints(struct, include_extras=True)
    return {name: choices for name, hint in hints.items() if (choices := _literal_choices(hint))}


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(c for arg in typing.get_args(hint) for c in _literal_choices(arg))
    return ()


def _compile_tls(errors: _Errors, path: str, route: Route, loaded: dict[tuple[str, ...], RouteTLS]) -> tuple[RouteTLS | None, tuple[str, int] | None]:
    """TLS and bridge settings: which combinations make sense, and the contexts (certificates
    read now; routes with the same TLS settings share one RouteTLS, so each file is read once
    per compile however many routes name it)."""
    tls = route.tls
    bridge_to = None
    before = len(errors.lines)
    if route.action == "bridge" and route.bridge_to != "internal":
        bridge_to = errors.parse(f"{path}.bridge_to", parse_target, route.bridge_to)
    elif route.action != "bridge" and route.bridge_to != "internal":
        errors.add(f"{path}.bridge_to", 'bridge_to is only used with action = "bridge"')
    if tls is None:
        if route.action == "bridge" and bridge_to is None:
            errors.add(f"{path}.tls", 'action = "bridge" to the built-in terminator needs [routes.tls] with mode, cert and key')
        return None, bridge_to
    if tls.mode == "passthrough":
        if route.action == "bridge" and bridge_to is None:
            errors.add(f"{path}.tls.mode", 'the built-in terminator needs tls.mode = "terminate" or "reencrypt"')
        return _route_tls(tls, loaded), bridge_to
    if route.action != "bridge" or bridge_to is not None:
        errors.add(f"{path}.tls.mode", f'tls.mode = "{tls.mode}" needs action = "bridge" with bridge_to = "internal"')
        return None, bridge_to
    for key in ("cert", "key"):
        if not getattr(tls, key):
            errors.add(f"{path}.tls.{key}", f"tls.{key} is needed to terminate TLS")
    if tls.mode != "reencrypt" and (tls.target_ca or tls.target_sni):
        errors.add(f"{path}.tls", 'target_ca and target_sni are only used with tls.mode = "reencrypt"')
    if len(errors.lines) > before:
        return None, bridge_to
    try:
        return _route_tls(tls, loaded), bridge_to
    except (OSError, ssl.SSLError) as exc:
        where = "target_ca" if tls.target_ca and tls.target_ca in str(exc) else "cert"
        errors.add(f"{path}.tls.{where}", f"cannot load TLS certificate or key: {getattr(exc, 'strerror', None) or exc}")
        return None, bridge_to


def _route_tls(spec: TLS, loaded: dict[tuple[str, ...], RouteTLS]) -> RouteTLS:
    key = tuple(getattr(spec, name) for name in spec.__struct_fields__)
    found = loaded.get(key)
    if found is None:
        found = loaded[key] = RouteTLS(spec)
    return found


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds == math.inf:
        raise ValueError(f'invalid duration {text!r}: this one cannot be off, give a positive duration such as "1s"')
    return seconds


def _compile_target_health(errors: _Errors, path: str, route: Route) -> tuple[CheckPolicy | None, CircuitPolicy | None]:
    """health_check, circuit_breaker and warm: for routes that dial targets in user space."""
    dials = route.action in ("forward", "bridge")
    for key in ("health_check", "circuit_breaker", "warm"):
        if getattr(route, key) and not dials:
            why = "the kernel forwards it" if route.action == "offload" else "it has no targets"
            errors.add(f"{path}.{key}", f'{key} is only used with action = "forward" or "bridge" ({route.action}: {why})')
    check = circuit = None
    spec = route.health_check
    if spec is not None and dials:
        interval = errors.parse(f"{path}.health_check.interval", _positive_duration, spec.interval, 1.0)
        timeout = errors.parse(f"{path}.health_check.timeout", _positive_duration, spec.timeout, 1.0)
        udp = route.protocol == "udp"
        if udp and not spec.send:
            # A connect proves nothing over UDP, and an empty datagram gets no answer from most servers.
            errors.add(
                f"{path}.health_check.send",
                "a UDP route's health check needs send: the datagram each check sends (its reply, matching expect if given, is the pass)",
            )
        check = CheckPolicy(interval, timeout, spec.rise, spec.fall, spec.send.encode(), spec.expect.encode(), udp)
    breaker = route.circuit_breaker
    if breaker is not None and dials:
        backoff = errors.parse(f"{path}.circuit_breaker.backoff", _positive_duration, breaker.backoff, 1.0)
        longest = errors.parse(f"{path}.circuit_breaker.max_backoff", _positive_duration, breaker.max_backoff, 1.0)
        if longest < backoff:
            errors.add(f"{path}.circuit_breaker.max_backoff", f"max_backoff {breaker.max_backoff!r} is shorter than backoff {breaker.backoff!r}")
        circuit = CircuitPolicy(breaker.failures, backoff, longest)
    return check, circuit


def _check_offload_keys(errors: _Errors, path: str, route: Route) -> None:
    if route.action != "offload":
        for key in ("offload_fallback", "preserve_source_ip"):
            if getattr(route, key):
                errors.add(f"{path}.{key}", f'{key} is only used with action = "offload"')


def _check_protocol(errors: _Errors, path: str, route: Route) -> None:
    """What a UDP route cannot use, refused with the path of the key; `responses` on a TCP one."""
    if route.protocol != "udp":
        if route.responses:
            errors.add(f"{path}.responses", 'responses is only used with protocol = "udp"')
        return
    if route.action not in UDP_ACTIONS:
        errors.add(f"{path}.action", f'action = "{route.action}" is not available with protocol = "udp": use "forward", "reject", "offload" or "handler"')
    for key, why in UDP_REFUSED_KEYS.items():
        if getattr(route, key) not in (None, False, 0, "", []):
            errors.add(f"{path}.{key}", f'{key} is not used with protocol = "udp": {why}')


def _compile_dynamic(errors: _Errors, path: str, route: Route, own: list[tuple[str, int]]) -> tuple[Destinations | None, Users | None]:
    """destinations and users: the allow-list and the users of a socks5 or http_connect
    route, refused on every other action; and what such a route cannot use (targets,
    domains, tls, balance: the client names the one destination)."""
    if route.action not in DYNAMIC:
        for key in ("destinations", "users"):
            if getattr(route, key):
                errors.add(f"{path}.{key}", f'{key} is only used with action = "socks5" or "http_connect"')
        return None, None
    why = f'action = "{route.action}" connects where the client asks'
    if route.targets:
        errors.add(f"{path}.targets", f"targets are not used with {why}: list what it may reach in destinations")
    if route.balance != "round-robin":
        errors.add(f"{path}.balance", f"balance is not used with {why}: it tries the destination's addresses in the resolver's order")
    if route.domains:
        errors.add(f"{path}.domains", f"domains are not used with {why}: its clients speak {'SOCKS5' if route.action == 'socks5' else 'HTTP'} first, not TLS")
    if route.tls is not None and route.tls.mode == "passthrough":
        errors.add(f"{path}.tls", f"tls is not used with {why}: the tunnel's bytes are passed on as they are")
    if not route.destinations:
        errors.add(f"{path}.destinations", f'action = "{route.action}" needs at least one destination (e.g. "*.example.com:443"): an empty list allows nothing')
    before = len(errors.lines)
    for j, entry in enumerate(route.destinations):
        errors.parse(f"{path}.destinations[{j}]", lambda text: compile_destinations([text]), entry)
    names: dict[str, int] = {}
    for j, user in enumerate(route.users):
        if user.name in names:
            errors.add(f"{path}.users[{j}].name", f"user {user.name!r} is listed twice (first at {path}.users[{names[user.name]}])")
            continue
        names[user.name] = j
        errors.parse(f"{path}.users[{j}]", lambda u: compile_users([(u.name, u.password)]), user)
    if len(errors.lines) > before:
        return None, None
    destinations = compile_destinations(route.destinations, own_addresses=own)
    return destinations, compile_users((user.name, user.password) for user in route.users)


def _own_addresses(config: Config) -> list[tuple[str, int]]:
    """Every (address, port) the table listens on, as far as the file fixes them (a port 0
    is known only once bound): no dynamic route may send a client back to one of them."""
    own: list[tuple[str, int]] = []
    for route in config.routes:
        for spec in route.ports:
            try:
                own.extend((str(ipaddress.ip_address(route.bind)), port) for port in parse_ports(spec) if port)
            except (ValueError, TypeError):
                continue  # reported where the route itself is compiled
    return own


def compile_table(config: Config) -> RouteTable:
    """Check a Config and build its route table; raise ConfigError listing every problem."""
    errors = _Errors()
    settings = config.settings
    base = {key: getattr(settings, key) for key in ROUTE_OVERRIDES}
    _check_choices(errors, "$.settings", settings)
    policy = _policy(errors, "$.settings", base)
    limits = _limits(errors, "$.settings", base)
    grace = errors.parse("$.settings.shutdown_grace", parse_duration, settings.shutdown_grace, 0.0)
    grace = 0.0 if grace == math.inf else grace  # "0": no grace period, close at once
    trusted = tuple(errors.parse(f"$.settings.trusted_proxies[{i}]", parse_cidr, c) for i, c in enumerate(settings.trusted_proxies))
    listening = _own_addresses(config)

    routes: list[CompiledRoute] = []
    seen: dict[str, int] = {}
    tls_loaded: dict[tuple[str, ...], RouteTLS] = {}
    for i, route in enumerate(config.routes):
        path = f"$.routes[{i}]"
        if not isinstance(route.name, str) or not ROUTE_NAME_RE.fullmatch(route.name):
            errors.add(f"{path}.name", f"invalid route name {route.name!r}: use 1-63 letters, digits, '_', '.' or '-'")
        elif route.name == UNROUTED_NAME:
            errors.add(
                f"{path}.name", f"route name {route.name!r} is reserved: it stands for connections no route took (in stats, metrics and the status page)"
            )
        elif route.name in seen:
            errors.add(f"{path}.name", f"duplicate route name {route.name!r} (first at $.routes[{seen[route.name]}])")
        else:
            seen[route.name] = i
        if not route.ports:
            errors.add(f"{path}.ports", "a route needs at least one port")
        ports: list[int] = []
        for j, spec in enumerate(route.ports):
            if spec == 0 and len(route.ports) > 1:
                errors.add(f"{path}.ports[{j}]", "port 0 (an ephemeral port) must be the route's only port")
            ports.extend(errors.parse(f"{path}.ports[{j}]", parse_ports, spec, range(0)))
        bind = route.bind
        try:
            bind = str(ipaddress.ip_address(route.bind))  # "::0" and "::" are one listener
        except ValueError:
            errors.add(f"{path}.bind", f"invalid bind address {route.bind!r}: expected an IP address such as 0.0.0.0 or ::")
        _check_choices(errors, path, route)
        client_ips = tuple(errors.parse(f"{path}.client_ips[{j}]", parse_cidr, c) for j, c in enumerate(route.client_ips))
        block_ips = tuple(errors.parse(f"{path}.block_ips[{j}]", parse_cidr, c) for j, c in enumerate(route.block_ips))
        targets = tuple(errors.parse(f"{path}.targets[{j}]", parse_target, t) for j, t in enumerate(route.targets))
        if not route.targets and (route.action in ("forward", "offload") or (route.action == "bridge" and route.bridge_to == "internal")):
            errors.add(f"{path}.targets", f'action = "{route.action}" needs at least one target')
        for j, pattern in enumerate(route.domains):
            if not DOMAIN_PATTERN_RE.fullmatch(pattern):
                errors.add(f"{path}.domains[{j}]", f"invalid domain pattern {pattern!r}: expected name.example or *.name.example")
        handler = None
        if route.action == "handler":
            handler = errors.parse(f"{path}.handler", _resolve_handler, route.handler)
        elif route.handler:
            errors.add(f"{path}.handler", 'handler is only used with action = "handler"')
        _check_offload_keys(errors, path, route)
        _check_protocol(errors, path, route)
        health, circuit = _compile_target_health(errors, path, route)
        tls, bridge_to = _compile_tls(errors, path, route, tls_loaded)
        destinations, users = _compile_dynamic(errors, path, route, listening)
        if bridge_to is not None:
            if route.targets:  # the external terminator has its own targets; ours would be ignored
                errors.add(f"{path}.targets", 'targets are not used with bridge_to = "host:port": the terminator there has its own')
            targets = (bridge_to,)  # the one hop this route dials
        if route.proxy_protocol and route.action in ("reject", "handler"):
            errors.add(f"{path}.proxy_protocol", f'proxy_protocol is the header sent to a target: action = "{route.action}" dials none')
        elif route.proxy_protocol and bridge_to is not None:
            errors.add(
                f"{path}.proxy_protocol",
                'proxy_protocol is not used with bridge_to = "host:port": the hop always carries PROXY v2, and the terminator there decides what its targets get',
            )
        if route.accept_proxy_protocol and not settings.trusted_proxies:
            errors.add(f"{path}.accept_proxy_protocol", "accept_proxy_protocol needs [settings] trusted_proxies: the addresses allowed to send the header")
        own = {key: getattr(route, key) for key in ROUTE_OVERRIDES}
        if route.protocol == "udp" and own["inactivity_timeout"] is None:
            own["inactivity_timeout"] = UDP_INACTIVITY_TIMEOUT
        routes.append(
            CompiledRoute(
                name=route.name,
                index=i,
                priority=route.priority,
                bind=bind,
                ports=tuple(ports),
                domains=tuple(d.lower().rstrip(".") for d in route.domains),
                client_ips=client_ips,
                block_ips=block_ips,
                action=route.action,
                kind=_kind(route, tls, bridge_to),
                targets=targets,
                balance=route.balance,
                connect_retries=route.connect_retries,
                handler=handler,
                policy=_policy(errors, path, own, fallback=policy),
                limits=_limits(errors, path, own),
                proxy_protocol=route.proxy_protocol,
                accept_proxy_protocol=route.accept_proxy_protocol,
                tls=tls,
                bridge_to=bridge_to,
                health=health,
                circuit=circuit,
                warm=route.warm if route.action in ("forward", "bridge") else 0,
                spec=route,
                destinations=destinations,
                users=users,
                protocol=route.protocol,
                responses=route.responses,
            )
        )
    if errors.lines:
        raise ConfigError(errors.lines)

    _check_offload(errors, routes)
    if errors.lines:
        raise ConfigError(errors.lines)
    return RouteTable(tuple(routes), _by_listener(routes), policy, limits, grace, trusted, config)


def _kind(route: Route, tls: RouteTLS | None, bridge_to: tuple[str, int] | None) -> str:
    if route.action != "bridge":
        return route.action
    if bridge_to is not None:
        return "bridge_to"
    return tls.mode if tls is not None else "terminate"  # no tls: refused above, never served


def load_table(path: str | pathlib.Path) -> RouteTable:
    """A route file read and compiled into its table (ConfigError naming the file and the
    path of each bad value): what start, reload and `check` each do, once."""
    config = read_config(path)
    try:
        return compile_table(config)
    except ConfigError as exc:
        raise ConfigError(exc.errors, str(path)) from None


# The table load_config compiled for each Config it returned (by the Config's id, while it
# lives), with a copy of the Config as it was: `as_table` takes it instead of compiling
# again while the Config is unchanged. (A Config is mutable, so it cannot key a dict itself.)
_COMPILED: dict[int, tuple[weakref.ref[Config], Config, RouteTable]] = {}


def load_config(path: str | pathlib.Path) -> Config:
    """Read and check a route file (TOML, YAML or JSON by its extension): a Config that can
    be served, or ConfigError naming the file and the path of each bad value.

    The table compiled to check it is kept for the first `serve` or `Forwarder.reload` of
    this Config, which uses it rather than compiling again (so certificates are read once),
    as long as the Config has not been changed since. Later ones compile afresh (a reload
    reads renewed certificates).
    """
    table = load_table(path)
    config, key = table.config, id(table.config)
    forget = functools.partial(_forget, _COMPILED, key)  # holds the dict itself: it may outlive the module's globals
    _COMPILED[key] = (weakref.ref(config, forget), copy.deepcopy(config), table)
    return config


def _forget(compiled: dict[int, Any], key: int, _: object) -> None:
    compiled.pop(key, None)


def as_table(config: Config | RouteTable) -> RouteTable:
    """A route table for `config`: as given, the one load_config compiled (taken once), or
    compiled now (ConfigError if it cannot be served)."""
    if isinstance(config, RouteTable):
        return config
    found = _COMPILED.pop(id(config), None)
    if found is not None and found[0]() is config and config == found[1]:
        return found[2]
    return compile_table(config)


def _by_listener(routes: Iterable[CompiledRoute]) -> dict[ListenKey, tuple[CompiledRoute, ...]]:
    by_listener: dict[ListenKey, list[CompiledRoute]] = {}
    for route in routes:
        for key in route.listen_keys():
            by_listener.setdefault(key, []).append(route)
    return {k: tuple(sorted(v, key=lambda r: (-r.priority, r.index))) for k, v in by_listener.items()}


def with_routes(table: RouteTable, routes: Iterable[CompiledRoute]) -> RouteTable:
    """The same table with its routes replaced (an offload route falling back to forward)."""
    routes = tuple(routes)
    return dataclasses.replace(table, routes=routes, by_listener=_by_listener(routes))


def offload_rules(routes: Iterable[CompiledRoute]) -> list[OffloadRule]:
    """The offload routes among `routes`, as the nftables renderer takes them."""
    return [offload_rule(route) for route in routes if route.action == "offload"]


def offload_rule(route: CompiledRoute) -> OffloadRule:
    """An offload route as the nftables renderer takes it."""
    return OffloadRule(
        name=route.name,
        listen_ports=route.ports,
        bind=route.bind,
        targets=route.targets,
        client_ips=tuple(str(net) for net in route.client_ips),
        block_ips=tuple(str(net) for net in route.block_ips),
        preserve_source_ip=route.spec.preserve_source_ip,
        protocol=route.protocol,
    )


def _check_offload(errors: _Errors, routes: list[CompiledRoute]) -> None:
    """Offload routes become nftables rules: refuse here what nft must never see (hostnames, overlaps)."""

    offload = [r for r in routes if r.action == "offload"]
    for route in offload:
        if route.domains or route.tls is not None or route.proxy_protocol or route.accept_proxy_protocol or route.handler:
            errors.add(f"$.routes[{route.index}].action", 'action = "offload" is forwarded by the kernel: domains, tls and PROXY protocol need user space')
            continue
        if 0 in route.ports:
            errors.add(f"$.routes[{route.index}].ports", 'action = "offload" needs fixed ports (0 picks a port only a listener knows)')
            continue
        try:
            validate_rule(offload_rule(route))
        except NftError as exc:
            errors.add(f"$.routes[{route.index}]", str(exc))
    if offload and not errors.lines:
        try:
            check_rules(offload_rules(offload))
        except NftError as exc:
            errors.add("$.routes", str(exc))
