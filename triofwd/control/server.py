"""The control server: the commands of the control protocol, served on a Unix socket.

One session per client connection; requests are answered in order, a watch runs beside
them. Nothing a client sends can end the daemon: a malformed request gets an error reply,
a message over MAX_REQUEST_BYTES gets an error reply, one over the WebSocket hard limit
closes that client (code 1009), a bug in a command is logged and answered as an error.
A watcher too slow to keep up gets {"id": .., "ok": false, "error": "watch dropped: too
slow"} and its stream ends (the connection stays usable). A peer of another uid gets a
fixed HTTP 403 and the socket is closed before a byte of theirs is read.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import msgspec
import trio
import trio_websocket

from .._addresses import client_address
from .._errors import ConfigError, ListenError
from .._metrics import prometheus_number, render_metrics
from .._record import Connection
from .._server import WATCH_BUFFER, Forwarder
from .messages import COMMANDS, MAX_REQUEST_BYTES, UNDECODABLE, ConnectionsArgs, IdArgs, NoArgs, Reply, WatchRequest, decode_request, encode, salvage_id
from .socketfile import bind_control_socket, peer_credentials

__all__ = ["ControlServer", "metrics_text", "serve_control", "stats_json"]

log = logging.getLogger("triofwd.control")

# Beyond this trio-websocket stops buffering the message and closes the connection with
# 1009 (Message Too Big, RFC 6455 7.4.1): the bound on what one client can make us hold.
WS_MAX_MESSAGE_BYTES = 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0
# A client that leaves a reply unread this long is disconnected: its session must not
# hold a task and a buffer forever.
SEND_TIMEOUT = 10.0
CLOSE_TIMEOUT = 1.0
# Concurrent control clients; more are refused (a runaway script, not an operator).
MAX_SESSIONS = 64
# Sent to a peer of another uid instead of a WebSocket handshake, then the socket closes.
_REFUSED = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _CommandError(Exception):
    """Raised by a command: becomes the error reply."""


ReloadFn = Callable[[], Awaitable[Mapping[str, list[str]]]]


class ControlServer:
    """The commands of the control protocol (README: "The inspector, the control socket and metrics"), served on Unix socket listeners.

    `reload` re-reads the daemon's route file and applies it (returning what
    Forwarder.reload returns); without it the `reload` command answers an error.
    """

    def __init__(self, fwd: Forwarder, *, reload: ReloadFn | None = None, watch_buffer: int = WATCH_BUFFER) -> None:
        self.fwd = fwd
        self.reload = reload
        self.watch_buffer = watch_buffer
        self._sessions = 0
        self._handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "connections": self._connections,
            "connection": self._connection,
            "kill": self._kill,
            "stats": self._stats,
            "routes": self._routes,
            "reload": self._reload,
            "drain": self._drain,
            "metrics": self._metrics,
        }  # and "watch", which the session runs beside other requests

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """The open/close events of one `watch`; the stream ends early for a watcher too slow."""
        with self.fwd.watch(self.watch_buffer) as events:
            yield events

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

    async def dispatch(self, data: bytes) -> Reply | WatchRequest:
        """The reply to one request message; a valid `watch` request is handed back to the session."""
        if len(data) > MAX_REQUEST_BYTES:
            return Reply(salvage_id(data), False, error=f"request too large: {len(data)} bytes (limit {MAX_REQUEST_BYTES})")
        try:
            request = decode_request(data)
        except UNDECODABLE as exc:
            return Reply(salvage_id(data), False, error=f"invalid request: {exc}")
        args_type = COMMANDS.get(request.cmd)
        if args_type is None:
            return Reply(request.id, False, error=f"unknown command {request.cmd!r}; commands: {', '.join(COMMANDS)}")
        try:
            args = msgspec.json.decode(request.args, type=args_type)
        except UNDECODABLE as exc:
            return Reply(request.id, False, error=f"bad arguments for {request.cmd}: {exc}")
        handler = self._handlers.get(request.cmd)
        if handler is None:
            return WatchRequest(request.id)
        try:
            return Reply(request.id, True, result=await handler(args))
        except _CommandError as exc:
            return Reply(request.id, False, error=str(exc))
        except Exception as exc:  # a bug in one command must not end the session or the daemon
            log.exception("control: command %s failed", request.cmd)
            return Reply(request.id, False, error=f"internal error: {type(exc).__name__}: {exc}")

    # -- commands -------------------------------------------------------------------

    async def _connections(self, args: ConnectionsArgs) -> list[dict[str, Any]]:
        match = _client_filter(args.client) if args.client else None
        now = trio.current_time()
        return [
            conn.describe(now)
            for conn in sorted(self.fwd.connections.values(), key=lambda c: c.id)
            if (args.route is None or conn.route == args.route) and (match is None or match(conn))
        ]

    async def _connection(self, args: IdArgs) -> dict[str, Any]:
        return self._find(args.id).describe()

    async def _kill(self, args: IdArgs) -> dict[str, Any]:
        conn = self._find(args.id)
        conn.kill()
        log.info("control: killed connection %d", conn.id, extra={"fields": {"id": conn.id, "client": conn.client, "route": conn.route}})
        return conn.describe()

    async def _stats(self, args: NoArgs) -> dict[str, Any]:
        await self.fwd.read_offload_counters()  # fresh kernel counters for offload routes
        return {**stats_json(self.fwd.stats()), "draining": self.fwd.draining}

    async def _routes(self, args: NoArgs) -> list[dict[str, Any]]:
        active: dict[str | None, int] = {}
        for conn in self.fwd.connections.values():
            active[conn.route] = active.get(conn.route, 0) + 1
        listening = self.fwd.addresses
        health = self.fwd.target_states()
        return [
            {
                "name": route.name,
                "action": route.action,
                "protocol": route.protocol,
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

    async def _reload(self, args: NoArgs) -> Mapping[str, list[str]]:
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

    async def _drain(self, args: NoArgs) -> dict[str, Any]:
        self.fwd.drain()
        log.info("control: draining, listeners closed", extra={"fields": {"active": len(self.fwd.connections)}})
        return {"draining": True, "active": len(self.fwd.connections)}

    async def _metrics(self, args: NoArgs) -> str:
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
        async with self.server.events() as events:
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
                await self.ws.send_message(encode(message))
            except trio_websocket.ConnectionClosed:
                self.nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            # Part of a frame may be written: the stream cannot be used again.
            log.warning("control: a client did not read for %.0fs; disconnecting it", SEND_TIMEOUT)
            self.nursery.cancel_scope.cancel()


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
    absolute = os.path.abspath(os.fspath(path))  # noqa: ASYNC240 - string work and one getcwd, once
    with bind_control_socket(absolute) as listener:
        task_status.started(absolute)
        await ControlServer(fwd, reload=reload).serve([listener])
