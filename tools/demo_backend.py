"""A tiny HTTP/1.1 server for the demo and the benchmark: answers every request with a short body.

    python tools/demo_backend.py [--host 127.0.0.1] [--port 8081]

Keep-alive is honoured, so load generators (wrk) can reuse connections.
"""

from __future__ import annotations

import argparse
import functools

import trio

BODY = b"hello from the triofwd demo backend\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
MAX_HEADER = 64 * 1024


async def handle(stream: trio.SocketStream) -> None:
    buffer = b""
    async with stream:
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data or len(buffer) > MAX_HEADER:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                await stream.send_all(RESPONSE)
                if b"connection: close" in head.lower():
                    return
        except trio.BrokenResourceError:
            return


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
        await nursery.start(functools.partial(trio.serve_tcp, handle, port, host=host))
        print(f"demo backend on http://{host}:{port}/", flush=True)  # only once it listens


if __name__ == "__main__":
    main()
