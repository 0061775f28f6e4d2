"""The status page's data (GET /status.json): one JSON-ready dict from the forwarder's state.

Pure: a stats snapshot (`Forwarder.stats()`), the route table and the listening
addresses in, a dict out; no clock of its own (the caller passes the time). Every
number is a counter or a gauge as the stats snapshot has it: rates (connections and
bytes per second) are what a reader derives from two documents taken some time apart
(the page times them with its own clock), so that the daemon keeps no history for it.

    routes     the routes of the table, in its order (then any route a reload removed that
               still has counts, with `removed` true), each with its targets' health
    unrouted   connections that ended before a route was chosen (no_route, capacity...)
    totals     the whole process
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._reasons import Reason
from ._stats import UNROUTED

if TYPE_CHECKING:
    from ._table import CompiledRoute

__all__ = ["FORMAT", "REASONS", "package_version", "status_document", "target_status"]

# The document's format; a field changes meaning only with a new number.
FORMAT = 1
# The vocabulary in the contract's order: the page orders its reason columns by it.
REASONS = tuple(reason.value for reason in Reason)


def status_document(
    stats: Mapping[str, Any],
    routes: Iterable[CompiledRoute],
    listening: Mapping[str, list[str]],
    *,
    time: float,
    draining: bool = False,
    version: str = "",
) -> dict[str, Any]:
    """The document for one moment: `time` is the wall clock (seconds since the epoch)."""
    by_route: Mapping[str, Mapping[str, Any]] = stats.get("routes", {})
    health: Mapping[str, list[Mapping[str, Any]]] = stats.get("targets", {})
    rows = []
    named = set()
    for route in routes:
        named.add(route.name)
        spec = route.spec
        config = {
            "action": route.action,
            "bind": spec.bind,  # as written, as the control socket's `routes` shows it
            "ports": list(spec.ports),
            "domains": list(route.domains),
            "priority": route.priority,
            "balance": route.balance if route.targets else None,
            "listening": list(listening.get(route.name, [])),
        }
        targets = [_target(row) for row in health.get(route.name, [])] or [
            # A route whose targets the forwarder does not dial itself (offload: the kernel does) has no health to show.
            _unmonitored(target)
            for target in spec.targets
        ]
        rows.append(_route(route.name, config, by_route.get(route.name, {}), targets, removed=False))
    for name in sorted(set(by_route) - named - {UNROUTED}):
        gone = dict.fromkeys(("action", "bind", "ports", "domains", "priority", "balance"), None) | {"listening": []}
        rows.append(_route(name, gone, by_route[name], [], removed=True))
    unrouted = by_route.get(UNROUTED, {})
    return {
        "format": FORMAT,
        "version": version,
        "time": time,
        "draining": draining,
        "reasons": list(REASONS),
        "totals": {
            "active": stats.get("active", 0),
            "total": stats.get("total", 0),
            "accept_errors": stats.get("accept_errors", 0),
            "bytes_in": stats.get("bytes_in", 0),
            "bytes_out": stats.get("bytes_out", 0),
            "terminations": dict(stats.get("terminations", {})),
        },
        "unrouted": {"total": unrouted.get("total", 0), "terminations": dict(unrouted.get("terminations", {}))},
        "routes": rows,
    }


def target_status(row: Mapping[str, Any]) -> str:
    """One word for a target, as the page colours it: up, down (failing its health checks),
    open or half-open (its circuit breaker)."""
    if not row["up"]:
        return "down"
    return "up" if row["circuit"] == "closed" else str(row["circuit"])


def _route(name: str, config: Mapping[str, Any], counts: Mapping[str, Any], targets: list[dict[str, Any]], *, removed: bool) -> dict[str, Any]:
    connect = counts.get("connect_time", {})
    offload = counts.get("offload")
    return {
        "name": name,
        "removed": removed,
        **config,
        "active": counts.get("active", 0),
        "total": counts.get("total", 0),
        "bytes_in": counts.get("bytes_in", 0),
        "bytes_out": counts.get("bytes_out", 0),
        "terminations": dict(counts.get("terminations", {})),
        "connects": connect.get("count", 0),
        "connect_time_sum_s": connect.get("sum", 0.0),
        "offload": dict(offload) if offload is not None else None,
        "targets": targets,
    }


# A target's fields in the document, after "target" and "status", as its stats row has them.
_TARGET_FIELDS = (
    "active", "warm", "up", "circuit", "usable", "retry_in_s", "consecutive_failures",
    "failures_total", "circuit_opens_total", "checks_passed", "checks_failed", "last_check",
)  # fmt: skip


def _target(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"target": row["target"], "status": target_status(row)} | {key: row[key] for key in _TARGET_FIELDS}


def _unmonitored(address: str) -> dict[str, Any]:
    return {"target": address, "status": "unmonitored"} | dict.fromkeys(_TARGET_FIELDS)


@functools.cache
def package_version() -> str:
    """triofwd's installed version, for the document ("" from a source tree never installed)."""
    try:
        return importlib.metadata.version("triofwd")
    except importlib.metadata.PackageNotFoundError:
        return ""
