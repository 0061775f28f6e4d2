"""The asyncio + uvloop reference forwarder, measured beside triofwd by tools/bench.py.

    python tools/forwarders/asyncio_uvloop.py PORT TARGET_HOST TARGET_PORT [--bind 127.0.0.1]

Built the fast way rather than the obvious way: Protocols, not streams (no coroutine per
chunk, no StreamReader buffer), so it is the strongest baseline asyncio offers. Each side's
data_received writes straight into the other side's transport; back-pressure is
pause_writing/resume_writing on one transport mapped to pause_reading/resume_reading on the
other. An EOF is passed on with write_eof (half-close); the pair closes when both
directions are done or either side is lost. Prints "ready PORT" when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import resource

import uvloop

BACKLOG = 4096


class Side(asyncio.Protocol):
    """One socket of a forwarded pair; what it receives goes to its peer's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:  # the client half-closed before its target answered: dial() passes it on
            return True
        if peer.eof:  # both directions done; close() still flushes what is buffered
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()  # sent once the write buffer has drained
        return True  # keep this transport open: the other direction may still run

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Back-pressure: our transport's buffer is full, so stop reading from the side that fills it.
    def pause_writing(self) -> None:
        if self.peer is not None and not self.peer.transport.is_closing():  # type: ignore[union-attr]
            self.peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.transport.is_closing():  # type: ignore[union-attr]
            self.peer.transport.resume_reading()  # type: ignore[union-attr]


class ClientSide(Side):
    """The accepted socket: reading waits until the target is connected.

    Bytes that still arrive before that (a loop may start reading right after
    connection_made) are held and sent first.
    """

    def __init__(self, target: tuple[str, int], dials: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self.target = target
        self.dials = dials
        self.early: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
            self.transport.pause_reading()  # type: ignore[union-attr]
        else:
            self.peer.transport.write(data)  # type: ignore[union-attr]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()  # type: ignore[union-attr]
        task = asyncio.get_running_loop().create_task(self.dial())
        self.dials.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.dials.discard)

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, target = await loop.create_connection(Side, *self.target)
        except OSError:
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.transport.is_closing():  # type: ignore[union-attr]  # the client left while we dialled
            transport.close()
            return
        self.peer, target.peer = target, self
        if self.early:
            transport.writelines(self.early)
            self.early = []
        if self.eof:
            transport.write_eof()
        else:
            self.transport.resume_reading()  # type: ignore[union-attr]


async def main(port: int, bind: str, target_host: str, target_port: int) -> None:
    loop = asyncio.get_running_loop()
    dials: set[asyncio.Task[None]] = set()
    server = await loop.create_server(
        lambda: ClientSide((target_host, target_port), dials), bind, port, backlog=BACKLOG, reuse_address=True
    )
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


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
        uvloop.run(main(args.port, args.bind, args.target_host, args.target_port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
