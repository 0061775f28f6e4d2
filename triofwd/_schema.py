"""What every key of a route file means: one table, beside the structs it describes.

The JSON Schema that editors check route files with (`triofwd schema`) and the key
reference (docs/reference.md, `python -m triofwd._schema > docs/reference.md`) are both
made from the msgspec structs of `_config` and this table, so neither can drift from what
the loader accepts: tests/test_reference.py fails when a key has no entry here, when an
entry names a key that is gone, or when the reference in docs/ is not what this renders.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Iterator
from typing import Any

import msgspec

from ._config import DURATION_PATTERN, RATE_PATTERN, ROUTE_OVERRIDES, TLS, CircuitBreaker, Config, HealthCheck, Route, Settings, User

__all__ = ["KEYS", "Key", "key_docs", "reference_markdown", "route_file_schema", "schema_text", "structs"]

SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"  # the draft editors' checkers all speak


@dataclasses.dataclass(frozen=True)
class Key:
    """One key: what it means, and an example value written as in TOML."""

    meaning: str
    example: str
    type: str = ""  # the type as the reference shows it, where the annotation does not say it well
    schema: dict[str, Any] | None = None  # the key's JSON Schema, where msgspec's would not do for a file


# fmt: off
KEYS: dict[type[msgspec.Struct], dict[str, Key]] = {
    Config: {
        "settings": Key("Process-wide defaults and limits. Every key is optional.", '{ connect_timeout = "5s" }'),
        "routes": Key("The routes: which connections each one takes and what it does with them. Written `[[routes]]` in TOML.",
                      '[{ name = "ssh", ports = [2222], targets = ["10.0.0.5:22"] }]'),
    },
    Settings: {
        "connect_timeout": Key("How long a connect to a target may take before the next target is tried (or the connection ends with `connect_timeout`).", '"5s"'),
        "initial_data_timeout": Key("How long a port that reads the first bytes before routing (a route with `domains`, a bridge, a PROXY header) waits for them; then `initial_data_timeout`.", '"10s"'),
        "inactivity_timeout": Key("No byte in either direction for this long: the connection is closed with `inactivity_timeout`.", '"5m"'),
        "half_close_timeout": Key('After one side sent EOF, how long the other direction may go on ("0": `inactivity_timeout` governs).', '"30s"'),
        "max_lifetime": Key("Hard cap on a connection's age: then it ends with `lifetime_exceeded`.", '"4h"'),
        "keepalive": Key("How idle long-lived connections are treated. `standard`: `inactivity_timeout`; `immortal`: no inactivity limit (`max_lifetime` still holds); "
                         "`extended`: `inactivity_timeout` × `keepalive_multiplier`, then one logged warning and one grace period of `inactivity_timeout`.", '"extended"'),
        "keepalive_multiplier": Key('The multiplier of `keepalive = "extended"`.', "12"),
        "tcp_keepalive": Key('Kernel keep-alive probes on both sockets: the first after this much silence, then every quarter of it, 4 probes ("0": off).', '"2m"'),
        "max_connections": Key("Connections open at once in the whole process (0: no limit); past it a connection ends with `capacity`.", "20000"),
        "max_connections_per_ip": Key("Connections open at once per client IP (0: no limit); past it `ip_limit`.", "50"),
        "connection_rate_per_ip": Key('New connections per client IP per period, e.g. "300/min", "10/s" ("0": no limit); past it `rate_limited`.', '"300/min"'),
        "shutdown_grace": Key('On SIGTERM, how long open connections may finish before the rest are closed with `shutdown` ("0": at once).', '"10s"'),
        "trusted_proxies": Key("Addresses or CIDRs allowed to send a PROXY protocol header (to routes with `accept_proxy_protocol`).", '["10.0.0.0/8", "fd00::/8"]'),
        "workers": Key('Worker processes of `triofwd serve`: 1 (one process), a number, or "auto" (one per CPU it may run on). With more than one, a supervisor binds '
                       "the ports once and hands them to every worker; `max_connections` is shared out among them. The datagrams of a UDP route go to a "
                       "worker by a hash of the flow's addresses and ports (by client address where a per-IP limit applies), so each flow stays in one worker. Read at start; a reload does not change it.",
                       '"auto"', type='integer ≥ 1 or `"auto"`'),
    },
    Route: {
        "name": Key("The route's name, unique in the file: 1-63 letters, digits, `_`, `.` or `-`. Logs, metrics and the inspector use it.", '"ssh"'),
        "ports": Key('Listen ports: numbers and "LOW-HIGH" ranges. `[0]` alone asks the kernel for a free port (tests use it).', '[2222, "8000-8010"]',
                     type='list of ports (0-65535) or "LOW-HIGH" ranges'),
        "bind": Key('The listen address: an IP address; "::" for IPv6.', '"127.0.0.1"'),
        "priority": Key("Routes on the same port are tried by priority, higher first; equal: file order.", "10"),
        "domains": Key('SNI patterns: "example.com", or "*.example.com" (exactly one label). Non-empty: the port reads the TLS ClientHello first and routes by its name.',
                       '["api.example.com", "*.example.com"]'),
        "client_ips": Key("Allow list of addresses or CIDRs (empty: everyone). A route that does not list the client is skipped.", '["10.0.0.0/8"]'),
        "block_ips": Key("Deny list of addresses or CIDRs: a client in it ends with `ip_blocked`.", '["10.6.6.0/24"]'),
        "action": Key("What the route does with a connection. `forward`: bytes both ways to a target; `bridge`: to a TLS terminator; `offload`: the kernel forwards it (nftables); "
                      "`reject`: closed at once; `handler`: an async callable owns it; `socks5` / `http_connect`: the client names its destination.", '"reject"'),
        "targets": Key('Where connections go: "ip:port", "[ipv6]:port" or "host:port".', '["10.0.0.5:22", "[fd00::5]:22", "db.internal:5432"]'),
        "balance": Key("How a target is picked: `round-robin`, `least-connections`, `random` or `first` (the first usable one).", '"least-connections"'),
        "connect_retries": Key("Further targets tried when a connect fails (cycling through the targets, so a single target is retried).", "1"),
        "proxy_protocol": Key('Send a PROXY protocol header to the target: "v1", "v2", or "" for none.', '"v2"'),
        "accept_proxy_protocol": Key("The route's port expects a PROXY header (v1 or v2) from `[settings] trusted_proxies` addresses, and refuses one from anyone else.", "true"),
        "bridge_to": Key('`action = "bridge"`: "internal" (the built-in TLS terminator, see `tls`) or the "host:port" of another terminator.', '"127.0.0.1:8443"'),
        "handler": Key('`action = "handler"`: the async callable `(stream, info)` that owns the connection, as "package.module:function". On a `protocol = "udp"` '
                       "route it is `(session, info)` and owns one client flow: `await session.receive()` is the client's next datagram, `await session.send(data)` "
                       "answers it (64 datagrams, 256 KiB, wait for the handler; more are dropped).", '"mypackage.handlers:hello"',
                       type="string", schema={"type": "string"}),
        "offload_fallback": Key('`action = "offload"`: "forward" forwards in user space where nftables is missing or not permitted; "" refuses to start then.', '"forward"'),
        "preserve_source_ip": Key('`action = "offload"`: no masquerade, so the target sees the client\'s address.', "true"),
        "warm": Key("Connected, checked sockets kept ready per target, so a client skips the connect.", "4"),
        "health_check": Key("Active health checks of the targets (absent: none). See `routes.health_check`.", '{ interval = "5s", timeout = "1s" }'),
        "circuit_breaker": Key("Passive health: failures in a row open a target's circuit (absent: off). See `routes.circuit_breaker`.", "{ failures = 5 }"),
        "tls": Key("TLS options for `domains` routes and `action = \"bridge\"`. See `routes.tls`.", '{ mode = "terminate", cert = "certs/example.pem", key = "certs/example.key" }'),
        "destinations": Key('`socks5` / `http_connect`: where clients may ask to go: "CIDR:ports", "name:ports" or "*.example.com:ports". Loopback, private and link-local '
                            "addresses are denied unless listed.", '["10.1.0.0/16:443", "*.example.com:443"]'),
        "users": Key("`socks5` / `http_connect`: who may connect (empty: no authentication). See `routes.users`.", '[{ name = "alice", password = "env:ALICE_PASSWORD" }]'),
        "protocol": Key('`"tcp"`: connections; `"udp"`: datagrams, one session per client address and port, with its own connected socket to a target (replies from '
                        "anyone else are dropped by the kernel). A UDP route may `forward`, `reject`, `offload` or run a `handler`; its `inactivity_timeout` is \"60s\" unless it sets one "
                        "(any datagram either way is activity); `max_connections` and the per-IP limits count sessions. `domains`, `tls`, the PROXY protocol keys, "
                        "`half_close_timeout`, `initial_data_timeout`, `tcp_keepalive`, `warm` and `circuit_breaker` are refused on it; its `health_check` sends a datagram "
                        "(`send`, required) and waits for the reply.", '"udp"'),
        "responses": Key('`protocol = "udp"`: a session ends (`normal`) after this many replies from its target (or its handler): 1 for DNS, so it ends as soon as the answer is back. '
                         "0: its `inactivity_timeout` governs.", "1"),
    },
    TLS: {
        "mode": Key("`passthrough`: route by SNI, bytes untouched; `terminate`: the built-in terminator decrypts and sends plaintext to the targets; "
                    "`reencrypt`: it decrypts and opens TLS to the targets.", '"terminate"'),
        "cert": Key("Certificate chain (PEM) the terminator presents; relative to the route file's folder.", '"certs/example.pem"'),
        "key": Key("Private key (PEM) of `cert`; relative to the route file's folder.", '"certs/example.key"'),
        "min_version": Key("The lowest TLS version the terminator accepts: \"1.2\" or \"1.3\".", '"1.3"'),
        "target_ca": Key('`reencrypt`: CA bundle (PEM) that verifies the targets ("": the system\'s CAs).', '"certs/internal-ca.pem"'),
        "target_sni": Key('`reencrypt`: server name sent to and verified on the targets ("": the client\'s SNI).', '"api.internal"'),
    },
    HealthCheck: {
        "interval": Key("How often each target is checked.", '"10s"'),
        "timeout": Key("How long one check may take: the connect, and the reply when `expect` is set (UDP: the reply).", '"2s"'),
        "rise": Key("Passes in a row that bring a target that is down back.", "3"),
        "fall": Key("Failures in a row that take a target out of balancing.", "2"),
        "send": Key("Bytes sent once connected (UTF-8; TOML escapes such as `\\r\\n` work). Empty: a connect is the check. "
                    'Required with `protocol = "udp"`: the one datagram each check sends.', '"PING\\r\\n"'),
        "expect": Key("Bytes the reply must contain within `timeout`. Empty: nothing is read (UDP: any reply passes).", '"+PONG"'),
    },
    CircuitBreaker: {
        "failures": Key("Connect failures and target resets in a row that open the target's circuit.", "3"),
        "backoff": Key("How long the circuit stays open the first time (stretched by up to 25% at random); doubled each time the probe after it fails.", '"2s"'),
        "max_backoff": Key("The longest the circuit stays open.", '"1m"'),
    },
    User: {
        "name": Key("The user name the client sends.", '"alice"'),
        "password": Key('The password itself, "env:VARIABLE" (read from the environment when the file is loaded) or a salted hash, `"scrypt$<salt>$<hash>"`.',
                        '"env:ALICE_PASSWORD"'),
    },
}
# fmt: on

# Where each struct sits in a route file, as the reference and the schema name it.
_WHERE = {Config: "the top level", Settings: "[settings]", Route: "[[routes]]", TLS: "routes.tls", HealthCheck: "routes.health_check",
          CircuitBreaker: "routes.circuit_breaker", User: "routes.users"}  # fmt: skip


def structs(root: type[msgspec.Struct] = Config) -> list[type[msgspec.Struct]]:
    """Every struct a route file is made of, from the top down (found from the annotations,
    so a new nested table is found too)."""
    found: list[type[msgspec.Struct]] = []

    def visit(struct: type[msgspec.Struct]) -> None:
        if struct in found:
            return
        found.append(struct)
        for field in msgspec.structs.fields(struct):
            for inner in _structs_in(field.type):
                visit(inner)

    visit(root)
    return found


def _structs_in(hint: Any) -> Iterator[type[msgspec.Struct]]:
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        yield hint
    for arg in typing.get_args(hint):
        yield from _structs_in(arg)


def key_docs(struct: type[msgspec.Struct]) -> dict[str, Key]:
    """The documented keys of one struct, in the struct's order: its own entries in KEYS, and for
    a route the [settings] keys it may override. A key without an entry is left out."""
    own = KEYS.get(struct, {})
    docs: dict[str, Key] = {}
    for field in msgspec.structs.fields(struct):
        if field.name in own:
            docs[field.name] = own[field.name]
        elif struct is Route and field.name in ROUTE_OVERRIDES and field.name in KEYS[Settings]:
            setting = KEYS[Settings][field.name]
            docs[field.name] = Key(f"This route's own `{field.name}`, in place of `[settings]`'s. " + setting.meaning, setting.example, setting.type)
    return docs


# -- the JSON Schema ------------------------------------------------------------------


def route_file_schema() -> dict[str, Any]:
    """The JSON Schema of a route file (draft-07, which editors' checkers all speak): the
    structs' shape as msgspec sees it, every key's meaning and an example, and the patterns of
    durations and rates, so an editor completes keys, explains them and flags bad values."""
    generated = msgspec.json.schema(Config)
    defs: dict[str, Any] = generated["$defs"]
    for struct in structs():
        definition = defs[struct.__name__]
        definition["title"] = _WHERE.get(struct, struct.__name__)
        definition["description"] = _SECTION_TEXT.get(struct, definition.get("description", ""))
        if not definition.get("required", True):
            del definition["required"]  # draft-04 checkers (older Taplo) refuse an empty list
        for name, doc in key_docs(struct).items():
            prop = definition["properties"][name]
            if doc.schema is not None:
                prop = {**doc.schema, **({"default": prop["default"]} if "default" in prop else {})}
            if "$ref" in prop:  # draft-07 ignores what stands beside a $ref: wrap it
                prop = {"allOf": [{"$ref": prop.pop("$ref")}], **prop}
            prop["description"] = doc.meaning
            prop["examples"] = [_toml_value(doc.example)]
            definition["properties"][name] = prop
    root = defs.pop("Config")
    return {
        "$schema": SCHEMA_DIALECT,
        **root,
        "title": "triofwd route file",
        "description": "A triofwd route file (TOML, YAML or JSON): [settings] and [[routes]]. Durations are strings such as "
        '"250ms", "30s", "5m", "4h", "7d"; "0" means off. Generated by `triofwd schema`.',
        "$defs": defs,
    }


def schema_text() -> str:
    """`triofwd schema`: the schema as indented JSON, one trailing newline."""
    return json.dumps(route_file_schema(), indent=2, ensure_ascii=False) + "\n"


def _toml_value(text: str) -> Any:
    return tomllib.loads(f"v = {text}")["v"]


# -- the Markdown reference -----------------------------------------------------------

_FORMS = {DURATION_PATTERN: "duration", RATE_PATTERN: "rate"}


def type_label(hint: Any) -> str:
    """A key's type as the reference writes it."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        for meta in extras:
            pattern = (getattr(meta, "extra_json_schema", None) or {}).get("pattern")
            if pattern in _FORMS:
                return _FORMS[pattern]
            if getattr(meta, "ge", None) is not None and base is int:
                return f"integer ≥ {meta.ge}"
        return type_label(base)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " | ".join(f"`{json.dumps(v)}`" for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(type_label(a) for a in args)
    if origin is list:
        (item,) = typing.get_args(hint)
        inner = type_label(item)
        return "list of tables" if inner == "table" else f"list of {inner}s" if " " not in inner else f"list of ({inner})"
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return "table"
    return {str: "string", int: "integer", bool: "boolean", float: "number"}.get(hint, "string")


def _default(struct: type[msgspec.Struct], field: msgspec.structs.FieldInfo) -> str:
    if struct is Route and field.name in ROUTE_OVERRIDES:
        return "as in `[settings]`"
    if field.required:
        return "**required**"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if value is None:
        return "none (off)"
    if isinstance(value, msgspec.Struct):
        return "every key's default"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    # In a table even a pipe inside `code` ends the cell (GitHub's rule): escape every one.
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """docs/reference.md: every key of a route file, table by table."""
    out = [_INTRO]
    for struct in structs():
        docs = key_docs(struct)
        fields = {f.name: f for f in msgspec.structs.fields(struct)}
        where = _WHERE.get(struct, struct.__name__)
        out.append(f"## {where[0].upper()}{where[1:]}\n" if struct is Config else f"## `{where}`\n")
        out.append(_SECTION_TEXT.get(struct, (struct.__doc__ or "").strip()) + "\n")
        out.append("| key | type | default | meaning | example |")
        out.append("| --- | --- | --- | --- | --- |")
        for name, doc in docs.items():
            if struct is Route and name in ROUTE_OVERRIDES:
                continue
            field = fields[name]
            kind = doc.type or type_label(field.type)
            out.append(f"| `{name}` | {_cell(kind)} | {_cell(_default(struct, field))} | {_cell(doc.meaning)} | {_cell(f'`{name} = {doc.example}`')} |")
        if struct is Route:
            overrides = [name for name in docs if name in ROUTE_OVERRIDES]
            out.append("")
            out.append(
                "A route may also set any of these `[settings]` keys for itself; unset, the `[settings]` value holds. "
                "A limit set in `[settings]` counts over the whole process, the same key on a route counts that route's connections; both apply:\n"
            )
            out.append(", ".join(f"[`{name}`](#settings)" for name in overrides) + ".")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


_INTRO = """\
# Route file reference

<!-- Generated from the route file's structures (triofwd/_config.py) and their meanings
(triofwd/_schema.py): `python -m triofwd._schema > docs/reference.md`. tests/test_reference.py
fails when this page and the code disagree. -->

Every key of a route file: its type, its default, what it means and an example. A route
file is TOML (`.toml`), YAML (`.yaml`, `.yml`) or JSON (`.json`); the keys are the same in
all three. [routes.md](routes.md) is the guide: an example file, checking a file and
editor completion with `triofwd schema`.

Unknown keys are errors, and every error names the path of the bad value, as in
``Expected `int` <= 65535 - at `$.routes[1].ports[0]` ``.

Forms of values used below:

| form | written | meaning |
| --- | --- | --- |
| duration | `"250ms"`, `"30s"`, `"5m"`, `"4h"`, `"7d"`, `"1.5s"` | a number and a unit: ms, s, m, h, d; `"0"` means off (no limit) |
| rate | `"300/min"`, `"10/s"`, `"50/5m"` | a count per period (s, min, hour; or a number of them); `"0"` means off |
| address or CIDR | `"10.0.0.7"`, `"10.0.0.0/8"`, `"fd00::/8"` | an address alone is a /32 or /128 |
| target | `"10.0.0.5:22"`, `"[::1]:22"`, `"db.internal:5432"` | host and port; IPv6 in brackets; a name is looked up when connecting |
"""

_SECTION_TEXT: dict[type[msgspec.Struct], str] = {
    Config: "A route file holds `[settings]` (optional) and `[[routes]]`.",
    Settings: "Process-wide defaults. Every key is optional; the timeout, keepalive and limit keys may be repeated on a route.",
    Route: "One route: which connections it takes (ports, addresses, names) and what it does with them. `name` and `ports` are required.",
    TLS: '`[routes.tls]`: for routes with `domains` and for `action = "bridge"` with the built-in terminator. Paths are relative to the route file\'s folder.',
    HealthCheck: "`health_check = { ... }`: every `interval` each target is connected to within `timeout`; with `send`, those bytes are sent; "
    "with `expect`, the reply must contain them. `fall` failures in a row take a target out, `rise` passes bring it back. "
    'For `action = "forward"` and `"bridge"`. With `protocol = "udp"` a check is the `send` datagram on a connected socket and a reply '
    "(containing `expect`, if given) within `timeout`; an ICMP port unreachable fails it at once. "
    "With `[settings] workers` > 1 the supervisor runs the checks, once per target, and every worker follows its verdicts.",
    CircuitBreaker: "`circuit_breaker = { ... }`: passive health. After `failures` in a row no connection is sent to the target for `backoff`; "
    "then one connection probes it. Off unless the key is given.",
    User: "`users = [{ name = ..., password = ... }]`: the users of a `socks5` or `http_connect` route.",
}


if __name__ == "__main__":
    print(reference_markdown(), end="")
