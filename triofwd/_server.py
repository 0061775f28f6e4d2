"""serve() and the Forwarder handle: the forwarder's life, reload, drain, shutdown.

Two nurseries, as in hypercorn's trio worker: listeners in an inner one, connections
in an outer one. Stopping is: cancel the listeners, then give the outer nursery a
deadline of `shutdown_grace`; whatever is still open then is cancelled and records
`shutdown`. Embedding code that cancels the nursery around serve() gets the same end.

What a connection may use lives in its ConnectionContext (`_context`); the listening
sockets and their accept tasks in `_listeners`; each route's targets in `_targets`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import trio

from ._accesslog import AccessLog, LineSink
from ._addresses import ListenKey
from ._config import Config
from ._connection import run_connection, run_session
from ._context import ConnectionContext
from ._datagrams import Flow
from ._engine import Engine
from ._listeners import Listeners, Opened, bind_all, close_all, offload_only
from ._offload import KernelRules, kernel_rules
from ._record import Connection
from ._systemd import PassedSockets
from ._table import RouteTable, as_table, route_changes

__all__ = ["Forwarder", "serve"]

log = logging.getLogger("triofwd")

# A watcher (the control socket's `watch`) that falls this many events behind is dropped,
# so a slow reader can neither slow the forwarding path nor grow memory without bound.
WATCH_BUFFER = 1024
# How often the offload routes' kernel counters are read while rules are installed.
OFFLOAD_COUNTERS_EVERY = 2.0


class Forwarder:
    """The handle serve() gives back: the live connection table and the controls.

    Read `connections` (a live read-only mapping of id -> Connection), `stats()`,
    `addresses`; call `reload(config)`, `drain()`, `shutdown()`.
    """

    def __init__(
        self,
        table: RouteTable,
        connections: trio.Nursery,
        listening: trio.Nursery,
        access_log: AccessLog | None,
        kernel: KernelRules,
        engine: Engine,
        passed: PassedSockets | None = None,
        first_id: int = 1,
        verdicts: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self._context = ConnectionContext(table, access_log, engine, first_id, verdicts)
        self._listeners = Listeners(listening, self._accept, self._accept_failed, passed)
        self._listeners.datagrams = engine.datagrams  # UDP listeners: the engine's datagram mover
        engine.datagrams.on_flow = self._session
        self._kernel = kernel
        self._passed = passed  # sockets systemd passed that a reload may still claim
        self._connection_nursery = connections
        self._listening = listening
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._grace: float | None = None
        self.draining = False
        self.connections: Mapping[int, Connection] = types.MappingProxyType(self._context.live)

    # -- what embedders and the control socket read ------------------------------------

    @property
    def table(self) -> RouteTable:
        return self._context.table

    @property
    def config(self) -> Config:
        return self._context.table.config

    @property
    def addresses(self) -> dict[str, list[str]]:
        """Route name -> the "ip:port" addresses it is listening on now."""
        return self._listeners.addresses(self._context.table)

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
        engine = self._context.engine
        snapshot = self._context.stats.snapshot(self._context.live.values(), self._kernel.counters, engine.datagrams.drops)
        moved = {"wakeups": engine.batches, "events": engine.events, "sockets": engine.registered,
                 "datagram_wakeups": engine.datagrams.batches, "datagram_events": engine.datagrams.events}  # fmt: skip
        return {**snapshot, "targets": self.target_states(), "engine": moved}

    def target_states(self) -> dict[str, list[dict[str, Any]]]:
        """Route name -> each target's health, circuit, active and warm counts."""
        return self._context.targets.describe(trio.current_time())

    async def read_offload_counters(self) -> dict[str, tuple[int, int]]:
        """Read the offload routes' packet and byte counters from the kernel (then in stats())."""
        return await self._kernel.read_counters()

    @contextlib.contextmanager
    def watch(self, buffer: int = WATCH_BUFFER) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """A stream of {"event": "open"|"close", ...connection row} while the block runs.

        A watcher that falls `buffer` events behind is dropped: its channel ends early.
        """
        send, receive = trio.open_memory_channel[dict[str, Any]](buffer)
        watchers = self._context.watchers
        watchers.add(send)
        try:
            with receive:
                yield receive
        finally:
            watchers.discard(send)
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
        self._listeners.close()

    def release_datagrams(self) -> None:
        """Another process reads the UDP listening sockets now (an upgrade's new generation):
        stop reading them at once, before any drain. Two readers of one socket would split a
        flow's datagrams between them; TCP listeners need nothing, an accepted connection is
        whole in whichever process accepted it."""
        self._context.engine.datagrams.release()

    def udp_sockets(self) -> list[socket.socket]:
        """The UDP listening sockets open now (some may only carry old sessions' replies)."""
        return self._context.engine.datagrams.listening_sockets()

    def on_udp_closed(self, callback: Callable[[socket.socket], object]) -> None:
        """`callback(sock)` as each UDP listening socket closes: at once when its listener
        stops without sessions, else with its last session (a worker tells its supervisor)."""
        self._context.engine.datagrams.on_closed = callback

    def follow_verdicts(self, down: Mapping[str, Iterable[str]]) -> None:
        """Health checks run elsewhere (serve's `verdicts`) say these targets are down now,
        route name -> "ip:port"s; every other checked target is up."""
        self._context.targets.follow(down)

    async def reload(self, config: Config | RouteTable) -> dict[str, list[str]]:
        """Swap in a new route table; open connections keep the route they started on.

        The new table is compiled (once: a RouteTable, or a Config from load_config, is
        taken as it is) and its new ports
        bound before anything changes, so a bad file or a busy port raises (ConfigError,
        ListenError) and the old table stays. Returns the names of the routes added,
        removed and changed.
        """
        table = as_table(config)
        old = self._context.table
        new_keys = [] if self.draining else [k for k in table.by_listener if k not in self._listeners.by_key]
        # A UDP port a reload dropped is still open while its sessions live: taken back, not bound again.
        with self._listeners.adopting(new_keys) as adopted:
            to_bind = [k for k in new_keys if k not in adopted]
            opened = await bind_all(to_bind, optional=offload_only(table), passed=self._passed)  # raises before anything has changed
            try:
                table = await self._kernel.prepare(table)  # the new rules in one nft transaction
            except BaseException:
                close_all(opened)
                raise
            self._context.update(table)
            self._context.targets.update(table.routes, self._listening.start_soon)
            self._listeners.listen({**opened, **adopted})
        self._listeners.close(k for k in self._listeners.by_key if k not in table.by_listener)
        self._listeners.configure(table)
        change = route_changes(old, table)
        log.info("reloaded: %d routes (added %s, removed %s, changed %s)", len(table.routes),
                 change["added"], change["removed"], change["changed"])  # fmt: skip
        return change

    # -- the forwarder's own tasks ----------------------------------------------------

    def _start(self, opened: Opened) -> None:
        self._context.targets.update(self._context.table.routes, self._listening.start_soon)
        self._listeners.listen(opened)
        self._listeners.configure(self._context.table)
        self._listening.start_soon(self._keep_offload_counters_fresh)

    def _accept(self, sock: socket.socket, peer: Any, key: ListenKey) -> None:
        self._connection_nursery.start_soon(run_connection, self._context, sock, peer, key)

    def _session(self, flow: Flow) -> None:
        """A new UDP flow: its session runs in a task of its own, as a connection does."""
        self._connection_nursery.start_soon(run_session, self._context, flow)

    def _accept_failed(self) -> None:
        self._context.stats.accept_errors += 1

    async def _keep_offload_counters_fresh(self) -> None:
        """stats(), metrics and the inspector show kernel counters at most this old."""
        while True:
            if self._kernel.installed:
                await self._kernel.read_counters()
            await trio.sleep(OFFLOAD_COUNTERS_EVERY)


async def serve(
    config: Config | RouteTable,
    *,
    access_log: LineSink | None = None,
    passed: PassedSockets | None = None,
    kernel: KernelRules | None = None,
    first_id: int = 1,
    verdicts: Mapping[str, Iterable[str]] | None = None,
    task_status: trio.TaskStatus[Forwarder] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the forwarder for `config` (compiled here, once; or a RouteTable already compiled)
    until cancelled or shut down.

    `access_log` takes one JSON line per connection (a text file, sys.stdout, or anything
    with write() and flush()). `passed`: listening sockets systemd passed in (socket
    activation), each used for the listener bound where it is, now and after a reload.
    `kernel`: who owns the offload routes' nftables rules (default: this forwarder; a
    worker process of `triofwd serve` leaves them to its supervisor, `ForeignRules`).
    `first_id`: the first connection's id (workers number theirs apart).
    `verdicts`: the routes' health checks run elsewhere (a worker's supervisor runs them
    once for all its workers), none here; these targets, route name -> "ip:port"s, are
    down from the start, and `Forwarder.follow_verdicts` brings the later verdicts.

    Use with `nursery.start(serve, config)`: it returns the Forwarder once every port is
    bound; a bad config (ConfigError) or an unbindable port (ListenError) is raised to
    the caller instead. Cancelling the surrounding scope closes every connection
    (reason `shutdown`).
    """
    table = as_table(config)
    fwd: Forwarder | None = None
    try:
        async with kernel_rules(kernel) as kernel:  # offload rules: installed here, removed on every way out
            table = await kernel.prepare(table)
            opened = await bind_all(table.by_listener, optional=offload_only(table), passed=passed)
            with contextlib.closing(Engine()) as engine:
                async with trio.open_nursery() as moving:  # the engine outlives every connection
                    moving.start_soon(engine.run, name="triofwd engine")
                    async with trio.open_nursery() as connections:
                        async with trio.open_nursery() as listening:
                            fwd = Forwarder(
                                table, connections, listening, AccessLog(access_log) if access_log else None, kernel, engine, passed, first_id, verdicts
                            )
                            try:
                                fwd._start(opened)
                                log.info("ready", extra={"fields": {"listeners": fwd.addresses}})
                                task_status.started(fwd)
                                await fwd._stop.wait()
                                log.info("shutting down: %d connections open", len(fwd.connections))
                                listening.cancel_scope.cancel()
                            finally:
                                fwd._context.targets.close()  # health checks stop, warm sockets close: none outlives serve
                        grace = fwd._grace if fwd._grace is not None else fwd.table.shutdown_grace
                        connections.cancel_scope.deadline = trio.current_time() + grace
                    moving.cancel_scope.cancel()  # every connection has left: nothing more to move
        log.info("stopped")
    finally:
        if fwd is not None:
            fwd._stopped.set()  # on every way out: a waiter must not outlive serve()
