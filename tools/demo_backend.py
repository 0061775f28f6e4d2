"""A tiny HTTP/1.1 server for the demo and the benchmark: answers every request with a short body.

    python tools/demo_backend.py [--host 127.0.0.1] [--port 8081]    (--port 0: any free port, printed)

h11 speaks the protocol: keep-alive for HTTP/1.1, so load generators (wrk) reuse
connections; the connection closes after the response to an HTTP/1.0 request or one that
says `Connection: close`. Request bodies are read and ignored; what is not HTTP gets a 400.
"""

from __future__ import annotations

import argparse
import functools
import http

import h11
import trio

BODY = b"hello from the triofwd demo backend\n"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))]
RECEIVE_SIZE = 65536


async def handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        try:
            while (request := await next_request(conn, stream)) is not None:
                await stream.send_all(respond(conn, 200, HEADERS, b"" if request.method == b"HEAD" else BODY))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # HTTP/1.0 or Connection: close (h11 added it to our response)
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                body = f"{exc}\n".encode()
                try:
                    await stream.send_all(respond(conn, exc.error_status_hint, [(b"connection", b"close"), (b"content-length", b"%d" % len(body))], body))
                except trio.BrokenResourceError:
                    pass
        except trio.BrokenResourceError:
            pass  # the client went away


async def next_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request, read whole (its body dropped), or None once the client closed."""
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


def respond(conn: h11.Connection, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A whole response as bytes to send at once. HEAD gets the headers of a GET and no body."""
    data = conn.send(h11.Response(status_code=status, reason=http.HTTPStatus(status).phrase.encode(), headers=headers))
    if body:
        data += conn.send(h11.Data(data=body))
    return data + conn.send(h11.EndOfMessage())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    try:
        trio.run(serve, args.host, args.port)
    except KeyboardInterrupt:
        pass


async def serve(host: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, port, host=host))
        port = listeners[0].socket.getsockname()[1]  # the one the kernel chose for --port 0
        print(f"demo backend on http://{host}:{port}/", flush=True)  # only once it listens


if __name__ == "__main__":
    main()
