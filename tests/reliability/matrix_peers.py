"""The feature matrix's I/O: the test's end of a case's connection, the far end it reaches,
and the script each fault follows (matrix.py has the cases and their expected reasons).

Shared by tests/reliability/test_matrix.py, which runs every case once, and tools/soak.py,
which runs them at random for as long as it soaks.
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import socket
import ssl
import stat
from typing import Any, Protocol

import trio

from tests.conftest import rst_close
from tests.reliability import commands, matrix
from triofwd._proxy_protocol import V2_SIGNATURE, encode_v2, parse_proxy_header

POLL = 0.05
PAYLOAD = b"ping"
LONG_ECHO = 1000  # more than the case sends: the far end waits for the rest, the connection stays
BULK = 256 * 1024  # client_half_close: this much in flight when the client sends its EOF
IMMORTAL_IDLE = 0.7  # an immortal connection idles longer than the others' inactivity window


class Hooks(Protocol):
    """What a case's script needs from whoever runs it."""

    reloaded: trio.Event  # the reload the reload cases wait for is done
    shutdown: trio.Event  # the daemon was told to stop

    async def request(self, cmd: str, **args: Any) -> Any: ...  # a control-socket request

    def arrive(self, case: matrix.Case) -> None: ...  # the case waits at its barrier (reload, shutdown)


class Ended(Exception):
    """The connection ended before the script expected it to."""


# The daemon ends these at a time of its own (a timeout counted from the accept, or from the
# last byte): on a busy machine that may come before the script is through. Their duration
# is checked against the timeout instead.
UNTIMELY = (Ended, trio.BrokenResourceError, trio.ClosedResourceError)


class Counting(trio.abc.HalfCloseableStream):
    """A client's socket stream that counts the bytes it moves (TLS records included)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sent = self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)
        self.sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class Peer:
    """The test's end of one case's connection."""

    def __init__(self, case: matrix.Case, address: tuple[str, int], tls: ssl.SSLContext, index: int, destination: tuple[str, int] | None = None) -> None:
        self.case = case
        self.address = address
        self.destination = destination  # what a socks5 / http_connect client asks for
        self.tls = tls
        # Each case's client has an address of its own (all of 127.0.0.0/8 is loopback), so
        # even a line logged before any route was chosen names its case.
        self.source = f"127.1.{index // 250}.{1 + index % 250}"
        self.claimed = (f"198.51.{100 + index // 250}.{1 + index % 250}", 1024 + index) if case.combo.accept_proxy else None
        self.header_bytes = 0  # sent before the tunnel: a PROXY header, a SOCKS5 or CONNECT request
        self.answer_bytes = 0  # received before the tunnel: the SOCKS5 or CONNECT answer
        self.sent = self.received = 0  # application bytes (inside TLS, where TLS is spoken)
        self.client = ""

    async def connect(self) -> None:
        sock = await trio.open_tcp_stream(*self.address, local_address=self.source)
        self.raw = Counting(sock)
        host, port = sock.socket.getsockname()[:2]
        self.client = f"{host}:{port}"
        self.stream: trio.abc.Stream = self.raw

    async def open(self) -> None:
        """Connect, say who the client is (a trusted proxy's header), and handshake."""
        await self.connect()
        if self.claimed is not None:
            header = encode_v2(self.claimed, self.address)
            await self.raw.send_all(header)
            self.header_bytes = len(header)
            self.client = "%s:%d" % self.claimed
        if self.case.combo.action in matrix.DYNAMIC:
            await self.ask()
        if self.case.combo.tls:
            secure = trio.SSLStream(self.raw, self.tls, server_hostname=matrix.FRONT_NAME, https_compatible=True)
            await secure.do_handshake()
            self.stream = secure

    async def ask(self) -> None:
        """The SOCKS5 or HTTP CONNECT handshake that names the target, answered "connected"."""
        assert self.destination is not None, "a socks5 / http_connect case needs its destination"
        host, port = self.destination
        if self.case.combo.action == "socks5":
            request = b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")
            answer = b"\x05\x00" + b"\x05\x00\x00\x01"
            length = 2 + 10  # the method, then the reply with its bound address
        else:
            request = b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (host.encode(), port, host.encode(), port)
            answer = b"HTTP/1.1 200 Connection established\r\n\r\n"
            length = len(answer)
        await self.raw.send_all(request)
        self.header_bytes += len(request)
        got = bytearray()
        while len(got) < length:
            chunk = await self.raw.receive_some(length - len(got))
            if not chunk:
                raise Ended(f"the connection ended during the handshake, after {bytes(got)!r}")
            got += chunk
        self.answer_bytes = length
        assert bytes(got).startswith(answer), bytes(got)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)
        self.sent += len(data)

    async def receive_exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = await self.stream.receive_some(n - len(data))
            if not chunk:
                raise Ended(f"the connection ended after {len(data)} of {n} bytes")
            data += chunk
            self.received += len(chunk)
        return bytes(data)

    async def receive_to_end(self) -> bytes:
        """Everything until the connection ends (EOF, close_notify or reset)."""
        data = bytearray()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await self.stream.receive_some(65536):
                data += chunk
        self.received += len(data)
        return bytes(data)

    async def command(self, word: str, payload: bytes = b"", count: int | None = None) -> None:
        """Tell the far end what to do (commands.py), sending `payload` after the line, and see
        the payload echoed where the command echoes."""
        line = f"{word} {self.case.name}" + ("" if count is None else f" {count}")
        await self.send(line.encode() + b"\n" + payload)
        if word in ("echo", "hold") and payload:
            assert await self.receive_exactly(len(payload)) == payload

    async def half_close(self) -> None:
        """This side's EOF, below TLS where TLS is spoken (TLS itself cannot half-close)."""
        await self.raw.send_eof()

    async def until_bye(self) -> None:
        """The far end ends first: its b"bye", then the end of the connection."""
        assert await self.receive_to_end() == commands.BYE

    def reset(self) -> None:
        rst_close(self.raw.stream)

    async def aclose(self) -> None:
        await self.raw.aclose()


async def play(peer: Peer, hooks: Hooks) -> None:
    """One case's script: its connection, the fault, and what the client must see."""
    combo, fault = peer.case.combo, peer.case.fault
    if fault == "initial_data_timeout":
        await peer.connect()  # and says nothing: no header, no ClientHello
        assert await peer.receive_to_end() == b""
        return
    await peer.open()
    if combo.action == "reject":
        assert await peer.receive_to_end() == b""
        return
    if fault == "normal":
        await peer.command("echo", PAYLOAD, len(PAYLOAD))
        await peer.until_bye()
    elif fault == "client_reset":
        await peer.command("echo", PAYLOAD, LONG_ECHO)
        peer.reset()
    elif fault == "target_reset":
        await peer.command("reset")
        assert await peer.receive_to_end() == b""
    elif fault == "client_half_close":
        await peer.command("stream")
        bulk = bytes(range(256)) * (BULK // 256)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_then_eof, peer, bulk)
            got = await peer.receive_to_end()
        if not combo.tls:  # a TLS client's EOF ends the connection at once (TLS cannot half-close)
            assert got == bulk + commands.BYE, (len(got), got[-10:])
    elif fault == "target_half_close":
        await peer.command("halfclose")
        assert await peer.receive_to_end() == commands.BYE
        if not combo.tls:  # the client's direction is still open: use it
            await peer.send(b"more")
            await peer.half_close()
            await until_gone(peer, hooks)
    elif fault == "kill":
        await peer.command("echo", PAYLOAD, LONG_ECHO)
        [row] = await hooks.request("connections", client=peer.client)
        await hooks.request("kill", id=row["id"])
        await peer.receive_to_end()
    elif fault == "reload":
        await peer.command("echo", PAYLOAD, 2 * len(PAYLOAD))
        hooks.arrive(peer.case)
        await hooks.reloaded.wait()
        await peer.send(PAYLOAD)
        assert await peer.receive_exactly(len(PAYLOAD)) == PAYLOAD
        await peer.until_bye()
    elif fault == "shutdown":
        await peer.command("echo", PAYLOAD, LONG_ECHO)
        hooks.arrive(peer.case)
        await hooks.shutdown.wait()
        await peer.receive_to_end()
    elif fault == "inactivity":
        if combo.keepalive == "immortal":
            await peer.command("echo", PAYLOAD, 2 * len(PAYLOAD))
            await trio.sleep(IMMORTAL_IDLE)
            await peer.send(PAYLOAD)
            assert await peer.receive_exactly(len(PAYLOAD)) == PAYLOAD
            await peer.until_bye()
        else:
            await peer.command("echo", PAYLOAD, LONG_ECHO)
            assert await peer.receive_to_end() == b""
    elif fault == "lifetime":
        await peer.command("echo", PAYLOAD, LONG_ECHO)
        await peer.receive_to_end()
    elif fault == "half_close_timeout":
        await peer.command("hold", PAYLOAD, len(PAYLOAD))
        await peer.half_close()
        assert await peer.receive_to_end() == b""
    else:
        raise AssertionError(f"no script for {fault}")


def ended_by_a_clock(case: matrix.Case) -> bool:
    return case.fault in ("lifetime", "initial_data_timeout") or (case.fault in ("inactivity", "half_close_timeout") and case.expected != "normal")


async def _send_then_eof(peer: Peer, data: bytes) -> None:
    await peer.send(data)
    await peer.half_close()


async def until_gone(peer: Peer, hooks: Hooks) -> None:
    """The connection has left the daemon's table: after its half-close the client has
    nothing left to read that would tell it so."""
    while await hooks.request("connections", client=peer.client):
        await trio.sleep(POLL)


# -- the far end ------------------------------------------------------------------------


class TargetServer:
    """The matrix's target: a PROXY header first if one comes, TLS if the bytes are TLS, then commands.py."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.tls = tls
        self.record = commands.Record()
        self.errors: list[str] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._serve(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, OSError):
                pass  # the forwarder ended the connection: that is what many cases do
            except Exception as exc:
                self.errors.append(repr(exc))

    async def _serve(self, stream: trio.SocketStream) -> None:
        data = await stream.receive_some(4096)
        header = None
        while data and any(sig.startswith(data) and sig != data for sig in _SIGNATURES):
            data += await stream.receive_some(4096)  # a header's first bytes: read on
        if data.startswith(_SIGNATURES):
            while (parsed := parse_proxy_header(data)) is None:
                more = await stream.receive_some(4096)
                if not more:
                    raise EOFError("closed inside its PROXY header")
                data += more
            header, used = parsed
            data = data[used:]
        if not data:
            data = await stream.receive_some(4096)  # every case's first bytes come from its client
        if data[:1] == b"\x16":  # a TLS handshake record
            secure = trio.SSLStream(_Prefixed(stream, data), self.tls, server_side=True, https_compatible=True)
            await secure.do_handshake()
            # Its EOF below TLS: an SSLStream has no other (the forwarder reads it as the end).
            await commands.serve_commands(secure, self.record, end_sending=stream.send_eof, raw=stream.socket, header=header)
        else:
            await commands.serve_commands(stream, self.record, end_sending=stream.send_eof, raw=stream.socket, header=header, first=data)


_SIGNATURES = (b"PROXY ", V2_SIGNATURE)


class _Prefixed(trio.abc.HalfCloseableStream):
    """A socket stream whose first read returns bytes already taken from it."""

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self.stream, self.first = stream, first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.first:
            data, self.first = self.first, b""
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


# -- the daemon's surroundings ----------------------------------------------------------

NFT_STUB = "#!/bin/sh\necho 'Error: Operation not permitted (offload routes run without nftables here)' >&2\nexit 1\n"


def nft_stub(folder: pathlib.Path) -> str:
    """A folder with an `nft` that refuses as an unprivileged one does: put first on the
    daemon's PATH, offload routes fall back to forwarding (and nothing reaches the kernel)."""
    stub = folder / "nft"
    stub.write_text(NFT_STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return str(folder)


def free_ports(count: int) -> list[int]:
    """`count` distinct free 127.0.0.1 ports below the ephemeral range, for offload routes
    (which need fixed ports): the daemon's port-0 listeners and every client's own port come
    from that range, so none of them can take these first."""
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    start = random.randrange(10000, max(10001, low - 4 * count))
    ports: list[int] = []
    for port in range(start, low):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports between {start} and {low}")
