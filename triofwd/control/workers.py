"""The control socket of a supervisor of worker processes: one socket, one set of numbers.

Every command is asked of each worker's private control socket, all at once, and the
answers are put together:

    connections       every worker's rows, by id, each with its `worker`
    connection, kill  the worker the id names: worker N numbers its connections from
                      N * ID_SPAN + 1, so ids are unique across workers
    stats, metrics    sums over the workers (target rows: counts summed, the worst
                      circuit state any worker is in; `up` and the checks are the
                      supervisor's, which runs them once per target), the supervisor's
                      offload counters, and the workers' count and restarts
    routes            the route table with every worker's active counts and target state,
                      the health checks' state the supervisor's
    reload            the supervisor's reload (checked once, then every worker)
    drain             the supervisor's sockets closed, every worker drained
    watch             the workers' event streams merged

A worker that is being started again is left out of an answer until it is ready: its
counters start at zero again (a counter of the sum can go down then, as when a
process restarts).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Protocol

import trio

from .._errors import ControlError
from .._metrics import render_metrics
from .._server import WATCH_BUFFER
from .._status import package_version, status_document
from .._table import RouteTable
from .._worker import ID_SPAN
from .client import open_control
from .messages import ConnectionsArgs, IdArgs, NoArgs
from .server import ControlServer, ReloadFn, _CommandError

__all__ = ["Fleet", "WorkersControl", "merge_stats", "merge_targets", "with_checks"]

log = logging.getLogger("triofwd.control")

# How long one worker may take to answer; one that does not is left out of the answer.
ASK_TIMEOUT = 5.0
# The circuit states from best to worst: a merged row shows the worst any worker sees.
CIRCUIT_ORDER = ("closed", "half-open", "open")
# Target row keys that add up over workers; the others show the worst or the latest.
TARGET_SUMS = frozenset({"active", "warm", "failures_total", "circuit_opens_total", "checks_passed", "checks_failed"})
# Target row keys that are the supervisor's: it runs the health checks, the workers follow.
CHECK_KEYS = ("up", "checks_passed", "checks_failed", "last_check")


class Fleet(Protocol):
    """What the control socket needs of the supervisor."""

    @property
    def table(self) -> RouteTable: ...
    @property
    def addresses(self) -> dict[str, list[str]]: ...
    @property
    def draining(self) -> bool: ...
    @property
    def restarts(self) -> int: ...
    def controls(self) -> dict[int, str]:
        """Worker number -> its private control socket, for each worker ready now."""
        ...

    def checked(self) -> dict[str, list[dict[str, Any]]]:
        """Route name -> each target's state as the supervisor's health checks see them."""
        ...

    def drain(self) -> None: ...
    async def read_offload_counters(self) -> dict[str, tuple[int, int]]: ...


class WorkersControl(ControlServer):
    """The control protocol's commands, answered for all the workers of a supervisor."""

    def __init__(self, fleet: Fleet, *, reload: ReloadFn | None = None, watch_buffer: int = WATCH_BUFFER) -> None:
        # Not ControlServer.__init__: there is no Forwarder in this process. Every command
        # that would read one is one of these.
        self.fleet = fleet
        self.reload = reload
        self.watch_buffer = watch_buffer
        self._sessions = 0
        self._handlers = {
            "connections": self._all_connections,
            "connection": self._one_connection,
            "kill": self._kill_one,
            "stats": self._summed_stats,
            "routes": self._all_routes,
            "reload": self._reload,
            "drain": self._drain_all,
            "metrics": self._summed_metrics,
        }

    # -- asking the workers -----------------------------------------------------------

    async def ask_all(self, cmd: str, **args: Any) -> dict[int, Any]:
        """Worker number -> its answer, from every worker that answers within ASK_TIMEOUT."""
        answers: dict[int, Any] = {}

        async def ask(number: int, path: str) -> None:
            with trio.move_on_after(ASK_TIMEOUT):
                try:
                    async with open_control(path) as client:
                        answers[number] = await client.request(cmd, **args)
                except (OSError, ControlError) as exc:  # being started again, or just gone
                    log.debug("control: worker %d did not answer %s: %s", number, cmd, exc)

        async with trio.open_nursery() as nursery:
            for number, path in self.fleet.controls().items():
                nursery.start_soon(ask, number, path)
        return dict(sorted(answers.items()))

    async def _ask_owner(self, cmd: str, conn_id: int) -> Any:
        path = self.fleet.controls().get(conn_id // ID_SPAN)
        if path is None:
            raise _CommandError(f"no connection {conn_id}")
        try:
            async with open_control(path) as client:
                return await client.request(cmd, id=conn_id)
        except ControlError as exc:
            raise _CommandError(str(exc)) from None
        except OSError:
            raise _CommandError(f"no connection {conn_id}: its worker is not running") from None

    # -- commands -------------------------------------------------------------------

    async def _all_connections(self, args: ConnectionsArgs) -> list[dict[str, Any]]:
        given = {k: v for k, v in (("route", args.route), ("client", args.client)) if v is not None}
        answers = await self.ask_all("connections", **given)
        rows = [{**row, "worker": number} for number, rows in answers.items() for row in rows]
        return sorted(rows, key=lambda row: int(row["id"]))

    async def _one_connection(self, args: IdArgs) -> dict[str, Any]:
        return {**await self._ask_owner("connection", args.id), "worker": args.id // ID_SPAN}

    async def _kill_one(self, args: IdArgs) -> dict[str, Any]:
        row = await self._ask_owner("kill", args.id)
        log.info("control: killed connection %d", args.id, extra={"fields": {"id": args.id}})
        return {**row, "worker": args.id // ID_SPAN}

    async def stats(self) -> dict[str, Any]:
        """The workers' stats summed, as the `stats` command answers (histogram bounds as strings)."""
        answers = await self.ask_all("stats")
        merged = merge_stats(answers.values())
        for route, rows in self.fleet.checked().items():
            merged["targets"][route] = with_checks(merged["targets"].get(route, []), rows)
        merged.setdefault("routes", {})
        for name, (packets, nbytes) in (await self.fleet.read_offload_counters()).items():
            route = merged["routes"].setdefault(name, {"active": 0, "total": 0, "bytes_in": 0, "bytes_out": 0, "terminations": {}})
            route["offload"] = {"packets": packets, "bytes": nbytes}
        merged["draining"] = self.fleet.draining
        merged["workers"] = {"count": len(self.fleet.controls()), "answered": len(answers), "restarts": self.fleet.restarts}
        return merged

    async def _summed_stats(self, args: NoArgs) -> dict[str, Any]:
        return await self.stats()

    async def _all_routes(self, args: NoArgs) -> list[dict[str, Any]]:
        answers = await self.ask_all("routes")
        by_name: dict[str, list[Mapping[str, Any]]] = {}
        for rows in answers.values():
            for row in rows:
                by_name.setdefault(row["name"], []).append(row)
        listening = self.fleet.addresses
        checked = self.fleet.checked()
        out = []
        for route in self.fleet.table.routes:
            rows = by_name.get(route.name, [])
            # A worker's row as it describes the route (every field), with what the supervisor
            # knows better (the sockets) and what adds up over the workers.
            first = rows[0] if rows else {"name": route.name, "action": route.action, "bind": route.spec.bind, "ports": list(route.spec.ports)}
            out.append({
                **first,
                "listening": listening.get(route.name, []),
                "active": sum(row["active"] for row in rows),
                "target_state": with_checks(merge_targets(row["target_state"] for row in rows), checked.get(route.name, [])),
            })  # fmt: skip
        return out

    async def _drain_all(self, args: NoArgs) -> dict[str, Any]:
        self.fleet.drain()
        answers = await self.ask_all("drain")
        active = sum(answer["active"] for answer in answers.values())
        log.info("control: draining, listeners closed", extra={"fields": {"active": active}})
        return {"draining": True, "active": active}

    async def _summed_metrics(self, args: NoArgs) -> str:
        return await self.metrics_text()

    async def metrics_text(self) -> str:
        """The Prometheus text for every worker (the `metrics` command and /metrics)."""
        return render_metrics(_raw(await self.stats()), (route.name for route in self.fleet.table.routes))

    async def status_json(self) -> dict[str, Any]:
        """The status page's data for every worker (/status.json)."""
        return status_document(
            _raw(await self.stats()), self.fleet.table.routes, self.fleet.addresses, time=time.time(), draining=self.fleet.draining, version=package_version()
        )

    # -- watch ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """The workers' open/close events, merged; all end when the reader falls behind."""
        send, receive = trio.open_memory_channel[dict[str, Any]](self.watch_buffer)
        async with trio.open_nursery() as nursery:
            with send:
                for path in self.fleet.controls().values():
                    await nursery.start(self._relay, path, send.clone(), nursery.cancel_scope)
            with receive:
                yield receive
            nursery.cancel_scope.cancel()

    async def _relay(
        self, path: str, send: trio.MemorySendChannel[dict[str, Any]], stop: trio.CancelScope, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        with send:
            try:
                async with open_control(path) as client:
                    request_id = await client.send("watch", {})
                    while (await client.receive()).get("id") != request_id:
                        pass  # the ok reply: every event after it is relayed
                    task_status.started()
                    started = True
                    while "event" in (message := await client.receive()):
                        try:
                            send.send_nowait(message)
                        except trio.WouldBlock:
                            stop.cancel()  # the reader is too slow: every stream ends
                            return
            except (OSError, ControlError) as exc:
                log.debug("control: a worker's watch ended: %s", exc)
            if not started:
                task_status.started()  # a worker gone before its stream began is left out


def _add(a: Any, b: Any) -> Any:
    """b added into a copy of a: numbers summed, tables key by key, `draining` and other flags or-ed."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for key, value in b.items():
            out[key] = _add(out[key], value) if key in out else value
        return out
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) or bool(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a + b
    return a


def merge_stats(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The `stats` answers of several workers as one: counts and bytes summed, route by route
    and reason by reason; `targets` merged row by row (merge_targets)."""
    merged: dict[str, Any] = {}
    targets: dict[str, list[list[Mapping[str, Any]]]] = {}
    for part in parts:
        for route, rows in part.get("targets", {}).items():
            targets.setdefault(route, []).append(rows)
        merged = _add(merged, {k: v for k, v in part.items() if k != "targets"})
    merged["targets"] = {route: merge_targets(lists) for route, lists in targets.items()}
    return merged


def merge_targets(lists: Iterable[Iterable[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Each target's state over every worker: counts summed, `up` and `usable` only where
    every worker says so, the worst circuit state, the largest of the other numbers."""
    merged: dict[str, dict[str, Any]] = {}
    for rows in lists:
        for row in rows:
            into = merged.get(row["target"])
            if into is None:
                merged[row["target"]] = dict(row)
                continue
            for key, value in row.items():
                old = into.get(key)
                if key in TARGET_SUMS:
                    into[key] = (old or 0) + value
                elif key == "circuit":
                    into[key] = max(old, value, key=lambda state: CIRCUIT_ORDER.index(state) if state in CIRCUIT_ORDER else 0)
                elif isinstance(value, bool):
                    into[key] = bool(old) and value
                elif isinstance(value, int | float) and isinstance(old, int | float):
                    into[key] = max(old, value)
                elif old is None:
                    into[key] = value
    return list(merged.values())


def with_checks(merged: list[dict[str, Any]], checked: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The workers' merged rows of one route's targets with the supervisor's health-check
    state, once per target: `up`, the checks' counts and the last one's outcome; `usable`
    only where it is up too. A target no worker answered for shows the supervisor's row."""
    by_target = {row["target"]: row for row in merged}
    for row in checked:
        into = by_target.get(row["target"])
        if into is None:
            merged.append(dict(row))
            continue
        into.update({key: row[key] for key in CHECK_KEYS})
        into["usable"] = bool(into.get("usable")) and row["up"]
    return merged


def _raw(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The summed `stats` answer in the form Forwarder.stats() gives (histogram bounds as
    numbers, in order), which render_metrics and status_document read."""
    routes = {}
    for name, route in stats.get("routes", {}).items():
        histogram = route.get("connect_time")
        if histogram is not None:
            buckets = sorted((float(bound), count) for bound, count in histogram["buckets"].items())
            route = {**route, "connect_time": {**histogram, "buckets": buckets}}
        routes[name] = route
    return {**stats, "routes": routes}
