"""The --metrics endpoint: the Prometheus text at GET /metrics over HTTP/1.1, with h11.

h11 does the protocol (framing, keep-alive, malformed requests); this module only maps
a request to a response: 200 with the text for GET/HEAD /metrics (any query string is
ignored), 404 for other paths, 405 for other methods, 400 for what is not HTTP.
"""

from __future__ import annotations

import contextlib
import functools
import http
import logging
from collections.abc import Callable

import h11
import trio

from ._addresses import format_address
from ._errors import ListenError
from ._metrics import CONTENT_TYPE

__all__ = ["bind_metrics", "serve_metrics", "serve_metrics_on"]

log = logging.getLogger("triofwd.metrics")

METRICS_PATH = b"/metrics"
# A keep-alive connection (Prometheus keeps its scrape connections) idle this long is
# closed, and a request must arrive whole within it: an idle peer holds no task forever.
IDLE_TIMEOUT = 60.0
SEND_TIMEOUT = 10.0
RECEIVE_SIZE = 16 * 1024

Render = Callable[[], str]


async def bind_metrics(host: str | None, port: int) -> list[trio.SocketListener]:
    """Listeners for the endpoint; ListenError (one line) when the address cannot be bound."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = format_address((host or "*", port))
        raise ListenError(exc.errno, f"cannot listen for metrics on {where}: {exc.strerror or exc}") from None
    for listener in listeners:
        address = format_address(listener.socket.getsockname())
        log.info("metrics at http://%s/metrics", address, extra={"fields": {"metrics": address}})
    return listeners


async def serve_metrics_on(listeners: list[trio.SocketListener], render: Render) -> None:
    """Serve `render()`'s text at /metrics on already bound listeners, until cancelled."""
    await trio.serve_listeners(functools.partial(_serve_client, render), listeners)


async def serve_metrics(
    render: Render,
    host: str | None,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `render()` (e.g. `lambda: triofwd.metrics_text(fwd)`) at http://host:port/metrics.

    Use with `nursery.start`: returns the listeners once bound (port 0 picks one).
    """
    listeners = await bind_metrics(host, port)
    task_status.started(listeners)
    await serve_metrics_on(listeners, render)


async def _serve_client(render: Render, stream: trio.SocketStream) -> None:
    # The boundary of one scrape connection: nothing may reach serve_listeners.
    conn = h11.Connection(h11.SERVER)
    async with stream:
        try:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT):
                    request = await _next_request(conn, stream)
                if request is None:
                    return  # closed, or idle too long
                status, headers, body = _respond(request, render)
                await _send(conn, stream, status, headers, body, head=request.method == b"HEAD")
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # "Connection: close" (or HTTP/1.0)
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(trio.BrokenResourceError, trio.TooSlowError, h11.LocalProtocolError):
                    await _send(conn, stream, exc.error_status_hint, [(b"connection", b"close")], f"{exc}\n".encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # gone, or not reading its response
        except Exception:
            log.exception("metrics: request failed")


async def _next_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request with its (ignored) body read, or None once the peer closed."""
    request = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # h11.Data: a body no endpoint here needs; read and dropped.


def _respond(request: h11.Request, render: Render) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    path = request.target.split(b"?", 1)[0]
    if path != METRICS_PATH:
        return 404, [(b"content-type", b"text/plain; charset=utf-8")], b"not found: the metrics are at /metrics\n"
    if request.method not in (b"GET", b"HEAD"):
        return 405, [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain; charset=utf-8")], b"method not allowed\n"
    return 200, [(b"content-type", CONTENT_TYPE.encode())], render().encode()


async def _send(conn: h11.Connection, stream: trio.SocketStream, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, head: bool = False) -> None:
    # HEAD: the headers a GET would get, Content-Length included, and no body (RFC 9110 9.3.2).
    data = conn.send(
        h11.Response(status_code=status, reason=http.HTTPStatus(status).phrase.encode(), headers=[*headers, (b"content-length", str(len(body)).encode())])
    )
    if body and not head:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    with trio.fail_after(SEND_TIMEOUT):
        await stream.send_all(data)
