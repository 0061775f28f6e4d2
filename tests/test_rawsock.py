"""The one reach into trio's internals on the data path: the stdlib socket under a trio socket.

If trio stops keeping a socket.socket there (or changes what it is), these fail, and the
forwarder's try-the-syscall-first paths (accept, recv_into, send, splice) must change with it.
"""

from __future__ import annotations

import socket

import trio

from triofwd._rawsock import raw_socket


async def test_the_raw_socket_is_the_same_non_blocking_socket_trio_uses() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        raw = raw_socket(a)
        assert isinstance(raw, socket.socket)
        assert raw is raw_socket(a)  # the same object every time, not a copy
        assert raw.fileno() == a.fileno()
        assert raw.getblocking() is False  # trio's sockets are non-blocking: a raw call never blocks the loop
        raw.send(b"ping")
        assert await b.recv(4) == b"ping"  # what the raw socket sends, trio's peer reads


async def test_a_trio_socket_stream_exposes_it_too() -> None:
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = await trio.open_tcp_stream(*listener.getsockname()[:2])
        server, _ = await listener.accept()
        with server:
            async with client:
                raw_socket(client.socket).send(b"pong")
                assert await server.recv(4) == b"pong"
