"""The --metrics endpoint over HTTP/1.1, with h11: the Prometheus text at /metrics, and
(given a `status` source) the status page at / and its data at /status.json.

h11 does the protocol (framing, keep-alive, malformed requests); this module only maps
a request to a response: 200 for GET/HEAD of those paths (any query string is ignored),
404 for other paths, 405 for other methods, 400 for what is not HTTP. Everything here is
read-only.

The page (status.html, package data) is one static file with its CSS and script inline
and no external asset; it fetches status.json and builds its DOM with textContent, so a
route or target name is never parsed as HTML. Its Content-Security-Policy allows
exactly its own inline style and script (by hash) and fetches to this origin.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http
import importlib.metadata
import importlib.resources
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import h11
import msgspec
import trio

from ._addresses import format_address
from ._errors import ListenError
from ._metrics import CONTENT_TYPE
from ._server import Forwarder
from ._status import package_version, status_document

__all__ = ["bind_metrics", "serve_metrics", "serve_metrics_on", "status_json"]

log = logging.getLogger("triofwd.metrics")

METRICS_PATH = b"/metrics"
PAGE_PATHS = (b"/", b"/index.html")
STATUS_PATH = b"/status.json"
PAGE_FILE = "status.html"
# A keep-alive connection (Prometheus keeps its scrape connections) idle this long is
# closed, and a request must arrive whole within it: an idle peer holds no task forever.
IDLE_TIMEOUT = 60.0
SEND_TIMEOUT = 10.0
RECEIVE_SIZE = 16 * 1024

# What renders a page: a plain function, or (the supervisor of workers, which asks them) an async one.
Render = Callable[[], str | Awaitable[str]]
Status = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]
Headers = list[tuple[bytes, bytes]]

_TEXT = (b"content-type", b"text/plain; charset=utf-8")
# The page and its data: no sniffing JSON into HTML, no framing, no cache answering for the
# daemon (the numbers change by the second).
_PAGE_HEADERS: Headers = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


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


async def serve_metrics_on(listeners: list[trio.SocketListener], render: Render, status: Status | None = None) -> None:
    """Serve `render()`'s text at /metrics on already bound listeners, until cancelled;
    with `status` (e.g. `lambda: status_json(fwd)`), the status page at / and `status()` at /status.json."""
    await trio.serve_listeners(functools.partial(_serve_client, render, status), listeners)


async def serve_metrics(
    render: Render,
    host: str | None,
    port: int,
    *,
    status: Status | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `render()` (e.g. `lambda: triofwd.metrics_text(fwd)`) at http://host:port/metrics,
    and with `status` the status page (see serve_metrics_on).

    Use with `nursery.start`: returns the listeners once bound (port 0 picks one).
    """
    listeners = await bind_metrics(host, port)
    task_status.started(listeners)
    await serve_metrics_on(listeners, render, status)


def status_json(fwd: Forwarder) -> dict[str, Any]:
    """The status page's data for a running forwarder (/status.json; fields in docs/status.md)."""
    return status_document(fwd.stats(), fwd.table.routes, fwd.addresses, time=time.time(), draining=fwd.draining, version=package_version())


async def _serve_client(render: Render, status: Status | None, stream: trio.SocketStream) -> None:
    # The boundary of one scrape connection: nothing may reach serve_listeners.
    conn = h11.Connection(h11.SERVER)
    async with stream:
        try:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT):
                    request = await _next_request(conn, stream)
                if request is None:
                    return  # closed, or idle too long
                try:
                    code, headers, body = await _respond(request, render, status)
                except Exception:  # a bug in what renders the page or the numbers: said, not a dropped socket
                    log.exception("metrics: %s failed", request.target.decode("ascii", "replace"))
                    code, headers, body = 500, [_TEXT, (b"connection", b"close")], b"internal error: see the daemon's log\n"
                await _send(conn, stream, code, headers, body, head=request.method == b"HEAD")
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


async def _respond(request: h11.Request, render: Render, status: Status | None) -> tuple[int, Headers, bytes]:
    path = request.target.split(b"?", 1)[0]
    pages = (METRICS_PATH, *PAGE_PATHS, STATUS_PATH) if status is not None else (METRICS_PATH,)
    if path not in pages:
        where = "the status page is at /, its data at /status.json, " if status is not None else ""
        return 404, [_TEXT], f"not found: {where}the metrics are at /metrics\n".encode()
    if request.method not in (b"GET", b"HEAD"):
        return 405, [(b"allow", b"GET, HEAD"), _TEXT], b"method not allowed\n"
    if path == METRICS_PATH:
        text = render()
        return 200, [(b"content-type", CONTENT_TYPE.encode())], (text if isinstance(text, str) else await text).encode()
    if path == STATUS_PATH and status is not None:
        document = status()
        document = document if isinstance(document, Mapping) else await document
        return 200, [(b"content-type", b"application/json"), *_PAGE_HEADERS], msgspec.json.encode(dict(document))
    page, policy = _page()
    return 200, [(b"content-type", b"text/html; charset=utf-8"), (b"content-security-policy", policy), *_PAGE_HEADERS], page


@functools.cache
def _page() -> tuple[bytes, bytes]:
    """The page, and a Content-Security-Policy that lets only its own inline style and script run."""
    page = importlib.resources.files(__package__ or "triofwd").joinpath(PAGE_FILE).read_bytes()

    def hashes(tag: bytes) -> str:
        found = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'" for body in found)

    policy = (
        f"default-src 'none'; style-src {hashes(b'style')}; script-src {hashes(b'script')}; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, policy.encode()


async def _send(conn: h11.Connection, stream: trio.SocketStream, status: int, headers: Headers, body: bytes, *, head: bool = False) -> None:
    # HEAD: the headers a GET would get, Content-Length included, and no body (RFC 9110 9.3.2).
    data = conn.send(
        h11.Response(status_code=status, reason=http.HTTPStatus(status).phrase.encode(), headers=[*headers, (b"content-length", str(len(body)).encode())])
    )
    if body and not head:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    with trio.fail_after(SEND_TIMEOUT):
        await stream.send_all(data)
