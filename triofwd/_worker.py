"""One worker process of `triofwd serve` with `workers` > 1: an ordinary serve() on sockets
its supervisor bound, told apart by TRIOFWD_WORKER in its environment.

What the supervisor hands a worker (`WorkerSpec`, JSON in a file of the supervisor's 0700
run directory, named in the environment: a table of thousands of routes on port 0 makes a
spec longer than an environment variable may be):

    number     1..count; its connection ids are number * ID_SPAN + its own
    sockets    its socket of each listener's reuseport group (fds passed to it)
    ports      the port the supervisor got for each route on port 0
    forwarded  offload routes the supervisor forwards in user space (nftables unusable)
    channel    a SOCK_SEQPACKET socket to the supervisor, typed msgspec messages each way.
               Down: Reload (with the sockets of new listeners, SCM_RIGHTS), Verdicts of
               the supervisor's health checks, HandedOver after an upgrade (stop reading
               the UDP sockets). Up, in order: Ready, Answer (to a Reload), Released (a
               UDP listening socket closed with its last session). Its end (EOF) means
               the supervisor is gone
    down       the targets those checks hold down as the worker starts
    control    the path of the worker's private control socket, which the supervisor's
               own control socket and metrics read from

The worker dies with its supervisor: PR_SET_PDEATHSIG (SIGTERM: it drains like on any
SIGTERM), and the channel's EOF for the moment between fork and prctl.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

import msgspec
import trio

from ._accesslog import AccessLogFile, LineSink
from ._config import read_config
from ._errors import ConfigError, ListenError
from ._offload import ForeignRules
from ._server import Forwarder, serve
from ._systemd import Bound, PassedSockets
from ._table import RouteTable, compile_table, with_routes
from .control import ControlServer, bind_control_socket

__all__ = [
    "ID_SPAN",
    "WORKER_ENV",
    "Answer",
    "HandedOver",
    "HandedSockets",
    "Ready",
    "Released",
    "Reload",
    "ReloadSpec",
    "Said",
    "Verdicts",
    "WorkerSpec",
    "carrying",
    "die_with",
    "receive_fds",
    "serve_worker",
    "share",
    "socket_inode",
    "tag_logs",
    "worker_spec",
    "worker_table",
]

log = logging.getLogger("triofwd.worker")

WORKER_ENV = "TRIOFWD_WORKER"
# A connection's id across workers: worker number * ID_SPAN + the worker's own id, so that
# `kill 2000000000017` reaches worker 2's connection 17 (and the decimal shows it).
ID_SPAN = 10**12
# One channel message (JSON) and the sockets that may ride with it.
MESSAGE_MAX = 256 * 1024
FDS_MAX = 250  # SCM_MAX_FD is 253
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerSpec(msgspec.Struct, kw_only=True):
    """What the supervisor tells a worker it starts (a JSON file, TRIOFWD_WORKER its path)."""

    number: int
    count: int
    parent: int  # the supervisor's pid
    channel: int  # fd
    control: str
    sockets: list[int]  # fds
    ports: dict[str, int] = {}
    forwarded: list[str] = []
    down: dict[str, list[str]] = {}  # route name -> "ip:port"s its health checks hold down


class Reload(msgspec.Struct, kw_only=True, tag=True):
    """Down the channel: reload the route file, with the ports and offload verdicts in the
    file at `path` (a ReloadSpec: a message has at most MESSAGE_MAX bytes, those may be
    more); the sockets of new listeners ride with it. The answer names its `serial`, so an
    answer that comes after the supervisor stopped waiting is not taken for the next one's."""

    path: str
    serial: int


class ReloadSpec(msgspec.Struct, kw_only=True):
    """What a reload needs besides the route file: the port each route on port 0 got, and
    the offload routes the supervisor forwards in user space."""

    ports: dict[str, int]
    forwarded: list[str]


class Verdicts(msgspec.Struct, kw_only=True, tag=True):
    """Down the channel: the supervisor runs the health checks, once per target for every
    worker; after any turn (and a reload) each worker is told every target held down now,
    route name -> "ip:port"s. The whole set each time: a worker that missed one catches up
    with the next. No reply."""

    down: dict[str, list[str]]


class HandedOver(msgspec.Struct, kw_only=True, tag=True):
    """Down the channel after an upgrade, before SIGTERM: the new generation reads this
    worker's listening sockets now, so it stops reading its UDP ones
    (Forwarder.release_datagrams). No reply."""


class Ready(msgspec.Struct, kw_only=True, tag=True):
    """Up the channel: the worker serves; the UDP listening sockets (inodes) it holds."""

    holding: list[int]


class Released(msgspec.Struct, kw_only=True, tag=True):
    """Up the channel: one of its UDP listening sockets (an inode) closed, its last session gone."""

    inode: int


class Answer(msgspec.Struct, kw_only=True, tag=True):
    """Up the channel: the answer to reload `serial` (`error` None: applied), and the UDP
    listening sockets (inodes) the worker holds after it."""

    serial: int
    holding: list[int]
    error: str | None = None


# What a worker says to its supervisor, in the order it happened (one queue, _tell_supervisor).
Said = Ready | Released | Answer


def worker_spec() -> WorkerSpec | None:
    """This process's WorkerSpec, or None when it is not a worker. Taken out of the
    environment: a process this one starts is not a worker of the same supervisor."""
    path = os.environ.pop(WORKER_ENV, None)
    if path is None:
        return None
    with open(path, "rb") as file:
        return msgspec.json.decode(file.read(), type=WorkerSpec)


class HandedSockets(PassedSockets):
    """The listening sockets the supervisor handed this worker, claimed by the address they
    are bound to (as systemd's are), UDP ones too. A listener that stops closes its copy: the
    supervisor holds the socket for as long as the listener lives, and closes it when it goes."""

    claims_udp = True

    def add(self, sockets: Iterable[socket.socket]) -> None:
        self._free.extend((f"fd {sock.fileno()}", sock, Bound.of(sock)) for sock in sockets)

    def give_back(self, sock: socket.socket) -> bool:
        self._taken.pop(sock, None)
        return False  # the caller closes it

    def close_unclaimed(self) -> None:
        """Close what no listener took (after a start or a reload): a copy kept here would
        keep its socket listening, with no one accepting, after the supervisor closed its own."""
        for _, sock, _ in self._free:
            sock.close()
        self._free.clear()


def worker_table(path: str, ports: Mapping[str, int], number: int, count: int) -> RouteTable:
    """The route file as worker `number` of `count` serves it: each port-0 route on the port
    the supervisor bound for it, and the connection limits shared out (see `share`)."""
    config = read_config(path)
    for route in config.routes:
        if route.ports == [0] and route.name in ports:
            route.ports = [ports[route.name]]
    try:
        table = compile_table(config)
    except ConfigError as exc:
        raise ConfigError(exc.errors, path) from None
    return share(table, number, count)


def share(table: RouteTable, number: int, count: int) -> RouteTable:
    """max_connections ([settings] and each route's) split among `count` workers: worker
    `number` takes its part of N // count, the first N % count one more; at least 1 each,
    since 0 would mean no limit. Per-IP limits are not split: the supervisor sends each
    client address to one worker, which counts all of that client's connections."""

    def part(total: int) -> int:
        return total and max(1, total // count + (number - 1 < total % count))

    routes = [dataclasses.replace(r, limits=dataclasses.replace(r.limits, max_connections=part(r.limits.max_connections))) for r in table.routes]
    return dataclasses.replace(with_routes(table, routes), limits=dataclasses.replace(table.limits, max_connections=part(table.limits.max_connections)))


def carrying(fds: Sequence[int]) -> list[tuple[int, int, array.array[int]]]:
    """The ancillary data of a message that carries these fds (SCM_RIGHTS); none: empty."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []


def receive_fds(ancdata: Iterable[tuple[int, int, bytes]]) -> list[socket.socket]:
    """The sockets an SCM_RIGHTS message carried."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return [socket.socket(fileno=fd) for fd in fds]


def die_with(parent: int) -> None:
    """SIGTERM this process when the supervisor dies (prctl(2) PR_SET_PDEATHSIG); if it died
    before the call, now. SIGINT is ignored: a Ctrl-C reaches the whole process group, and
    the supervisor stops its workers itself (a second SIGTERM from it would cut the grace)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _fail(message: str) -> int:
    print(f"triofwd: {message}", file=sys.stderr)
    return 2


async def serve_worker(args: argparse.Namespace, spec: WorkerSpec) -> int:
    """The worker's life: serve, tell the supervisor it is ready, obey it, stop on SIGTERM."""
    channel = trio.socket.from_stdlib_socket(socket.socket(fileno=spec.channel))
    handed = HandedSockets([])
    handed.add(socket.socket(fileno=fd) for fd in spec.sockets)
    rules = ForeignRules(frozenset(spec.forwarded))
    try:
        table = worker_table(args.routefile, spec.ports, spec.number, spec.count)
    except ConfigError as exc:
        return _fail(str(exc))
    access_log: LineSink | None = None
    log_file: AccessLogFile | None = None
    if args.access_log == "-":
        access_log = sys.stdout
    elif args.access_log:
        try:
            access_log = log_file = AccessLogFile(args.access_log)  # O_APPEND, one write a line: whole lines among workers
        except OSError as exc:
            return _fail(f"cannot open access log {args.access_log}: {exc.strerror or exc}")
    try:
        with (
            channel,
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2) as signals,
            bind_control_socket(spec.control) as control,
        ):
            async with trio.open_nursery() as nursery:
                try:
                    fwd: Forwarder = await nursery.start(
                        lambda task_status: serve(
                            table,
                            access_log=access_log,
                            passed=handed,
                            kernel=rules,
                            first_id=spec.number * ID_SPAN + 1,
                            verdicts=spec.down,
                            task_status=task_status,
                        )
                    )
                except (ListenError, ConfigError) as exc:
                    return _fail(str(exc))
                handed.close_unclaimed()
                nursery.start_soon(ControlServer(fwd).serve, [control])
                # Everything up the channel goes through one queue, in order: a "released"
                # sent before a reload's answer reaches the supervisor before it.
                # What it holds is said with "ready" and each reload's answer, each computed
                # and queued at once, with no wait between that a socket could close in.
                outbox, queued = trio.open_memory_channel[bytes](math.inf)
                outbox.send_nowait(msgspec.json.encode(Ready(holding=_holding(fwd))))
                fwd.on_udp_closed(lambda sock: outbox.send_nowait(msgspec.json.encode(Released(inode=socket_inode(sock)))))
                nursery.start_soon(_tell_supervisor, channel, queued)
                nursery.start_soon(_obey, fwd, channel, outbox, handed, rules, args.routefile, spec)
                nursery.start_soon(_on_signals, fwd, signals, log_file)
                await fwd.wait_stopped()
                nursery.cancel_scope.cancel()
    except ListenError as exc:  # the private control socket
        return _fail(str(exc))
    finally:
        if log_file is not None:
            log_file.close()
        # The last worker out removes the supervisor's directory of control sockets, in case
        # the supervisor was killed (it removes it itself when it stops).
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(spec.control))
    return 0


def socket_inode(sock: socket.socket) -> int:
    """A socket's identity across processes: the inode its fds share (the supervisor's too)."""
    return os.fstat(sock.fileno()).st_ino


def _holding(fwd: Forwarder) -> list[int]:
    """The UDP listening sockets this worker holds open, for its supervisor (_supervisor)."""
    return [socket_inode(sock) for sock in fwd.udp_sockets()]


async def _tell_supervisor(channel: trio.socket.SocketType, queued: trio.MemoryReceiveChannel[bytes]) -> None:
    """Send what the worker says up the channel, in the order it was said, until the
    supervisor is gone (the worker then drains on its own: nothing more to tell)."""
    with contextlib.suppress(OSError):
        async for message in queued:
            await channel.send(message)


async def _obey(
    fwd: Forwarder,
    channel: trio.socket.SocketType,
    outbox: trio.MemorySendChannel[bytes],
    handed: HandedSockets,
    rules: ForeignRules,
    path: str,
    spec: WorkerSpec,
) -> None:
    """The supervisor's requests, one at a time, until its end of the channel closes."""
    while True:
        try:
            data, ancdata, flags, _ = await channel.recvmsg(MESSAGE_MAX, socket.CMSG_SPACE(FDS_MAX * 4), socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:  # the supervisor died with something of ours unread: gone, as at EOF
            data, ancdata, flags = b"", [], 0
        handed.add(receive_fds(ancdata))
        if flags & socket.MSG_TRUNC:  # a message cut short would not decode: said, and skipped
            log.error("a message from the supervisor was longer than %d bytes and is ignored", MESSAGE_MAX)
            continue
        if not data:
            if not fwd.stopping:
                log.warning("the supervisor is gone: stopping")
                fwd.shutdown()
            return
        request = msgspec.json.decode(data, type=Reload | Verdicts | HandedOver)
        if isinstance(request, Verdicts):
            fwd.follow_verdicts(request.down)
            continue
        if isinstance(request, HandedOver):
            fwd.release_datagrams()
            continue
        error: str | None = None
        try:
            reload = msgspec.json.decode(await trio.Path(request.path).read_bytes(), type=ReloadSpec)
            rules.forwarded = frozenset(reload.forwarded)
            await fwd.reload(worker_table(path, reload.ports, spec.number, spec.count))
        except (ConfigError, ListenError) as exc:
            log.error("reload failed, the old routes stay in force: %s", exc)
            error = str(exc)
        except (OSError, msgspec.DecodeError) as exc:  # its spec gone (a late reload, then another)
            log.error("reload failed, the old routes stay in force: its spec %s: %s", request.path, exc)
            error = str(exc)
        handed.close_unclaimed()
        outbox.send_nowait(msgspec.json.encode(Answer(serial=request.serial, holding=_holding(fwd), error=error)))


def tag_logs(number: int) -> None:
    """Every log line of this worker carries worker=N."""

    def tag(record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), "worker": number}
        return True

    for handler in logging.getLogger("triofwd").handlers:
        handler.addFilter(tag)


async def _on_signals(fwd: Forwarder, signals: AsyncIterator[int], log_file: AccessLogFile | None) -> None:
    """SIGTERM as in one process (the supervisor sends it; SIGINT is ignored); SIGUSR1 reopens the
    access log (the supervisor passes it on); SIGHUP and SIGUSR2 are the supervisor's."""
    async for signum in signals:
        if signum in (signal.SIGHUP, signal.SIGUSR2):
            log.info("%s is the supervisor's to act on: ignored by a worker", signal.Signals(signum).name)
        elif signum == signal.SIGUSR1:
            if log_file is not None:
                try:
                    log_file.reopen()
                except OSError as exc:
                    log.error("cannot reopen the access log %s, still writing to the old file: %s", log_file.path, exc.strerror or exc)
        elif not fwd.stopping:
            fwd.shutdown()
        else:
            fwd.shutdown(grace=0)
