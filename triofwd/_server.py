"""serve() and the Forwarder handle: listeners, the connection table, reload, drain, shutdown.

Two nurseries, as in hypercorn's trio worker: listeners in an inner one, connections
in an outer one. Stopping is: cancel the listeners, then give the outer nursery a
deadline of `shutdown_grace`; whatever is still open then is cancelled and records
`shutdown`. Embedding code that cancels the nursery around serve() gets the same end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import math
import types
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import trio

from ._accesslog import AccessLog
from ._config import Config
from ._connection import Connection, run_connection
from ._dial import format_address
from ._errors import ListenError
from ._limits import Gate
from ._offload import KernelRules, kernel_rules
from ._reasons import Reason
from ._table import CompiledRoute, ListenKey, RouteTable, compile_table
from ._targets import RouteTargets
from ._stats import Stats

__all__ = ["Forwarder", "ListenError", "serve"]

log = logging.getLogger("triofwd")

# After an accept() error that is not the pending connection's own (out of fds or memory,
# or anything unexpected), wait this long: the listener stays readable, so retrying at once
# would spin.
ACCEPT_BACKOFF = 0.1
ACCEPT_WARN_INTERVAL = 10.0
# A watcher (the control socket's `watch`) that falls this many events behind is dropped,
# so a slow reader can neither slow the forwarding path nor grow memory without bound.
WATCH_BUFFER = 1024
# How often the offload routes' kernel counters are read while rules are installed.
OFFLOAD_COUNTERS_EVERY = 2.0

# Connections taken from the backlog per wakeup of an accept loop before it yields anyway.
ACCEPT_BATCH = 32

# accept() errors that concern only the connection being accepted: accept(2), "Error
# handling": Linux passes already-pending network errors of the new socket on as accept's
# own error, to be treated like EAGAIN and retried (EPERM: a firewall rule refused it).
# The list is trio's (_ignorable_accept_errno_names in trio/_highlevel_socket.py); names a
# platform lacks are skipped.
ACCEPT_IGNORED_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
)  # fmt: skip


@dataclasses.dataclass(eq=False)
class _Listener:
    key: ListenKey
    address: str
    scope: trio.CancelScope


class Forwarder:
    """The handle serve() gives back: the live connection table and the controls.

    Read `connections` (a live read-only mapping of id -> Connection), `stats()`,
    `addresses`; call `reload(config)`, `drain()`, `shutdown()`.
    """

    def __init__(
        self, table: RouteTable, connections: trio.Nursery, listening: trio.Nursery, access_log: AccessLog | None, kernel: KernelRules
    ) -> None:
        self._table = table
        self._kernel = kernel
        self._connection_nursery = connections
        self._listening = listening
        self._access_log = access_log
        self._connections: dict[int, Connection] = {}
        self._listeners: dict[ListenKey, list[_Listener]] = {}
        self._ids = itertools.count(1)
        self._gate = Gate(table.limits)
        self._route_gates: dict[str, Gate] = {}
        self._targets: dict[str, RouteTargets] = {}
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._watchers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self._grace: float | None = None
        self.draining = False
        self.stats_counters = Stats()
        self.connections: Mapping[int, Connection] = types.MappingProxyType(self._connections)

    # -- what embedders and the control socket read ------------------------------------

    @property
    def table(self) -> RouteTable:
        return self._table

    @property
    def config(self) -> Config:
        return self._table.config

    @property
    def addresses(self) -> dict[str, list[str]]:
        """Route name -> the "ip:port" addresses it is listening on now."""
        out: dict[str, list[str]] = {}
        for key, listeners in self._listeners.items():
            for route in self._table.by_listener.get(key, ()):
                out.setdefault(route.name, []).extend(l.address for l in listeners)
        return out

    @property
    def stopping(self) -> bool:
        """shutdown() was called (or a signal asked for it)."""
        return self._stop.is_set()

    async def wait_stopped(self) -> None:
        """Wait until serve() has closed every listener and connection."""
        await self._stopped.wait()

    def stats(self) -> dict[str, Any]:
        """Totals, per route and reason; offload routes carry the kernel counters last read;
        `targets` has each target's health (routes that dial targets)."""
        return {**self.stats_counters.snapshot(self._connections.values(), self._kernel.counters), "targets": self.target_states()}

    async def read_offload_counters(self) -> dict[str, tuple[int, int]]:
        """Read the offload routes' packet and byte counters from the kernel (then in stats())."""
        return await self._kernel.read_counters()

    async def _keep_offload_counters_fresh(self) -> None:
        """stats(), metrics and the inspector show kernel counters at most this old."""
        while True:
            if self._kernel.installed:
                await self._kernel.read_counters()
            await trio.sleep(OFFLOAD_COUNTERS_EVERY)

    @contextlib.contextmanager
    def watch(self, buffer: int = WATCH_BUFFER) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """A stream of {"event": "open"|"close", ...connection row} while the block runs.

        A watcher that falls `buffer` events behind is dropped: its channel ends early.
        """
        send, receive = trio.open_memory_channel[dict[str, Any]](buffer)
        self._watchers.add(send)
        try:
            with receive:
                yield receive
        finally:
            self._watchers.discard(send)
            send.close()

    def _emit(self, event: str, conn: Connection) -> None:
        if not self._watchers:
            return
        message = {"event": event, **conn.describe()}
        for send in list(self._watchers):
            try:
                send.send_nowait(message)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.discard(send)  # too slow, or gone: drop it, never wait for it
                send.close()

    # -- controls --------------------------------------------------------------------

    def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting; let open connections run for `grace` (default shutdown_grace), then cancel them."""
        if grace is not None:
            self._grace = grace if self._grace is None else min(grace, self._grace)
            # Already stopping: a shorter grace takes effect at once.
            if self._stop.is_set():
                self._connection_nursery.cancel_scope.deadline = trio.current_time() + self._grace
        self._stop.set()

    def drain(self) -> None:
        """Stop accepting (listeners closed, ports released); open connections go on."""
        self.draining = True
        for listeners in self._listeners.values():
            for listener in listeners:
                listener.scope.cancel()

    async def reload(self, config: Config) -> dict[str, list[str]]:
        """Swap in a new route table; open connections keep the route they started on.

        The new table is compiled and its new ports bound before anything changes, so a
        bad file or a busy port raises (ConfigError, ListenError) and the old table stays.
        Returns the names of the routes added, removed and changed.
        """
        table = compile_table(config)
        old = self._table
        new_keys = [] if self.draining else [k for k in table.by_listener if k not in self._listeners]
        opened = await _bind_all(new_keys, optional=_offload_only(table))  # raises before anything has changed
        try:
            table = await self._kernel.prepare(table)  # the new rules in one nft transaction
        except BaseException:
            _close_all(opened)
            raise
        self._table = table
        self._gate.update(table.limits)
        before = {r.name: r for r in old.routes}
        after = {r.name: r for r in table.routes}
        for name in before.keys() - after.keys():
            # Open connections of a removed route keep their own holds; the table forgets it.
            self._route_gates.pop(name, None)
        for name, route in after.items():
            if name in self._route_gates:
                self._route_gates[name].update(route.limits)
        self._keep_targets(table)
        self._listen(opened)
        for key in [k for k in self._listeners if k not in table.by_listener]:
            for listener in self._listeners.pop(key):
                listener.scope.cancel()
        change = {
            "added": sorted(after.keys() - before.keys()),
            "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(n for n in before.keys() & after.keys() if before[n].spec != after[n].spec),
        }
        log.info("reloaded: %d routes (added %s, removed %s, changed %s)", len(table.routes),
                 change["added"], change["removed"], change["changed"])  # fmt: skip
        return change

    # -- internals used by the connection task ----------------------------------------

    def _next_id(self) -> int:
        return next(self._ids)

    def _route_gate(self, route: CompiledRoute) -> Gate:
        gate = self._route_gates.get(route.name)
        if gate is None:
            gate = self._route_gates[route.name] = Gate(route.limits)
        return gate

    def _targets_for(self, route: CompiledRoute) -> RouteTargets:
        found = self._targets.get(route.name)
        if found is not None and found.route.targets == route.targets:
            return found
        # The route was removed or its targets changed since this connection arrived: it
        # dials the targets it was routed to, plainly (no health state is kept for them).
        return RouteTargets(route)

    def _keep_targets(self, table: RouteTable) -> None:
        """One RouteTargets per route that dials targets. A route whose spec did not change
        keeps its own; a changed one gets a new one that carries over the state (health,
        circuit, warm sockets) of every target it still has."""
        before, self._targets = self._targets, {}
        for route in table.routes:
            if route.action not in ("forward", "bridge") or not route.targets:
                continue
            prior = before.pop(route.name, None)
            if prior is not None and prior.route.spec == route.spec:
                prior.route = route
                self._targets[route.name] = prior
                continue
            targets = self._targets[route.name] = RouteTargets(route, prior)
            for target in targets.dropped:
                target.close_warm()
            if prior is not None:
                prior.scope.cancel()
            if targets.watched:
                self._listening.start_soon(targets.run)
        for gone in before.values():
            gone.close()

    def _close_targets(self) -> None:
        for targets in self._targets.values():
            targets.close()
        self._targets.clear()

    def target_states(self) -> dict[str, list[dict[str, Any]]]:
        """Route name -> each target's health, circuit, active and warm counts."""
        now = trio.current_time()
        return {name: targets.describe(now) for name, targets in self._targets.items()}

    @contextlib.contextmanager
    def _tracked(self, conn: Connection) -> Iterator[None]:
        """The connection is in the table while the block runs; leaving it records the end.

        This is the one place where a connection's end is recorded: reason, stats,
        access log — on every path out of the connection task.
        """
        self.stats_counters.accepted += 1
        self._connections[conn.id] = conn
        self._emit("open", conn)
        try:
            yield
        finally:
            del self._connections[conn.id]
            conn.settle(Reason.NORMAL)
            conn.state = "closed"
            # Each record of the end on its own: one that fails must neither end the others
            # (the daemon) nor keep the rest from being written.
            _recorded(self.stats_counters.record, conn)
            _recorded(self._emit, "close", conn)
            if self._access_log is not None:
                _recorded(self._access_log.write, conn, conn.age())

    def _listen(self, opened: dict[ListenKey, list[trio.SocketListener]]) -> None:
        """Hand each bound socket to an accept task; registered at once, so `addresses` is true on return."""
        for key, sockets in opened.items():
            for sock in sockets:
                entry = _Listener(key, format_address(sock.socket.getsockname()), trio.CancelScope())
                self._listeners.setdefault(key, []).append(entry)
                self._listening.start_soon(self._accept_loop, entry, sock)

    async def _accept_loop(self, entry: _Listener, listener: trio.SocketListener) -> None:
        failures = 0  # in the current burst
        warned_at = -math.inf  # when this listener last warned
        warned = False  # the current burst was warned about
        try:
            with entry.scope:
                async with listener:
                    batch = 0
                    while True:
                        try:
                            # The raw accept() gives the peer's address with the socket: a client
                            # that resets before its task runs cannot make getpeername() fail later.
                            # Taken straight from the backlog while there are any; a trip
                            # through the scheduler only to wait, or after ACCEPT_BATCH of them.
                            if batch >= ACCEPT_BATCH or entry.scope.cancel_called:
                                batch = 0
                                await trio.lowlevel.checkpoint()  # and where drain() cancelled us, stop here
                            while (ready := _accept_ready(listener.socket)) is None:
                                batch = 0
                                await trio.lowlevel.wait_readable(listener.socket)
                            batch += 1
                            sock, peer = ready
                        except OSError as exc:
                            if exc.errno in ACCEPT_IGNORED_ERRNOS:
                                batch += 1
                                continue  # that one client is gone; nothing wrong with the listener
                            # Out of fds or memory: the pending connection stays queued and the
                            # socket stays readable, so back off. Bursts come in waves when fds
                            # flap, so warn at most once per ACCEPT_WARN_INTERVAL.
                            self.stats_counters.accept_errors += 1
                            failures += 1
                            now = trio.current_time()
                            if not warned and now - warned_at >= ACCEPT_WARN_INTERVAL:
                                log.warning("accept on %s failed: %s; backing off", entry.address, exc.strerror or exc)
                                warned, warned_at = True, now
                            await trio.sleep(ACCEPT_BACKOFF)
                            continue
                        if warned:
                            log.warning("accept on %s works again after %d failures", entry.address, failures)
                        failures, warned = 0, False
                        self._connection_nursery.start_soon(run_connection, self, trio.SocketStream(sock), peer, entry.key)
        finally:
            entries = self._listeners.get(entry.key, [])
            if entry in entries:
                entries.remove(entry)
                if not entries:
                    del self._listeners[entry.key]


def _recorded(record: Callable[..., object], *args: Any) -> None:
    try:
        record(*args)
    except Exception:  # noqa: BLE001 - see _tracked
        log.exception("recording the end of a connection failed (%s)", getattr(record, "__qualname__", record))


def _accept_ready(listener: trio.socket.SocketType) -> tuple[trio.socket.SocketType, Any] | None:
    """A connection waiting in the backlog, or None; accept() without trio's checkpoints around it."""
    try:
        sock, peer = listener._sock.accept()  # noqa: SLF001 - the non-blocking stdlib socket under trio's
    except BlockingIOError:
        return None
    return trio.socket.from_stdlib_socket(sock), peer


def _offload_only(table: RouteTable) -> set[ListenKey]:
    """Listeners only offload routes use: the kernel serves those ports, binding them is a courtesy."""
    return {k for k, routes in table.by_listener.items() if all(r.action == "offload" for r in routes)}


def _close_all(opened: dict[ListenKey, list[trio.SocketListener]]) -> None:
    for sockets in opened.values():
        for sock in sockets:
            sock.socket.close()


async def _bind_all(keys: list[ListenKey], optional: set[ListenKey] = frozenset()) -> dict[ListenKey, list[trio.SocketListener]]:  # type: ignore[assignment]
    """Bind every key or none: on the first failure, close what was opened and raise ListenError.

    A key in `optional` that cannot be bound is skipped with a warning instead.
    """
    opened: dict[ListenKey, list[trio.SocketListener]] = {}
    try:
        for key in keys:
            bind, port, _ = key
            try:
                opened[key] = await trio.open_tcp_listeners(port, host=bind)
            except OSError as exc:
                message = f"cannot listen on {format_address((bind, port))}: {exc.strerror or exc}"
                if key in optional:
                    log.warning("%s (an offload port: the kernel forwards it anyway)", message)
                    continue
                raise ListenError(exc.errno, message) from None
    except BaseException:
        _close_all(opened)
        raise
    return opened


async def serve(
    config: Config,
    *,
    access_log: IO[str] | None = None,
    task_status: trio.TaskStatus[Forwarder] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the forwarder for `config` until cancelled or shut down.

    Use with `nursery.start(serve, config)`: it returns the Forwarder once every port is
    bound; a bad config (ConfigError) or an unbindable port (ListenError) is raised to
    the caller instead. Cancelling the surrounding scope closes every connection
    (reason `shutdown`).
    """
    table = compile_table(config)
    fwd: Forwarder | None = None
    try:
        async with kernel_rules() as kernel:  # offload rules: installed here, removed on every way out
            table = await kernel.prepare(table)
            opened = await _bind_all(list(table.by_listener), optional=_offload_only(table))
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as listening:
                    fwd = Forwarder(table, connections, listening, AccessLog(access_log) if access_log else None, kernel)
                    try:
                        fwd._keep_targets(table)
                        fwd._listen(opened)
                        listening.start_soon(fwd._keep_offload_counters_fresh)
                        log.info("ready", extra={"fields": {"listeners": fwd.addresses}})
                        task_status.started(fwd)
                        await fwd._stop.wait()
                        log.info("shutting down: %d connections open", len(fwd._connections))
                        listening.cancel_scope.cancel()
                    finally:
                        fwd._close_targets()  # health checks stop, warm sockets close: none outlives serve
                grace = fwd._grace if fwd._grace is not None else fwd._table.shutdown_grace
                connections.cancel_scope.deadline = trio.current_time() + grace
        log.info("stopped")
    finally:
        if fwd is not None:
            fwd._stopped.set()  # on every way out: a waiter must not outlive serve()
