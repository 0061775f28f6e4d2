"""The feature matrix, generated: every combination of the features a connection can meet,
pruned only where `triofwd check` refuses it, times every fault that applies, each with
the reason the connection must end with.

    action               forward | terminate | reencrypt | bridge_to | socks5 | http_connect | handler | offload | reject
    keepalive            standard | extended | immortal
    half_close_timeout   off | on
    proxy_protocol       "" | v1 | v2            (the header sent to the target)
    accept_proxy_protocol off | on               (a PROXY header from the client, a trusted proxy)

`terminate` and `reencrypt` are action = "bridge" to the built-in terminator; `bridge_to` is
action = "bridge" to an external one (here the matrix's own target server, which reads the
hop's PROXY v2 header and terminates TLS); `offload` has offload_fallback = "forward" and
runs where nft is not available, so it is forwarded in user space; `socks5` and
`http_connect` name the matrix's target server in their handshake, and their
`destinations` list it.

The oracle (`expected`) is written from the contract, not from what the program does: TLS
cannot half-close, so an EOF from or toward a TLS stream ends the whole connection `normal`.
This module is pure: no sockets; test_matrix.py runs the cases.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import triofwd
from triofwd._table import compile_table

ACTIONS = ("forward", "terminate", "reencrypt", "bridge_to", "socks5", "http_connect", "handler", "offload", "reject")
KEEPALIVES = ("standard", "extended", "immortal")
HALF_CLOSE = (False, True)
PROXY = ("", "v1", "v2")
ACCEPT_PROXY = (False, True)
FAULTS = (
    "normal",
    "client_reset",
    "target_reset",
    "client_half_close",
    "target_half_close",
    "kill",
    "reload",
    "shutdown",
    "inactivity",
    "lifetime",
    "half_close_timeout",
    "initial_data_timeout",
)

# The short timeouts of the one case that waits for them; every other case gets long ones.
SHORT = {"inactivity_timeout": 0.3, "max_lifetime": 0.5, "half_close_timeout": 0.3, "initial_data_timeout": 0.3}
LONG = {"inactivity_timeout": "30s", "max_lifetime": "60s", "half_close_timeout": "10s", "initial_data_timeout": "10s"}
# An extended keepalive's warning comes after inactivity_timeout x this. Its case counts
# exactly one warning, so this is longer than the harness itself may pause between the
# pieces of one exchange on a loaded 2-core machine (seen: a second): traffic after a
# warning rightly starts the watch over, and would be counted as a second one.
KEEPALIVE_MULTIPLIER = 6
FRONT_NAME = "front.example"  # the name the matrix's TLS clients ask for
TARGET_NAME = "target.example"  # what a reencrypt route expects of its target
TRUSTED = "127.0.0.0/8"

_TLS_ACTIONS = ("terminate", "reencrypt", "bridge_to")
DYNAMIC = ("socks5", "http_connect")  # the client's handshake names the target


@dataclasses.dataclass(frozen=True)
class Combo:
    action: str
    keepalive: str
    half_close: bool
    proxy: str
    accept_proxy: bool

    @property
    def tls(self) -> bool:
        """The client speaks TLS (to the forwarder's terminator, or through it)."""
        return self.action in _TLS_ACTIONS

    @property
    def reads_first_bytes(self) -> bool:
        """The route waits for first bytes: a PROXY header, a ClientHello (before routing),
        a SOCKS5 or HTTP CONNECT handshake (after)."""
        return self.accept_proxy or self.action in _TLS_ACTIONS or self.action in DYNAMIC

    @property
    def dials(self) -> bool:
        return self.action not in ("handler", "reject")

    @property
    def label(self) -> str:
        return ".".join([self.action, self.keepalive, "hc" if self.half_close else "nohc", self.proxy or "nopp", "app" if self.accept_proxy else "noapp"])


@dataclasses.dataclass(frozen=True)
class Case:
    combo: Combo
    fault: str

    @property
    def name(self) -> str:
        """The case's route name (unique; also how its access-log line is found)."""
        return f"{self.combo.label}.{self.fault}"[:63]

    @property
    def expected(self) -> str:
        return expected(self.combo, self.fault)


@dataclasses.dataclass(frozen=True)
class Environment:
    """What the routes point at: certificates, the target server, the handler."""

    cert: str
    key: str
    ca: str
    target: str  # "127.0.0.1:port": the matrix's target server (also the external terminator)
    handler: Any  # "module:function" in a route file, or the callable itself (to check in code)


def applies(combo: Combo, fault: str) -> bool:
    """Whether `fault` can happen to a connection of `combo` at all."""
    if combo.action == "reject":  # closed at once: only whether it is, and the wait before it
        return fault == "normal" or (fault == "initial_data_timeout" and combo.reads_first_bytes)
    if fault == "target_reset":
        return combo.dials
    if fault == "half_close_timeout":
        return combo.half_close and combo.action != "handler"  # a handler decides its own half-close
    if fault == "initial_data_timeout":
        return combo.reads_first_bytes
    return True


def expected(combo: Combo, fault: str) -> str:
    """The reason a case must end with: the contract's word for what happened first."""
    if combo.action == "reject":
        return "initial_data_timeout" if fault == "initial_data_timeout" else "rejected"
    if fault == "inactivity":
        return "normal" if combo.keepalive == "immortal" else "inactivity_timeout"
    if fault == "half_close_timeout":
        # TLS cannot half-close: the EOF of a client that speaks TLS to the forwarder ends the
        # connection there, normally, before any half-close clock could run.
        return "normal" if combo.action in ("terminate", "reencrypt") else "half_close_timeout"
    return {
        "normal": "normal",
        "client_reset": "client_reset",
        "target_reset": "target_reset",
        "client_half_close": "normal",
        "target_half_close": "normal",
        "kill": "killed",
        "reload": "normal",
        "shutdown": "shutdown",
        "lifetime": "lifetime_exceeded",
        "initial_data_timeout": "initial_data_timeout",
    }[fault]


def duration(text: float) -> str:
    return f"{round(text * 1000)}ms"


def route(case: Case, env: Environment, port: int = 0) -> dict[str, Any]:
    """The case's route, as a route file has it."""
    combo, fault = case.combo, case.fault
    timeouts = dict(LONG)
    short = {"inactivity": "inactivity_timeout", "lifetime": "max_lifetime", "half_close_timeout": "half_close_timeout", "initial_data_timeout": "initial_data_timeout"}
    if fault in short:
        key = short[fault]
        timeouts[key] = duration(SHORT[key])
    if not combo.half_close:
        timeouts["half_close_timeout"] = "0"
    r: dict[str, Any] = {"name": case.name, "ports": [port], "bind": "127.0.0.1", "keepalive": combo.keepalive, **timeouts}
    if combo.proxy:
        r["proxy_protocol"] = combo.proxy
    if combo.accept_proxy:
        r["accept_proxy_protocol"] = True
    action = combo.action
    if action in ("forward", "offload"):
        r.update(action=action, targets=[env.target])
        if action == "offload":
            r["offload_fallback"] = "forward"
    elif action in ("terminate", "reencrypt"):
        tls = {"mode": action, "cert": env.cert, "key": env.key, "min_version": "1.2"}
        if action == "reencrypt":
            tls.update(target_ca=env.ca, target_sni=TARGET_NAME)
        r.update(action="bridge", targets=[env.target], tls=tls)
    elif action == "bridge_to":
        r.update(action="bridge", bridge_to=env.target)
    elif action in DYNAMIC:
        host, _, port = env.target.rpartition(":")
        r.update(action=action, destinations=[f"{host}/32:{port}"])  # loopback: listed explicitly
    elif action == "handler":
        r.update(action="handler", handler=env.handler)
    else:
        r["action"] = "reject"
    return r


def settings() -> dict[str, Any]:
    return {"trusted_proxies": [TRUSTED], "keepalive_multiplier": KEEPALIVE_MULTIPLIER, "shutdown_grace": "0"}


def combos(env: Environment) -> tuple[list[Combo], dict[Combo, str]]:
    """Every combination, and the ones `check` refuses with its first error (pruned)."""
    kept, refused = [], {}
    for values in itertools.product(ACTIONS, KEEPALIVES, HALF_CLOSE, PROXY, ACCEPT_PROXY):
        combo = Combo(*values)
        spec = route(Case(combo, "normal"), env, port=0 if combo.action != "offload" else 9)
        try:
            compile_table(triofwd.Config(settings=triofwd.Settings(**settings()), routes=[triofwd.Route(**_code_values(spec))]))
        except triofwd.ConfigError as exc:
            refused[combo] = exc.errors[0]
        else:
            kept.append(combo)
    return kept, refused


def _code_values(spec: dict[str, Any]) -> dict[str, Any]:
    values = dict(spec)
    if "tls" in values:
        values["tls"] = triofwd.TLS(**values["tls"])
    return values


def cases(kept: Iterable[Combo]) -> list[Case]:
    return [Case(combo, fault) for combo in kept for fault in FAULTS if applies(combo, fault)]


def sample(all_cases: list[Case], size: int | None, seed: int) -> list[Case]:
    """`size` cases drawn with `seed` (every case when size is None or covers them all);
    every fault and every action stays represented."""
    if size is None or size >= len(all_cases):
        return list(all_cases)
    rng = random.Random(seed)
    chosen: dict[Case, None] = {}
    for key in (lambda c: c.fault, lambda c: c.combo.action):
        for group in _groups(all_cases, key).values():
            chosen[rng.choice(group)] = None
    rest = [c for c in all_cases if c not in chosen]
    for case in rng.sample(rest, max(0, size - len(chosen))):
        chosen[case] = None
    return list(chosen)


def _groups(items: Iterable[Case], key: Callable[[Case], str]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def lower_bound(case: Case) -> float:
    """How long a case that ends by a timeout must at least have lasted (seconds)."""
    fault = case.fault
    if fault == "inactivity" and case.combo.keepalive != "immortal":
        window = SHORT["inactivity_timeout"]
        return window * (KEEPALIVE_MULTIPLIER + 1) if case.combo.keepalive == "extended" else window
    if fault == "lifetime":
        return SHORT["max_lifetime"]
    if fault == "half_close_timeout" and case.expected == "half_close_timeout":
        return SHORT["half_close_timeout"]
    if fault == "initial_data_timeout":
        return SHORT["initial_data_timeout"]
    return 0.0


def summary(kept: list[Combo], refused: dict[Combo, str], run: list[Case]) -> Iterator[str]:
    total = len(kept) + len(refused)
    yield f"{total} combinations, {len(refused)} refused by check, {len(kept)} kept; {len(run)} cases run"
    reasons: dict[str, int] = {}
    for error in refused.values():
        reasons[error] = reasons.get(error, 0) + 1
    for error, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        yield f"  refused x{count}: {error}"
