"""`triofwd serve` with [settings] workers > 1: a supervisor and its worker processes.

    supervisor ─ binds every listener once: one SO_REUSEPORT socket per worker (_reuseport)
       │         installs and removes the offload rules; serves --control and --metrics
       │         for all the workers (control.workers); SIGHUP, SIGTERM, SIGUSR1, and
       │         SIGUSR2: a new generation takes its sockets over (_upgrade); runs the
       │         health checks, once per target, and tells every worker the verdicts
       ├─ worker 1 ─ an ordinary serve() on its sockets (_worker), a private control socket
       ├─ worker 2
       └─ ...      a worker that exits is started again, with a back-off, on the same sockets

The supervisor keeps its copy of every socket open, so the queue of a worker that died
keeps the connections that arrive meanwhile for the worker that replaces it. Workers
ignore SIGINT (a Ctrl-C in the terminal reaches the whole process group: the supervisor
stops them, once) and die with the supervisor (PR_SET_PDEATHSIG, and their channel's EOF).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import msgspec
import trio

from . import _systemd as systemd
from ._addresses import UDP_OWNER, ListenKey, format_address, is_udp
from ._config import worker_count
from ._errors import ConfigError, ListenError
from ._listeners import offload_only
from ._metrics_http import serve_metrics_on
from ._offload import KernelRules, forwarded_instead, kernel_rules
from ._reuseport import Group, bind_group, close_groups, steer, steered_keys
from ._table import RouteTable, load_table, route_changes
from ._targets import TargetRegistry
from ._upgrade import UPGRADE_ENV, Handed, hand_over
from ._worker import MESSAGE_MAX, WORKER_ENV, Answer, HandedOver, Ready, Released, Reload, ReloadSpec, Said, Verdicts, WorkerSpec, carrying, socket_inode
from .control.workers import WorkersControl

__all__ = ["Supervisor", "supervise"]

log = logging.getLogger("triofwd.supervisor")

# A worker that exits is started again after RESTART_FIRST seconds, doubling up to
# RESTART_MAX for one that keeps failing; one that ran STABLE_AFTER seconds starts afresh.
RESTART_FIRST = 0.1
RESTART_MAX = 30.0
STABLE_AFTER = 10.0
# How long a worker may take to apply a reload before the supervisor stops waiting for it.
RELOAD_TIMEOUT = 30.0
# How long telling the workers of an upgrade (HandedOver) may wait for one that does not read.
TELL_TIMEOUT = 5.0
# After shutdown_grace, workers that are still there are killed this much later.
STOP_MARGIN = 5.0
# How long a new generation (SIGUSR2) may take to have every worker ready.
UPGRADE_TIMEOUT = 60.0
# systemd's variables are the supervisor's: a worker neither notifies nor pings.
SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
EXIT_CANNOT_START = 2


class Worker:
    """One worker slot: its number, its private control socket, its process while it runs."""

    def __init__(self, number: int, control: str) -> None:
        self.number = number
        self.control = control
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: trio.socket.SocketType | None = None
        self.ready = False
        self.ever_ready = False  # ready at least once: its exits from now on are restarts
        self.lock = trio.Lock()  # one request (and the wait for its answer) at a time
        self.sending = trio.Lock()  # one message down the channel at a time (trio: one sender)
        self.replies: trio.MemoryReceiveChannel[Answer | None] | None = None
        self.verdicts_due = trio.Event()  # set when a verdict turned: it is told the new set
        # The UDP listening sockets (inodes) its process holds, as it says: in "ready" and in
        # each reload's answer, less each "released"; nothing once it exits.
        self.holding: set[int] = set()

    async def send(self, message: bytes, fds: list[int] | None = None) -> None:
        """One message down its channel (OSError: the worker is gone, or going)."""
        async with self.sending:
            if self.channel is None:
                raise BrokenPipeError("the worker is not running")
            await self.channel.sendmsg([message], carrying(fds or []))


class Supervisor:
    """The listeners, the offload rules and the worker processes of one `triofwd serve`."""

    def __init__(
        self, args: argparse.Namespace, table: RouteTable, count: int, rundir: str, handed: Handed | None = None, passed: systemd.PassedSockets | None = None
    ) -> None:
        self.args = args
        self.handed = handed  # the sockets of the generation before (an upgrade), used instead of binding
        self.passed = passed  # systemd's sockets (socket activation), used instead of binding
        self.upgraded = False  # a new generation took over: it owns the sockets, rules and control socket now
        self._upgrading = False
        self._front = trio.CancelScope()  # the control socket and metrics: the new generation answers after an upgrade
        self.count = count
        self._table = table
        self.groups: dict[ListenKey, Group] = {}
        self.retired: dict[ListenKey, Group] = {}  # UDP listeners a reload dropped, open in workers still (_retire)
        self.kernel = KernelRules()
        self.forwarded: frozenset[str] = frozenset()
        self.rundir = rundir  # 0700: the workers' control sockets, their specs, the reload specs
        self.workers = [Worker(n, os.path.join(rundir, f"worker-{n}.sock")) for n in range(1, count + 1)]
        self._restarts = 0
        self._draining = False
        self._stopped = trio.Event()
        self._reload_lock = trio.Lock()
        self._reloads = 0  # the serial of the last Reload sent
        self._first_ready, self._first_ready_events = trio.open_memory_channel[tuple[int, bool]](math.inf)
        # The health checks: here, once per target for every worker (workers follow the
        # verdicts); no warm sockets, those are the workers', who dial.
        self.checks = TargetRegistry(warm=False, on_verdict=self._verdicts_turned)
        self._verdicts = b""  # the latest Verdicts message, sent once a verdict has turned
        self._checking: trio.Nursery | None = None  # where the checks run, while they do

    # -- what the control socket reads (control.workers.Fleet) --------------------------

    @property
    def table(self) -> RouteTable:
        return self._table

    @property
    def addresses(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, group in self.groups.items():
            for route in self._table.by_listener.get(key, ()):
                out.setdefault(route.name, []).append(group.address)
        return out

    @property
    def stopping(self) -> bool:
        """SIGTERM/SIGINT came: workers are stopping, none is started again."""
        return self._stopped.is_set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def restarts(self) -> int:
        return self._restarts

    def controls(self) -> dict[int, str]:
        return {w.number: w.control for w in self.workers if w.ready}

    def checked(self) -> dict[str, list[dict[str, Any]]]:
        """Route name -> each target's state as the health checks here see them."""
        return self.checks.describe(trio.current_time())

    def drain(self) -> None:
        """Stop accepting: the supervisor's copies closed (each worker closes its own), no worker started again."""
        self._draining = True
        self._close_listeners()

    def _close_listeners(self) -> None:
        """The supervisor's copies of every listening socket, retired ones too, closed."""
        close_groups([*self.groups.values(), *self.retired.values()])
        self.groups, self.retired = {}, {}

    async def read_offload_counters(self) -> dict[str, tuple[int, int]]:
        return await self.kernel.read_counters()

    # -- the listeners ------------------------------------------------------------------

    def _bind(self, keys: Iterable[ListenKey], table: RouteTable) -> dict[ListenKey, Group]:
        """A reuseport group for each key, or none (ListenError); an offload-only port that
        cannot be bound is skipped with a warning, as serve() does."""
        optional, steered = offload_only(table), steered_keys(table)
        opened: dict[ListenKey, Group] = {}
        try:
            for key in keys:
                if key in self.retired:  # a UDP port dropped while its sessions lived: the same sockets again
                    opened[key] = group = self.retired[key]
                    self._steer(group, key in steered)
                    continue
                inherited = self.handed.groups.pop(key, []) if self.handed is not None else []
                if len(inherited) == self.count:  # the same queues the generation before accepted from
                    opened[key] = group = Group(key, inherited)
                    self._steer(group, key in steered)
                    continue
                for sock in inherited:
                    sock.close()
                if (activated := self._activated(key)) is not None:
                    opened[key] = activated
                    if key in steered:
                        log.warning("%s is systemd's socket, one queue for every worker: per-IP limits count per worker there", activated.address)
                    continue
                try:
                    opened[key] = group = bind_group(key, self.count)
                except ListenError as exc:
                    if key not in optional:
                        raise
                    log.warning("%s (an offload port: the kernel forwards it anyway)", exc)
                    continue
                self._steer(group, key in steered)
        except BaseException:
            self._discard(opened)
            raise
        return opened

    def _activated(self, key: ListenKey) -> Group | None:
        """The socket systemd passed for a TCP key (socket activation), as a group that hands
        that one socket to every worker: systemd binds one socket per address, so the workers
        share its queue (and per-IP steering, which needs a socket each, is not done)."""
        if self.passed is None or is_udp(key):  # a UDP listener binds its own, as with one process
            return None
        bind, port, _ = key
        sock = self.passed.claim([(bind, port, "tcp")]).get((bind, port, "tcp"))
        if sock is None:
            return None
        return Group(key, [sock] * self.count, activated=True)

    def _let_go(self, group: Group) -> None:
        """A group no listener uses: closed, or systemd's socket given back, open, for a
        later reload to claim again (systemd holds it for the life of the service)."""
        if not (group.activated and self.passed is not None and self.passed.give_back(group.sockets[0])):
            group.close()

    def _discard(self, opened: dict[ListenKey, Group]) -> None:
        """Close what a failed start or reload opened, but not a retired group it took up
        again: workers' sessions may still reply through it."""
        for key, group in opened.items():
            if self.retired.get(key) is not group:
                self._let_go(group)

    def _retire(self, key: ListenKey, group: Group) -> None:
        """A listener the route table dropped. A UDP one stays open in the workers while its
        sessions reply through it, so the supervisor keeps its copies too, and a reload that
        listens there again meanwhile gets the same sockets back: a new group would join the
        workers' sockets in the kernel (one address, SO_REUSEPORT), and the program would
        steer to sockets no worker reads. Closed once no worker holds them (_close_unheld)."""
        if is_udp(key):
            self.retired[key] = group
        else:
            self._let_go(group)

    def _released(self) -> None:
        """A worker let go of UDP sockets (it said "released", or it exited): the retired
        groups that no worker holds now close, unless a reload, which may be taking one up
        again, is under way (it looks itself when it is done)."""
        if not self._reload_lock.locked():
            self._close_unheld()

    def _close_unheld(self) -> None:
        """Close the retired groups no worker holds any more (their last session has ended
        everywhere), which releases their ports."""
        held = set().union(*(worker.holding for worker in self.workers))
        for key, group in list(self.retired.items()):
            if not any(socket_inode(sock) in held for sock in group.sockets):
                del self.retired[key]
                group.close()

    @staticmethod
    def _steer(group: Group, by_client: bool) -> None:
        if group.activated:  # systemd's one socket: not a group, nothing to steer
            return
        try:
            steer(group, by_client)
        except OSError as exc:
            log.warning("cannot steer %s by client address (%s): per-IP limits count per worker there", group.address, exc.strerror or exc)

    def _ports(self) -> dict[str, int]:
        """The port each port-0 route got (its workers listen on the same one), by route name:
        a UDP route's key owner is its name with UDP_OWNER after it."""
        return {key[2].removesuffix(UDP_OWNER): group.port for key, group in self.groups.items() if key[1] == 0}

    # -- the workers ----------------------------------------------------------------------

    def _command(self) -> list[str]:
        args = self.args
        command = [sys.executable, "-m", "triofwd", "serve", args.routefile, "--log-level", args.log_level, "--log-format", args.log_format]
        return command + (["--access-log", args.access_log] if args.access_log else [])

    async def _run_once(self, worker: Worker) -> int:
        """Start the worker's process on the sockets of now, and wait until it exits."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            index = worker.number - 1
            sockets = [group.sockets[index].fileno() for group in self.groups.values()]
            spec = WorkerSpec(
                number=worker.number, count=self.count, parent=os.getpid(), channel=theirs.fileno(), control=worker.control,
                sockets=sockets, ports=self._ports(), forwarded=sorted(self.forwarded), down=self.checks.down(),
            )  # fmt: skip
            env = {k: v for k, v in os.environ.items() if k not in SUPERVISOR_ONLY}
            env[WORKER_ENV] = _write(os.path.join(self.rundir, f"worker-{worker.number}.json"), spec)
            try:
                # Started from the event loop's own thread, not from a worker thread as
                # trio.run_process would: PR_SET_PDEATHSIG fires when the thread that forked
                # the child ends, and trio's idle worker threads end after a while.
                process = subprocess.Popen(self._command(), env=env, pass_fds=[theirs.fileno(), *sockets])  # noqa: ASYNC220
            finally:
                theirs.close()
            if self.stopping:  # stopped while it started: it stops with the others
                process.send_signal(signal.SIGTERM)
            channel = trio.socket.from_stdlib_socket(ours)
            send, replies = trio.open_memory_channel[Answer | None](math.inf)
            worker.process, worker.channel, worker.replies = process, channel, replies
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._hear, worker, channel, send)
                    nursery.start_soon(self._tell_verdicts, worker)
                    code = await _exited(process)
                    nursery.cancel_scope.cancel()
            finally:
                worker.process = worker.channel = worker.replies = None
                worker.ready = False
                worker.holding = set()  # its sockets died with it
                self._released()
        return code

    async def _hear(self, worker: Worker, channel: trio.socket.SocketType, replies: trio.MemorySendChannel[Answer | None]) -> None:
        """What the worker says: that it is ready, then the answers to reloads, and which UDP
        sockets it holds (with each of those, and as one closes); None when it is gone. The
        worker says it all in order, so the last word on its sockets is the true one."""
        with replies:
            while data := await _received(channel):
                try:
                    message = msgspec.json.decode(data, type=Said)
                except msgspec.DecodeError as exc:  # not expected; one bad message changes nothing
                    log.error("worker %d said something unreadable: %s", worker.number, exc)
                    continue
                if isinstance(message, Released):
                    worker.holding.discard(message.inode)
                    self._released()
                    continue
                worker.holding = set(message.holding)
                if isinstance(message, Ready):
                    worker.ready = True
                    if not worker.ever_ready:
                        worker.ever_ready = True
                        self._first_ready.send_nowait((worker.number, True))
                else:
                    replies.send_nowait(message)
            replies.send_nowait(None)

    async def _keep(self, worker: Worker) -> None:
        """Keep the worker running until the supervisor stops: started again when it exits."""
        backoff = RESTART_FIRST
        while not self._stopped.is_set():
            began = trio.current_time()
            code = await self._run_once(worker)
            if self._stopped.is_set():
                return
            if not worker.ever_ready:
                self._first_ready.send_nowait((worker.number, False))
                log.error("worker %d exited (%s) before it was ready", worker.number, _status(code))
                return
            if self._draining:
                log.info("worker %d exited (%s) while draining: not started again", worker.number, _status(code))
                return
            if trio.current_time() - began >= STABLE_AFTER:
                backoff = RESTART_FIRST
            self._restarts += 1
            log.warning("worker %d exited (%s): starting it again in %.1fs", worker.number, _status(code), backoff,
                        extra={"fields": {"restarts": self._restarts}})  # fmt: skip
            with trio.move_on_after(backoff):
                await self._stopped.wait()
            backoff = min(backoff * 2, RESTART_MAX)

    # -- reload -------------------------------------------------------------------------

    async def reload(self) -> dict[str, list[str]]:
        """Check the route file once, bind its new ports and install its offload rules (any
        failure raises and changes nobody), then have every worker load it."""
        async with self._reload_lock:
            with systemd.reloading():
                table = load_table(self.args.routefile)
                if self.stopping:
                    raise ListenError(0, "stopping: the route file is not loaded again")
                if self._upgrading:  # the sockets are being handed to a new generation: reload that one
                    raise ListenError(0, "an upgrade is under way: the route file is not loaded again (reload the new generation)")
                if worker_count(table.config.settings.workers) != self.count:
                    log.warning("[settings] workers changed: it takes effect when triofwd starts again (%d workers now)", self.count)
                try:
                    new_keys = [] if self._draining else [k for k in table.by_listener if k not in self.groups]
                    opened = self._bind(new_keys, table)
                    try:
                        served = await self.kernel.prepare(table)
                    except BaseException:
                        self._discard(opened)
                        raise
                    old, self._table, self.forwarded = self._table, table, forwarded_instead(table, served)
                    self.groups.update(opened)  # from here, a worker that starts gets the new sockets
                    for key in opened:
                        self.retired.pop(key, None)
                    if self._checking is not None:  # the checks follow the new table, as a forwarder's do
                        self.checks.update(table.routes, self._checking.start_soon)
                    self._reloads += 1
                    with contextlib.suppress(FileNotFoundError):  # the one before: its reload is over
                        os.unlink(os.path.join(self.rundir, f"reload-{self._reloads - 1}.json"))
                    spec = _write(os.path.join(self.rundir, f"reload-{self._reloads}.json"), ReloadSpec(ports=self._ports(), forwarded=sorted(self.forwarded)))
                    request = msgspec.json.encode(Reload(path=spec, serial=self._reloads))
                    async with trio.open_nursery() as nursery:
                        for worker in self.workers:
                            nursery.start_soon(self._reload_worker, worker, request, opened)
                    self._verdicts_turned()  # every worker hears the verdicts of its new table's targets
                    steered = steered_keys(table)
                    for key in [k for k in self.groups if k not in table.by_listener]:
                        self._retire(key, self.groups.pop(key))
                    for key, group in self.groups.items():
                        self._steer(group, key in steered)
                    change = route_changes(old, table)
                    log.info("reloaded: %d routes (added %s, removed %s, changed %s)", len(table.routes),
                             change["added"], change["removed"], change["changed"])  # fmt: skip
                    return change
                finally:  # what workers let go of meanwhile, and what this reload retired
                    self._close_unheld()

    async def _reload_worker(self, worker: Worker, request: bytes, opened: dict[ListenKey, Group]) -> None:
        """Send the worker its sockets of the new listeners and the reload; wait for its answer.
        A worker not running now loads the file when it starts, with every socket of now."""
        async with worker.lock:
            channel, replies = worker.channel, worker.replies
            if channel is None or replies is None:
                return
            try:
                await worker.send(request, [group.sockets[worker.number - 1].fileno() for group in opened.values()])
            except OSError:  # exited meanwhile: its replacement starts on the new table
                return
            with trio.move_on_after(RELOAD_TIMEOUT) as waited:
                while (reply := await replies.receive()) is not None and reply.serial != self._reloads:
                    pass  # the late answer to a reload it did not apply in time: that one is over
            if waited.cancelled_caught:
                log.error("worker %d did not apply the reload within %.0fs", worker.number, RELOAD_TIMEOUT)
            elif reply is not None and reply.error is not None:
                log.error("worker %d kept its old routes: %s", worker.number, reply.error)

    # -- stopping -----------------------------------------------------------------------

    def stop(self, nursery: trio.Nursery) -> None:
        """SIGTERM/SIGINT: close the supervisor's sockets and stop every worker gracefully (a
        second time: at once). Workers still there after shutdown_grace are killed."""
        first = not self._stopped.is_set()
        self._stopped.set()
        self._close_listeners()
        for process in self._running().values():
            process.send_signal(signal.SIGTERM)
        if first:
            nursery.start_soon(self._kill_late, self._table.shutdown_grace + STOP_MARGIN)

    # -- health checks ------------------------------------------------------------------

    async def _check_targets(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the routes' health checks (once per target, for every worker) until cancelled.
        A worker that starts gets the verdicts of then in its WorkerSpec, before it serves;
        later turns reach it through _tell_verdicts."""
        try:
            async with trio.open_nursery() as checking:
                self._checking = checking
                self.checks.update(self._table.routes, checking.start_soon)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._checking = None
            self.checks.close()

    def _verdicts_turned(self) -> None:
        """A verdict turned (or a reload changed the targets): the set of targets down now,
        encoded once, goes to every worker."""
        self._verdicts = msgspec.json.encode(Verdicts(down=self.checks.down()))
        for worker in self.workers:
            worker.verdicts_due.set()

    async def _tell_verdicts(self, worker: Worker) -> None:
        """While the worker runs: whenever a verdict turned, it hears the whole set of targets
        down now. A worker slow to read holds up only itself, and hears the latest set."""
        while True:
            await worker.verdicts_due.wait()
            worker.verdicts_due = trio.Event()  # a turn while this one is sent: sent again
            try:
                await worker.send(self._verdicts)
            except OSError:  # exiting: its replacement starts with the verdicts of then
                return

    async def _kill_late(self, delay: float) -> None:
        await trio.sleep(delay)
        for number, process in self._running().items():
            log.error("worker %d (pid %d) still there %.0fs after SIGTERM: killed", number, process.pid, delay)
            process.kill()

    def signal_workers(self, signum: int) -> None:
        for process in self._running().values():
            process.send_signal(signum)

    def _running(self) -> dict[int, subprocess.Popen[bytes]]:
        """Worker number -> its process, for those that have not exited."""
        return {w.number: w.process for w in self.workers if w.process is not None and w.process.poll() is None}

    async def run(
        self,
        control: trio.SocketListener | None,
        metrics: list[trio.SocketListener] | None,
        signals: AsyncIterator[int],
        watchdog: float | None,
        upgrade: AsyncIterator[int],
    ) -> int:
        """Bind, start the workers, serve until stopped. ListenError/OffloadError before anything starts."""
        async with kernel_rules(self.kernel) as kernel:
            served = await kernel.prepare(self._table)
            self.forwarded = forwarded_instead(self._table, served)
            self.groups = self._bind(self._table.by_listener, self._table)
            for name, sock in self.passed.unclaimed if self.passed is not None else ():  # kept open: a reload may add its route
                log.warning("systemd passed a socket no route listens on: %s (%s)", name, format_address(sock.getsockname()))
            try:
                async with trio.open_nursery() as services:
                    await services.start(self._check_targets)
                    async with trio.open_nursery() as keepers:
                        for worker in self.workers:
                            keepers.start_soon(self._keep, worker)
                        if not await self._all_ready():
                            self.stop(services)
                            code = EXIT_CANNOT_START
                        else:
                            code = 0
                            services.start_soon(self._serve_front, control, metrics)
                            pids = [w.process.pid for w in self.workers if w.process is not None]
                            log.info("ready", extra={"fields": {"listeners": self.addresses, "workers": self.count, "pid": os.getpid(), "pids": pids}})
                            systemd.notify("READY=1", f"STATUS={self.count} workers")
                            if watchdog is not None:
                                services.start_soon(systemd.watchdog, watchdog)
                            services.start_soon(self._on_signals, signals, services)
                            services.start_soon(self._on_upgrade, upgrade, control, metrics, services)
                            if self.handed is not None:
                                self._took_over(self.handed)
                    services.cancel_scope.cancel()  # every worker has exited
            finally:
                self._close_listeners()
        log.info("stopped")
        return code

    async def _serve_front(self, control: trio.SocketListener | None, metrics: list[trio.SocketListener] | None) -> None:
        """The control socket and the metrics port, until the supervisor stops or hands them over."""
        fleet = WorkersControl(self, reload=self.reload)
        with self._front:
            async with trio.open_nursery() as nursery:
                if control is not None:
                    nursery.start_soon(fleet.serve, [control])
                if metrics is not None:
                    nursery.start_soon(serve_metrics_on, metrics, fleet.metrics_text, fleet.status_json)

    def _took_over(self, handed: Handed) -> None:
        """Tell the generation before that this one serves (it drains then); close what it
        handed over that the route file no longer listens on."""
        for sockets in handed.groups.values():
            for sock in sockets:
                sock.close()
        with contextlib.suppress(OSError), handed.channel:
            handed.channel.send(b'{"ready": true}')

    async def _on_upgrade(
        self, signals: AsyncIterator[int], control: trio.SocketListener | None, metrics: list[trio.SocketListener] | None, nursery: trio.Nursery
    ) -> None:
        async for _ in signals:
            if self._upgrading or self.stopping or self._draining:
                log.warning("SIGUSR2: %s; no upgrade", "an upgrade is under way" if self._upgrading else "stopping")
                continue
            self._upgrading = True
            try:
                if await self._upgrade(control, metrics, nursery):
                    return
            finally:
                self._upgrading = False

    async def _upgrade(self, control: trio.SocketListener | None, metrics: list[trio.SocketListener] | None, nursery: trio.Nursery) -> bool:
        """SIGUSR2: start a new generation from the same command line and hand it every socket;
        once its workers are ready, drain this one. False (still serving) when it failed."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            try:
                env = {**os.environ, UPGRADE_ENV: str(theirs.fileno())}
                # From the event loop's thread, as the workers are (see _run_once).
                process = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env, pass_fds=[theirs.fileno()])  # noqa: ASYNC220
            finally:
                theirs.close()
            log.info("SIGUSR2: upgrade: a new generation (pid %d) takes over the sockets", process.pid)
            # Retired UDP groups too: a new generation that listens there again must take the
            # sockets this one's sessions still hold, or a new group would join them.
            groups = {key: group.sockets for key, group in {**self.retired, **self.groups}.items()}
            with contextlib.suppress(OSError):  # it exited already: it will not answer below
                await trio.to_thread.run_sync(hand_over, ours, groups, control.socket if control is not None else None, [m.socket for m in metrics or ()])
            channel = trio.socket.from_stdlib_socket(ours)
            reply = b""
            with trio.move_on_after(UPGRADE_TIMEOUT), contextlib.suppress(OSError):  # reset: it exited with our sockets unread
                reply = await channel.recv(MESSAGE_MAX)
        if not reply:
            log.error("upgrade failed: the new generation (pid %d) is not ready; this one goes on serving", process.pid)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            nursery.start_soon(_exited, process)  # reaped whenever it ends
            return False
        log.info("upgrade: the new generation (pid %d) serves; this one drains", process.pid)
        self.upgraded = True
        self.kernel.installed = False  # the rules are the new generation's now: not removed at exit
        self._front.cancel()
        await self._release_datagrams()
        self.stop(nursery)
        return True

    async def _release_datagrams(self) -> None:
        """Tell each worker, before it drains, that the new generation reads its UDP sockets
        now: it stops reading them at once (its sessions' replies still leave by them), or
        the two processes would split the datagrams of one flow between them. No reply, so
        it may come between a reload's request and its answer."""
        message = msgspec.json.encode(HandedOver())
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                nursery.start_soon(_tell, worker, message)

    async def _all_ready(self) -> bool:
        """Wait until every worker said it is ready the first time (True), or one exited before (False)."""
        waiting = {w.number for w in self.workers}
        async for number, ready in self._first_ready_events:
            if not ready:
                return False
            waiting.discard(number)
            if not waiting:
                return True
        return False

    async def _on_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    await self.reload()
                except (ConfigError, ListenError) as exc:
                    log.error("reload failed, the old routes stay in force: %s", exc)
            elif signum == signal.SIGUSR1:
                log.info("SIGUSR1: every worker reopens the access log")
                self.signal_workers(signal.SIGUSR1)
            else:
                log.info("%s: stopping every worker gracefully%s", signal.Signals(signum).name, " (again: at once)" if self.stopping else "")
                if not self.stopping:
                    systemd.notify("STOPPING=1")
                self.stop(nursery)


async def _exited(process: subprocess.Popen[bytes]) -> int:
    """Wait for the process to exit (its pidfd becomes readable) and reap it: its status."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:  # reaped already (by a poll())
        return process.wait()
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return process.wait()


async def _received(channel: trio.socket.SocketType) -> bytes:
    """The next message a worker said; b"" once it is gone (EOF, or a reset: it died with
    something of ours unread, such as verdicts)."""
    try:
        return await channel.recv(MESSAGE_MAX)
    except ConnectionResetError:
        return b""


async def _tell(worker: Worker, message: bytes) -> None:
    """One message down a worker's channel, without a reply; a worker that is gone or does
    not read within TELL_TIMEOUT is skipped."""
    with trio.move_on_after(TELL_TIMEOUT), contextlib.suppress(OSError):
        await worker.send(message)


def _write(path: str, spec: msgspec.Struct) -> str:
    """`spec` as JSON in a new file at `path` (in the supervisor's 0700 run directory), for
    a worker to read; the path."""
    with open(path, "wb") as file:
        file.write(msgspec.json.encode(spec))
    return path


def _status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"status {code}"


async def supervise(
    args: argparse.Namespace,
    table: RouteTable,
    count: int,
    control: trio.SocketListener | None,
    metrics: list[trio.SocketListener] | None,
    signals: AsyncIterator[int],
    watchdog: float | None,
    handed: Handed | None = None,
    release: Callable[[], object] = lambda: None,
    passed: systemd.PassedSockets | None = None,
) -> int:
    """`triofwd serve` with `count` workers, on the control and metrics listeners the command
    line bound (or the generation before `handed` over): 0 after a clean stop, 2 when a worker
    could not start. ListenError (and OffloadError) when a port cannot be bound or the offload
    rules installed: nothing started. After an upgrade `release()` is called: the control
    socket's file and the metrics port are the new generation's, not to be removed."""
    rundir = tempfile.mkdtemp(prefix="triofwd-workers-")  # the workers' private control sockets, 0700
    try:
        with trio.open_signal_receiver(signal.SIGUSR2) as upgrade:
            supervisor = Supervisor(args, table, count, rundir, handed, passed)
            code = await supervisor.run(control, metrics, signals, watchdog, upgrade)
            if supervisor.upgraded:
                release()
            return code
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
