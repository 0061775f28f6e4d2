"""The "plain trio forwarder": the reference tools/bench.py measures triofwd against.

    python tools/forwarders/plain_trio.py PORT TARGET_HOST TARGET_PORT [--bind 127.0.0.1]

What a Trio programmer writes first: trio.serve_tcp, one trio.open_tcp_stream to the target
per connection, and two copy loops of SocketStream.receive_some/send_all with a 64 KiB
buffer; an EOF is passed on as send_eof (half-close). No timeouts, no accounting: it is the
floor triofwd's data path is compared with, not a product. Prints "ready PORT" when
listening (PORT is the bound one, so PORT 0 works).
"""

from __future__ import annotations

import argparse
import functools
import resource

import trio

RECEIVE_SIZE = 65536  # the same chunk triofwd's copying pump reads


async def copy(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    """src to dst until EOF, then pass the EOF on."""
    while data := await src.receive_some(RECEIVE_SIZE):
        await dst.send_all(data)
    await dst.send_eof()


async def handle(client: trio.SocketStream, target_host: str, target_port: int) -> None:
    async with client:
        try:
            target = await trio.open_tcp_stream(target_host, target_port)
        except OSError:
            return
        async with target:
            # A reset on either side ends both directions: the failing copy cancels its twin.
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(copy, client, target)
                    nursery.start_soon(copy, target, client)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


async def main(port: int, bind: str, target_host: str, target_port: int) -> None:
    async with trio.open_nursery() as nursery:
        handler = functools.partial(handle, target_host=target_host, target_port=target_port)
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, port, host=bind))
        print("ready", listeners[0].socket.getsockname()[1], flush=True)


def _raise_fd_limit() -> None:
    """Two fds per connection: take the hard RLIMIT_NOFILE, as triofwd does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("target_host")
    parser.add_argument("target_port", type=int)
    parser.add_argument("--bind", default="127.0.0.1")
    args = parser.parse_args()
    _raise_fd_limit()
    try:
        trio.run(main, args.port, args.bind, args.target_host, args.target_port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
