"""The control socket: a Unix socket speaking WebSocket, one JSON object per message.

    request  {"id": 1, "cmd": "connections", "args": {"route": "web"}}
    reply    {"id": 1, "ok": true, "result": [...]}   or   {"id": 1, "ok": false, "error": "..."}
    watch    the ok reply, then {"event": "open"|"close", ...connection row} until the client
             closes; a watcher too slow to keep up gets {"id": .., "ok": false, "error":
             "watch dropped: too slow"} and its stream ends (the connection stays usable)

Who may talk to it is decided twice: the socket file is mode 0600 from the moment it
has its name, and each peer's SO_PEERCRED uid must be ours or root's; anyone else gets
a fixed HTTP 403 and the socket is closed before a byte of theirs is read.

One session per client connection; requests are answered in order, a watch runs
beside them. Nothing a client sends can end the daemon: a malformed request gets an
error reply, a message over MAX_REQUEST_BYTES gets an error reply, one over the
WebSocket hard limit closes that client (code 1009), a bug in a command is logged and
answered as an error.

The client half (`open_control`, `ControlClient`) lives here too, so the inspector and
the tests speak the protocol through the same structs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Annotated, Any

import msgspec
import trio
import trio_websocket

from ._errors import ConfigError, ControlConnectionError, ControlError
from ._record import Connection
from ._metrics import prometheus_number, render_metrics
from ._reasons import leaves
from ._server import WATCH_BUFFER, Forwarder
from ._errors import ListenError
from ._addresses import client_address

__all__ = [
    "ControlClient",
    "ControlConnectionError",
    "ControlError",
    "ControlServer",
    "Reply",
    "Request",
    "bind_control_socket",
    "default_control_path",
    "open_control",
    "serve_control",
]

log = logging.getLogger("triofwd.control")

# A request larger than this gets an error reply and the connection stays usable; no
# command needs more than a few hundred bytes.
MAX_REQUEST_BYTES = 64 * 1024
# Beyond this trio-websocket stops buffering the message and closes the connection with
# 1009 (Message Too Big, RFC 6455 7.4.1): the bound on what one client can make us hold.
WS_MAX_MESSAGE_BYTES = 1024 * 1024
# Replies can be large (every connection of a busy daemon): the client accepts more.
CLIENT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0
# A client that leaves a reply unread this long is disconnected: its session must not
# hold a task and a buffer forever.
SEND_TIMEOUT = 10.0
CLOSE_TIMEOUT = 1.0
# Concurrent control clients; more are refused (a runaway script, not an operator).
MAX_SESSIONS = 64
LISTEN_BACKLOG = 16
ABNORMAL_CLOSURE = 1006  # RFC 6455 7.4.1: the connection ended without a close frame
# sun_path is 108 bytes on Linux, including the terminating NUL (unix(7)).
SUN_PATH_MAX = 107
# struct ucred {pid_t pid; uid_t uid; gid_t gid;} (unix(7), SO_PEERCRED)
_UCRED = struct.Struct("iII")
# Sent to a peer of another uid instead of a WebSocket handshake, then the socket closes.
_REFUSED = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

# -- messages ---------------------------------------------------------------------------


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """One command. `args` is decoded by the command's own type once `cmd` is known."""

    cmd: str
    id: int | None = None
    args: msgspec.Raw = msgspec.Raw(b"{}")


class Reply(msgspec.Struct, omit_defaults=True):
    """The answer to one request: `result` when ok, else `error`."""

    id: int | None
    ok: bool
    result: Any = None
    error: str | None = None


class _IdOnly(msgspec.Struct):
    """Enough of a bad request to answer it under its id, when it has one."""

    id: int | None = None


@dataclasses.dataclass(frozen=True)
class _WatchRequest:
    """A valid `watch` request: the session, not a command function, runs it."""

    id: int | None


class _NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    pass


class _ConnectionsArgs(msgspec.Struct, forbid_unknown_fields=True):
    route: str | None = None
    client: str | None = None  # "ip", "ip:port" or a CIDR


class _IdArgs(msgspec.Struct, forbid_unknown_fields=True):
    id: Annotated[int, msgspec.Meta(ge=1)]


_request_decoder = msgspec.json.Decoder(Request)
_id_decoder = msgspec.json.Decoder(_IdOnly)
_encoder = msgspec.json.Encoder()
# What a malformed message raises: msgspec reports bytes that are not UTF-8 inside a JSON
# string as UnicodeDecodeError, not DecodeError (found by fuzz/fuzz_control.py).
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError)


class _CommandError(Exception):
    """Raised by a command: becomes the error reply."""


# -- socket file ------------------------------------------------------------------------


def default_control_path() -> str:
    """Where the inspector looks when no -s is given.

    $TRIOFWD_CONTROL if set; /run/triofwd/control.sock for root (systemd's
    RuntimeDirectory=triofwd); else $XDG_RUNTIME_DIR/triofwd.sock (or
    /run/user/UID/triofwd.sock without XDG_RUNTIME_DIR).
    """
    if env := os.environ.get("TRIOFWD_CONTROL"):
        return env
    if os.geteuid() == 0:
        return "/run/triofwd/control.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return os.path.join(runtime, "triofwd.sock")


@contextlib.contextmanager
def bind_control_socket(path: str | os.PathLike[str]) -> Iterator[trio.SocketListener]:
    """A listening Unix socket at `path`, mode 0600 from the moment the name exists.

    bind() creates the file with the umask's mode, and changing the umask is
    process-wide (it would race with files other threads create). So the socket is
    bound in a fresh 0700 directory next to `path`, where no one else can reach it,
    chmod-ed to 0600 there, and rename(2)-d into place, which is atomic and replaces a
    stale socket left by a crashed run. A socket that a live process still answers on,
    or a file that is not a socket, is never replaced: ListenError.

    On exit the socket is closed and the file removed, if it is still ours.
    """
    path = os.path.abspath(os.fspath(path))
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ListenError(errno.ENAMETOOLONG, f"control socket path is longer than {SUN_PATH_MAX} bytes: {path}")
    _check_previous(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _mapped_bind_errors(path):
            private = tempfile.mkdtemp(prefix=".triofwd-", dir=os.path.dirname(path))
            try:
                scratch = os.path.join(private, "s")
                sock.bind(scratch)
                os.chmod(scratch, 0o600)
                sock.listen(LISTEN_BACKLOG)
                os.rename(scratch, path)
            finally:
                with contextlib.suppress(OSError):
                    os.rmdir(private)
            identity = _identity(path)
    except BaseException:
        sock.close()
        raise
    log.info("control socket at %s", path, extra={"fields": {"control": path}})
    try:
        yield trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            if _identity(path) == identity:  # not a socket a later daemon put there
                os.unlink(path)


def _identity(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _mapped_bind_errors(path: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise ListenError(exc.errno, f"cannot create control socket {path}: {exc.strerror or exc}") from None


def _check_previous(path: str) -> None:
    """Refuse to replace a file that is not a socket, or a socket a live process answers on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(exc.errno, f"cannot create control socket {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(errno.EEXIST, f"cannot create control socket {path}: a file that is not a socket is in the way")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a live socket with a full backlog answers EAGAIN, not a wait
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            log.info("replacing stale control socket %s", path)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise ListenError(exc.errno, f"cannot create control socket {path}: {exc.strerror or exc}") from None
    raise ListenError(errno.EADDRINUSE, f"cannot create control socket {path}: another process is serving it")


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


# -- server -----------------------------------------------------------------------------

ReloadFn = Callable[[], Awaitable[Mapping[str, list[str]]]]


class ControlServer:
    """The commands of CONTRACT.md "Control socket", served on Unix socket listeners.

    `reload` re-reads the daemon's route file and applies it (returning what
    Forwarder.reload returns); without it the `reload` command answers an error.
    """

    def __init__(self, fwd: Forwarder, *, reload: ReloadFn | None = None, watch_buffer: int = WATCH_BUFFER) -> None:
        self.fwd = fwd
        self.reload = reload
        self.watch_buffer = watch_buffer
        self._sessions = 0
        self._commands: dict[str, tuple[type[msgspec.Struct], Callable[[Any], Awaitable[Any]] | None]] = {
            "connections": (_ConnectionsArgs, self._connections),
            "connection": (_IdArgs, self._connection),
            "kill": (_IdArgs, self._kill),
            "stats": (_NoArgs, self._stats),
            "routes": (_NoArgs, self._routes),
            "reload": (_NoArgs, self._reload),
            "drain": (_NoArgs, self._drain),
            "metrics": (_NoArgs, self._metrics),
            "watch": (_NoArgs, None),  # run by the session, beside other requests
        }

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        """Accept and serve clients until cancelled."""
        await trio.serve_listeners(self._serve_peer, listeners)

    async def _serve_peer(self, stream: trio.SocketStream) -> None:
        # The boundary of one client: nothing that happens in a session may reach
        # serve_listeners, which would end the control server (and the daemon with it).
        try:
            async with stream:
                pid, uid, _ = peer_credentials(stream.socket)
                if uid not in (os.geteuid(), 0):
                    log.warning("control: refused a client of uid %d (pid %d)", uid, pid)
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await stream.send_all(_REFUSED)
                    return
                if self._sessions >= MAX_SESSIONS:
                    log.warning("control: refused a client: %d sessions open already", self._sessions)
                    return
                self._sessions += 1
                try:
                    await self._session(stream)
                finally:
                    self._sessions -= 1
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio_websocket.ConnectionClosed):
            pass  # the client went away
        except* Exception:
            log.exception("control: session failed")

    async def _session(self, stream: trio.SocketStream) -> None:
        ws: trio_websocket.WebSocketConnection | None = None
        async with trio.open_nursery() as nursery:
            try:
                # A client that connects and never completes the handshake (or sends
                # something that is not one: trio-websocket then waits forever) is cut off.
                with trio.move_on_after(HANDSHAKE_TIMEOUT):
                    request = await trio_websocket.wrap_server_stream(nursery, stream, max_message_size=WS_MAX_MESSAGE_BYTES)
                    ws = await request.accept()
                if ws is not None:
                    await _Session(self, ws, nursery).run()
            finally:
                nursery.cancel_scope.cancel()

    async def dispatch(self, data: bytes) -> Reply | _WatchRequest:
        """The reply to one request message; a valid `watch` request is handed back to the session."""
        if len(data) > MAX_REQUEST_BYTES:
            return Reply(None, False, error=f"request too large: {len(data)} bytes (limit {MAX_REQUEST_BYTES})")
        try:
            request = _request_decoder.decode(data)
        except _UNDECODABLE as exc:
            return Reply(_salvage_id(data), False, error=f"invalid request: {exc}")
        command = self._commands.get(request.cmd)
        if command is None:
            return Reply(request.id, False, error=f"unknown command {request.cmd!r}; commands: {', '.join(self._commands)}")
        args_type, handler = command
        try:
            args = msgspec.json.decode(request.args, type=args_type)
        except _UNDECODABLE as exc:
            return Reply(request.id, False, error=f"bad arguments for {request.cmd}: {exc}")
        if handler is None:
            return _WatchRequest(request.id)
        try:
            return Reply(request.id, True, result=await handler(args))
        except _CommandError as exc:
            return Reply(request.id, False, error=str(exc))
        except Exception as exc:  # a bug in one command must not end the session or the daemon
            log.exception("control: command %s failed", request.cmd)
            return Reply(request.id, False, error=f"internal error: {type(exc).__name__}: {exc}")

    # -- commands -------------------------------------------------------------------

    async def _connections(self, args: _ConnectionsArgs) -> list[dict[str, Any]]:
        match = _client_filter(args.client) if args.client else None
        now = trio.current_time()
        return [
            conn.describe(now)
            for conn in sorted(self.fwd.connections.values(), key=lambda c: c.id)
            if (args.route is None or conn.route == args.route) and (match is None or match(conn))
        ]

    async def _connection(self, args: _IdArgs) -> dict[str, Any]:
        return self._find(args.id).describe()

    async def _kill(self, args: _IdArgs) -> dict[str, Any]:
        conn = self._find(args.id)
        conn.kill()
        log.info("control: killed connection %d", conn.id, extra={"fields": {"id": conn.id, "client": conn.client, "route": conn.route}})
        return conn.describe()

    async def _stats(self, args: _NoArgs) -> dict[str, Any]:
        await self.fwd.read_offload_counters()  # fresh kernel counters for offload routes
        return {**stats_json(self.fwd.stats()), "draining": self.fwd.draining}

    async def _routes(self, args: _NoArgs) -> list[dict[str, Any]]:
        active: dict[str | None, int] = {}
        for conn in self.fwd.connections.values():
            active[conn.route] = active.get(conn.route, 0) + 1
        listening = self.fwd.addresses
        health = self.fwd.target_states()
        return [
            {
                "name": route.name,
                "action": route.action,
                "bind": route.spec.bind,
                "ports": list(route.spec.ports),
                "targets": list(route.spec.targets),
                "balance": route.balance,
                "priority": route.priority,
                "listening": listening.get(route.name, []),
                "active": active.get(route.name, 0),
                "target_state": health.get(route.name, []),
            }
            for route in self.fwd.table.routes
        ]

    async def _reload(self, args: _NoArgs) -> Mapping[str, list[str]]:
        if self.reload is None:
            raise _CommandError("reload is not available: this forwarder was not started from a route file")
        try:
            return await self.reload()
        except ConfigError as exc:
            where = f"{exc.source}: " if exc.source else ""
            log.error("reload failed, the old routes stay in force: %s", exc)
            raise _CommandError("reload failed, the old routes stay in force:\n" + "\n".join(where + line for line in exc.errors)) from None
        except ListenError as exc:
            log.error("reload failed, the old routes stay in force: %s", exc)
            raise _CommandError(f"reload failed, the old routes stay in force: {exc}") from None

    async def _drain(self, args: _NoArgs) -> dict[str, Any]:
        self.fwd.drain()
        log.info("control: draining, listeners closed", extra={"fields": {"active": len(self.fwd.connections)}})
        return {"draining": True, "active": len(self.fwd.connections)}

    async def _metrics(self, args: _NoArgs) -> str:
        await self.fwd.read_offload_counters()
        return metrics_text(self.fwd)

    def _find(self, conn_id: int) -> Connection:
        conn = self.fwd.connections.get(conn_id)
        if conn is None:
            raise _CommandError(f"no connection {conn_id}")
        return conn


class _Session:
    """One control client: requests answered in order, at most one watch running beside them."""

    def __init__(self, server: ControlServer, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery) -> None:
        self.server = server
        self.ws = ws
        self.nursery = nursery
        self.watching = False

    async def run(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                data = message.encode() if isinstance(message, str) else message
                outcome = await self.server.dispatch(data)
                if isinstance(outcome, Reply):
                    await self.send(outcome)
                elif self.watching:
                    await self.send(Reply(outcome.id, False, error="already watching"))
                else:
                    self.watching = True
                    self.nursery.start_soon(self._watch, outcome.id)
        except trio_websocket.ConnectionClosed:
            pass  # the client closed (or sent more than WS_MAX_MESSAGE_BYTES: closed with 1009)

    async def _watch(self, request_id: int | None) -> None:
        # Subscribe before the ok reply: every event after it reaches the client.
        with self.server.fwd.watch(self.server.watch_buffer) as events:
            await self.send(Reply(request_id, True, result={"watching": True}))
            async for event in events:
                await self.send(event)
        # The stream only ends early when the forwarder dropped this watcher for lagging.
        await self.send(Reply(request_id, False, error="watch dropped: too slow"))
        self.watching = False

    async def send(self, message: Reply | Mapping[str, Any]) -> None:
        """Send one message; a client that is gone or does not read ends the session."""
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            try:
                # Text frames: JSON is UTF-8 text (RFC 6455 5.6).
                await self.ws.send_message(_encoder.encode(message).decode())
            except trio_websocket.ConnectionClosed:
                self.nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            # Part of a frame may be written: the stream cannot be used again.
            log.warning("control: a client did not read for %.0fs; disconnecting it", SEND_TIMEOUT)
            self.nursery.cancel_scope.cancel()


def _salvage_id(data: bytes) -> int | None:
    try:
        return _id_decoder.decode(data).id
    except _UNDECODABLE:
        return None


def _client_filter(text: str) -> Callable[[Connection], bool]:
    """Match a connection's client by "ip", "ip:port" or a CIDR."""
    if "/" in text:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise _CommandError(f"bad client filter {text!r}: expected an IP, ip:port or a CIDR") from None
        return lambda conn: client_address(conn.client_ip) in network
    try:
        ip = client_address(text.strip("[]"))
    except ValueError:
        return lambda conn: conn.client == text  # "ip:port" (or "[v6]:port")
    return lambda conn: client_address(conn.client_ip) == ip


def stats_json(stats: Mapping[str, Any]) -> dict[str, Any]:
    """A stats snapshot with the histogram bounds as Prometheus `le` strings ("+Inf" is not JSON)."""
    routes = {}
    for name, route in stats["routes"].items():
        histogram = route["connect_time"]
        buckets = {prometheus_number(float(bound)): count for bound, count in histogram["buckets"]}
        routes[name] = {**route, "connect_time": {**histogram, "buckets": buckets}}
    return {**stats, "routes": routes}


def metrics_text(fwd: Forwarder) -> str:
    """The Prometheus text of a running forwarder (the `metrics` command and /metrics)."""
    return render_metrics(fwd.stats(), (route.name for route in fwd.table.routes))


async def serve_control(
    fwd: Forwarder,
    path: str | os.PathLike[str],
    *,
    reload: ReloadFn | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket for `fwd` at `path` until cancelled; then remove the file.

    Use with `nursery.start(serve_control, fwd, path)`: it returns the socket's absolute
    path once it is accepting; a path that cannot be used raises ListenError instead.
    `reload`, an async callable taking no arguments, serves the `reload` command.
    """
    with bind_control_socket(path) as listener:
        task_status.started(os.path.abspath(os.fspath(path)))
        await ControlServer(fwd, reload=reload).serve([listener])


# -- client -----------------------------------------------------------------------------


class ControlClient:
    """One connection to a control socket; see `open_control`."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        # Messages that arrived while request() waited for its reply (watch events,
        # replies to requests sent with send()): receive() hands them out first.
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        # Tasks that share a client take turns: a reply read by one task while another
        # waits for its own would otherwise leave that one waiting for good.
        self._turn = trio.Lock()

    async def request(self, cmd: str, **args: Any) -> Any:
        """Run one command; its result, or ControlError with the daemon's error text.

        Safe to call from several tasks at once: they take turns."""
        async with self._turn:
            request_id = await self.send(cmd, args)
            while True:
                message = await self._receive()
                if "event" not in message and message.get("id") == request_id:
                    break
                self._pending.append(message)
        if message.get("ok"):
            return message.get("result")
        raise ControlError(message.get("error") or "error")

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """The open/close events from now on; ControlError if the daemon drops the watch."""
        request_id = await self.send("watch", {})
        while True:
            message = await self.receive()
            if "event" in message:
                yield message
            elif message.get("id") == request_id and not message.get("ok"):
                raise ControlError(message.get("error") or "error")

    async def send(self, cmd: str, args: Mapping[str, Any] | None = None) -> int:
        """Send a request without waiting; returns its id."""
        request_id = next(self._ids)
        await self.send_raw(_encoder.encode({"id": request_id, "cmd": cmd, "args": dict(args or {})}).decode())
        return request_id

    async def send_raw(self, data: str | bytes) -> None:
        """Send one message as is, whatever it holds: str as a text frame, bytes as binary."""
        with _mapped_client_errors():
            await self._ws.send_message(data)

    async def receive(self) -> dict[str, Any]:
        """The next message from the daemon: a reply or a watch event."""
        if self._pending:
            return self._pending.popleft()
        return await self._receive()

    async def _receive(self) -> dict[str, Any]:
        with _mapped_client_errors():
            message = await self._ws.get_message()
        return msgspec.json.decode(message)

    @property
    def closed(self) -> trio_websocket.CloseReason | None:
        """Why the daemon closed the connection (None while it is open)."""
        return self._ws.closed


@contextlib.contextmanager
def _mapped_client_errors() -> Iterator[None]:
    try:
        yield
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        if reason is None or reason.code == ABNORMAL_CLOSURE:
            # No close frame: the daemon stopped (or cut off a client that did not read).
            raise ControlConnectionError("control connection lost: the daemon stopped or dropped it") from None
        raise ControlConnectionError(f"control connection closed: {reason.code} {reason.reason or reason.name}") from None


@contextlib.asynccontextmanager
async def open_control(path: str | os.PathLike[str]) -> AsyncIterator[ControlClient]:
    """Connect to a control socket: `async with open_control(path) as client: ...`.

    Raises OSError (FileNotFoundError, PermissionError, ConnectionRefusedError) when the
    socket cannot be reached, ControlConnectionError when the daemon refuses the client
    or does not answer the handshake.
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    try:
        async with trio.open_nursery() as nursery:
            ws = await _client_handshake(nursery, stream)
            try:
                yield ControlClient(ws)
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps what the body or the reader task raised; give the one
        # exception back, as a caller of a plain function would expect.
        raise _sole(group) from None
    finally:
        await stream.aclose()


async def _client_handshake(nursery: trio.Nursery, stream: trio.SocketStream) -> trio_websocket.WebSocketConnection:
    # trio-websocket waits forever if the server closes before answering; bound it.
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        return await trio_websocket.wrap_client_stream(nursery, stream, "triofwd", "/", max_message_size=CLIENT_MAX_MESSAGE_BYTES)
    raise ControlConnectionError(f"no WebSocket handshake from the control socket within {HANDSHAKE_TIMEOUT:.0f}s (refused?)")


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    found = list(leaves(group))
    # Ctrl-C lands in whichever task runs (often the WebSocket reader); what the other
    # tasks raise then is its consequence, so it is the one to report.
    interrupts = [exc for exc in found if isinstance(exc, KeyboardInterrupt)]
    if interrupts:
        return interrupts[0]
    found = [exc for exc in found if not isinstance(exc, trio.Cancelled)] or found
    if len(found) != 1:
        return group
    exc = found[0]
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return ControlConnectionError(f"the control socket refused this client (HTTP {exc.status_code})")
    if isinstance(exc, trio_websocket.HandshakeError):
        return ControlConnectionError(f"WebSocket handshake failed: {exc!r}")
    return exc
