"""Prometheus text exposition (format 0.0.4) of a stats snapshot. Pure: a dict in, text out.

The names follow the Prometheus conventions: a `triofwd_` prefix, `_total` on counters,
base units (seconds, bytes) in the name. Every route the table knows is exported with
zeros before its first connection, and every (route, reason) pair of the contract's
vocabulary too, so that `rate()` and `increase()` see the first event of a series
instead of treating it as the series' start.

    triofwd_connections_active{route}                    gauge
    triofwd_connections_total{route}                     counter   accepted on the route
    triofwd_terminations_total{route,reason}             counter   ended, by the one-word reason
    triofwd_limit_rejections_total{route,limit}          counter   view of terminations: capacity, ip_limit, rate_limited
    triofwd_bytes_total{route,direction}                 counter   in: client to target, out: target to client
    triofwd_connect_duration_seconds{route}              histogram time to connect to the target
    triofwd_accept_errors_total                          counter   accept() failures (out of fds, memory)
    triofwd_workers                                      gauge     worker processes serving (1: one process)
    triofwd_worker_restarts_total                        counter   worker processes started again
    triofwd_udp_datagrams_total{route,direction}         counter   UDP routes: datagrams forwarded, in and out
    triofwd_udp_datagrams_dropped_total{route,reason}    counter   UDP routes: datagrams dropped (a refused flow's, busy...)
    triofwd_target_up{route,target}                      gauge     1 while health checks pass
    triofwd_target_circuit_state{route,target,state}     gauge     1 for the circuit's state: closed, half-open, open
    triofwd_target_failures_total{route,target}          counter   connect failures and resets (passive health)
    triofwd_target_circuit_opens_total{route,target}     counter
    triofwd_target_checks_total{route,target,result}     counter   active checks, result passed|failed
    triofwd_target_connections_active{route,target}      gauge
    triofwd_target_warm_connections{route,target}        gauge     sockets kept ready (warm)

Connections that ended before a route was chosen (no_route, capacity...) carry
`route="-"`, the key the stats snapshot uses for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ._health import Circuit
from ._reasons import Reason

__all__ = ["CONTENT_TYPE", "LIMIT_REASONS", "prometheus_number", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "triofwd_"
# The terminations that mean a limit turned the connection away.
LIMIT_REASONS = (Reason.CAPACITY.value, Reason.IP_LIMIT.value, Reason.RATE_LIMITED.value)
CIRCUIT_STATES = tuple(c.value for c in Circuit)


def render_metrics(stats: Mapping[str, Any], route_names: Iterable[str] = ()) -> str:
    """The Prometheus text for a `Forwarder.stats()` snapshot.

    `route_names` are the routes of the current table: they are exported with zero
    values even before their first connection.
    """
    routes: dict[str, Mapping[str, Any]] = {name: {} for name in route_names}
    routes.update(stats.get("routes", {}))
    names = sorted(routes)
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, Mapping[str, str], float]]) -> None:
        out.append(f"# HELP {PREFIX}{name} {_escape_help(help_text)}")
        out.append(f"# TYPE {PREFIX}{name} {kind}")
        out.extend(f"{PREFIX}{suffix}{_labels(labels)} {prometheus_number(value)}" for suffix, labels, value in samples)

    family("connections_active", "gauge", "Connections open now.",
           (("connections_active", {"route": n}, routes[n].get("active", 0)) for n in names))  # fmt: skip
    family("connections_total", "counter", "Connections accepted, by the route they were given.",
           (("connections_total", {"route": n}, routes[n].get("total", 0)) for n in names))  # fmt: skip
    family(
        "terminations_total",
        "counter",
        "Connections ended, by route and the one-word reason they ended.",
        (("terminations_total", {"route": n, "reason": r}, routes[n].get("terminations", {}).get(r, 0)) for n in names for r in _reasons(routes[n])),
    )
    family(
        "limit_rejections_total",
        "counter",
        "Connections turned away by a limit (a view of terminations_total for capacity, ip_limit, rate_limited).",
        (("limit_rejections_total", {"route": n, "limit": r}, routes[n].get("terminations", {}).get(r, 0)) for n in names for r in LIMIT_REASONS),
    )
    family(
        "bytes_total",
        "counter",
        "Bytes relayed; direction in is client to target, out is target to client.",
        (("bytes_total", {"route": n, "direction": d}, routes[n].get(f"bytes_{d}", 0)) for n in names for d in ("in", "out")),
    )
    family("connect_duration_seconds", "histogram", "Time taken to connect to the target.",
           (s for n in names for s in _histogram("connect_duration_seconds", {"route": n}, routes[n].get("connect_time"))))  # fmt: skip
    offloaded = [n for n in names if "offload" in routes[n]]
    family("offload_packets_total", "counter", "Packets of offload routes, counted by the kernel (nftables).",
           (("offload_packets_total", {"route": n}, routes[n]["offload"]["packets"]) for n in offloaded))  # fmt: skip
    family("offload_bytes_total", "counter", "Bytes of offload routes, counted by the kernel (nftables).",
           (("offload_bytes_total", {"route": n}, routes[n]["offload"]["bytes"]) for n in offloaded))  # fmt: skip
    udp = [n for n in names if "udp" in routes[n]]
    family("udp_datagrams_total", "counter", "Datagrams forwarded on UDP routes; direction in is client to target, out is target to client.",
           (("udp_datagrams_total", {"route": n, "direction": d}, routes[n]["udp"][f"datagrams_{d}"]) for n in udp for d in ("in", "out")))  # fmt: skip
    family("udp_datagrams_dropped_total", "counter", "Datagrams of UDP routes dropped: a refused flow's (by the refusal's reason), busy (a full socket buffer), "
           "closed (a new flow on a listener that stopped), too_big.",
           (("udp_datagrams_dropped_total", {"route": n, "reason": r}, c) for n in udp for r, c in routes[n]["udp"]["drops"].items()))  # fmt: skip
    targets = [(route, row) for route, rows in sorted(stats.get("targets", {}).items()) for row in rows]

    def label(route: str, row: Mapping[str, Any]) -> dict[str, str]:
        return {"route": route, "target": row["target"]}

    family("target_up", "gauge", "1 while the target passes its health checks (always 1 without health_check).",
           (("target_up", label(r, t), int(t["up"])) for r, t in targets))  # fmt: skip
    family("target_circuit_state", "gauge", "The target's circuit breaker: 1 for the state it is in (closed, half-open, open).",
           (("target_circuit_state", {**label(r, t), "state": c}, int(t["circuit"] == c)) for r, t in targets for c in CIRCUIT_STATES))  # fmt: skip
    family("target_failures_total", "counter", "Connect failures and target resets counted against the target (passive health).",
           (("target_failures_total", label(r, t), t["failures_total"]) for r, t in targets))  # fmt: skip
    family("target_circuit_opens_total", "counter", "Times the target's circuit opened.",
           (("target_circuit_opens_total", label(r, t), t["circuit_opens_total"]) for r, t in targets))  # fmt: skip
    family("target_checks_total", "counter", "Active health checks of the target, by result.",
           (("target_checks_total", {**label(r, t), "result": k}, t[f"checks_{k}"]) for r, t in targets for k in ("passed", "failed")))  # fmt: skip
    family("target_connections_active", "gauge", "Connections open to the target now.",
           (("target_connections_active", label(r, t), t["active"]) for r, t in targets))  # fmt: skip
    family("target_warm_connections", "gauge", "Connected sockets kept ready for the target (warm).",
           (("target_warm_connections", label(r, t), t["warm"]) for r, t in targets))  # fmt: skip
    family("accept_errors_total", "counter", "accept() calls that failed for want of a resource (file descriptors, memory).",
           [("accept_errors_total", {}, stats.get("accept_errors", 0))])  # fmt: skip
    # One process unless the stats come from a supervisor of workers (README, "Every core: workers").
    workers = stats.get("workers", {})
    family("workers", "gauge", "Worker processes serving now.", [("workers", {}, workers.get("count", 1))])
    family("worker_restarts_total", "counter", "Worker processes started again after one exited.", [("worker_restarts_total", {}, workers.get("restarts", 0))])
    return "\n".join(out) + "\n"


def _reasons(route: Mapping[str, Any]) -> list[str]:
    """Every reason of the vocabulary, then any other word the snapshot holds (never dropped)."""
    known = [r.value for r in Reason]
    return known + sorted(set(route.get("terminations", {})) - set(known))


def _histogram(name: str, labels: Mapping[str, str], data: Mapping[str, Any] | None) -> Iterator[tuple[str, Mapping[str, str], float]]:
    """_bucket (cumulative, ending with le="+Inf"), _sum and _count samples of one series."""
    buckets: list[tuple[float, int]] = list(data["buckets"]) if data else []
    if not buckets or buckets[-1][0] != math.inf:
        buckets.append((math.inf, data["count"] if data else 0))
    for bound, count in buckets:
        yield f"{name}_bucket", {**labels, "le": prometheus_number(bound)}, count
    yield f"{name}_sum", labels, data["sum"] if data else 0
    yield f"{name}_count", labels, data["count"] if data else 0


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(str(value))}"' for key, value in labels.items()) + "}"


def _escape_label(value: str) -> str:
    # The text format escapes exactly these three in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    # HELP text escapes backslash and line feed, but not the double quote.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def prometheus_number(value: float) -> str:
    """A sample value as the text format writes it: integers plainly, +Inf/-Inf/NaN by name."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
