"""Shared test helpers: backends, an embedded forwarder, and the real daemon as a subprocess.

Everything listens on 127.0.0.1 with port 0. Every helper is bounded in time and
cleans up what it started (processes by pid).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
import trio

import triofwd

REPO = pathlib.Path(__file__).resolve().parent.parent
Handler = Callable[[trio.SocketStream], Awaitable[None]]


def route(name: str = "r", **kw: Any) -> triofwd.Route:
    """A route on an ephemeral 127.0.0.1 port."""
    kw.setdefault("ports", [0])
    kw.setdefault("bind", "127.0.0.1")
    return triofwd.Route(name=name, **kw)


def config(*routes: triofwd.Route, **settings: Any) -> triofwd.Config:
    return triofwd.Config(settings=triofwd.Settings(**settings), routes=list(routes))


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@contextlib.asynccontextmanager
async def backend(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 running `handler` per connection; yields "127.0.0.1:port"."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        host, port = listeners[0].socket.getsockname()[:2]
        yield f"{host}:{port}"
        nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then close (passing the half-close back)."""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            async for data in stream:
                await stream.send_all(data)
            await stream.send_eof()


@contextlib.asynccontextmanager
async def forwarder(cfg: triofwd.Config, **kw: Any) -> AsyncIterator[triofwd.Forwarder]:
    """The real serve() in this test's nursery; cancelled (every connection closed) on exit."""
    async with trio.open_nursery() as nursery:
        fwd = await nursery.start(lambda task_status: triofwd.serve(cfg, task_status=task_status, **kw))
        yield fwd
        nursery.cancel_scope.cancel()


async def connect(fwd: triofwd.Forwarder, name: str = "r") -> trio.SocketStream:
    return await trio.open_tcp_stream(*split(fwd.addresses[name][0]))


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until EOF (a reset counts as the end too)."""
    buf = bytearray()
    with contextlib.suppress(trio.BrokenResourceError):
        async for data in stream:
            buf += data
    return bytes(buf)


async def receive_one_or_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """One byte, or b"" at EOF (a reset counts as the end too)."""
    try:
        return await stream.receive_some(1)
    except trio.BrokenResourceError:
        return b""


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition that has no event to await (another process's state, the kernel's)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


class AccessLogCapture:
    """An in-memory access log for embedded forwarders: one dict per ended connection."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = trio.Event()

    def write(self, text: str) -> int:
        self.lines.extend(line for line in text.splitlines() if line)
        self.changed.set()
        self.changed = trio.Event()
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    async def wait(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        with trio.fail_after(timeout):
            while len(self.lines) < count:
                await self.changed.wait()
        return self.records


# -- blocking helpers, for tests whose own thread blocks on a daemon -------------------------


@contextlib.contextmanager
def threaded_echo() -> Iterator[str]:
    """An echo server in threads on 127.0.0.1; yields "127.0.0.1:port"."""

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with contextlib.suppress(OSError):
                while data := self.request.recv(65536):
                    self.request.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        request_queue_size = 128  # the backlog of a plain listen(), not socketserver's 5: bursts of connects queue

    with Server(("127.0.0.1", 0), Echo) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield "127.0.0.1:%d" % server.server_address[1]
        finally:
            server.shutdown()
            thread.join(5)


# An echo server in a process of its own (asyncio: the standard library), for tests that make
# thousands of connections: in the test's process its threads would take turns for the GIL
# with the clients' (measured: 10,000 connections through two workers took twice as long).
# It prints its port, then serves until its stdin closes. ECHO_SERVER is its code without
# the call, for scripts that add to it.
ECHO_SERVER = r"""
import asyncio, sys

async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    writer.close()

async def serve():
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
"""
ECHO_PROCESS = ECHO_SERVER + "\nasyncio.run(serve())\n"


@contextlib.contextmanager
def echo_process() -> Iterator[str]:
    """An echo server in another process on 127.0.0.1 (stopped by pid); yields "127.0.0.1:port"."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        yield "127.0.0.1:%d" % int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(5)
        proc.stdin.close()
        proc.stdout.close()


def roundtrip(address: tuple[str, int], payload: bytes = b"ping") -> socket.socket:
    """A blocking connection that has echoed `payload` back; the caller closes it."""
    sock = socket.create_connection(address, timeout=5)
    sock.sendall(payload)
    assert sock.recv(len(payload), socket.MSG_WAITALL) == payload
    return sock


# -- misbehaving peers ----------------------------------------------------------------


@contextlib.contextmanager
def refused_address() -> Iterator[str]:
    """An address where nothing listens: the port stays bound (not listening) so nothing else takes it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield "127.0.0.1:%d" % sock.getsockname()[1]


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on now (connects are refused), free to listen on later."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """An address whose SYNs are dropped: a listener with backlog 0, already full."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield "127.0.0.1:%d" % listener.getsockname()[1]


def rst_close(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the peer sees a reset, not an EOF."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int | str = "self") -> dict[int, str]:
    """Each open fd of a process and what it points at (/proc/PID/fd); one closed while we look is left out."""
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile (for "self": the listing's own fd)
            targets[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return targets


def fd_kinds(pid: int | str = "self") -> collections.Counter[str]:
    """A process's open fds by kind: "pipe", "socket", "anon_inode", "file"... (from /proc/PID/fd)."""
    kinds: collections.Counter[str] = collections.Counter()
    for target in fd_targets(pid).values():
        kinds[target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"] += 1
    return kinds


def limit_fds(n: int) -> Callable[[], None]:
    """A preexec_fn that caps the child's RLIMIT_NOFILE, soft and hard, at `n`."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def netns_prefix() -> list[str]:
    """Command prefix that runs a program in a fresh network namespace with nft usable, or skip."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux network namespaces")
    for tool in ("unshare", "nft", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool!r} on PATH (nftables, iproute2, util-linux)")
    # As root a plain network namespace; otherwise a user namespace, which also grants
    # CAP_NET_ADMIN inside it where the kernel allows unprivileged user namespaces.
    prefix = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
    try:
        probe = subprocess.run([*prefix, "nft", "list", "tables"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.skip(f"`{' '.join(prefix)} nft list tables` timed out")
    if probe.returncode != 0:
        who = "root" if os.geteuid() == 0 else "not root, and"
        pytest.skip(
            f"cannot use nft in a private network namespace ({who} `{' '.join(prefix)}` failed):"
            f" {probe.stderr.strip() or f'exit {probe.returncode}'}"
        )
    return prefix


def run_triofwd(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """`python -m triofwd ...` run to completion from the repository, output captured as text."""
    return subprocess.run([sys.executable, "-m", "triofwd", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


class Daemon:
    """`triofwd serve` as a real subprocess, JSON logs on stderr, stopped by pid."""

    def __init__(
        self,
        routefile: pathlib.Path,
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        python_args: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
    ) -> None:
        """`python_args` go before `-m triofwd` (e.g. a `-c` launcher that execs the rest); `pass_fds` are inherited."""
        self.routefile = routefile
        self.access_log = routefile.with_suffix(".access.jsonl")
        self.stderr_path = routefile.with_suffix(".stderr")
        self._stderr = open(self.stderr_path, "w+b")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, *python_args, "-m", "triofwd", "serve", str(routefile), "--log-format", "json", "--access-log", str(self.access_log), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._stderr, cwd=REPO, env=env, preexec_fn=preexec_fn, pass_fds=pass_fds)
        self.listeners: dict[str, list[str]] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_log(self, msg: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [entry for entry in self.logs() if entry.get("msg", "").startswith(msg)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr_path.read_text()}")
            time.sleep(0.02)
        raise AssertionError(f"no {msg!r} log line within {timeout}s: {self.stderr_path.read_text()}")

    def wait_ready(self) -> Daemon:
        self.listeners = self.wait_log("ready")[-1]["listeners"]
        return self

    def address(self, name: str) -> tuple[str, int]:
        return split(self.listeners[name][0])

    def access_records(self) -> list[dict[str, Any]]:
        """The lines written so far; a line still being written (no newline yet) is left for later."""
        if not self.access_log.exists():
            return []
        complete, _, _ = self.access_log.read_text().rpartition("\n")
        return [json.loads(line) for line in complete.splitlines() if line]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def daemon(tmp_path: pathlib.Path) -> Iterator[Callable[..., Daemon]]:
    """Start `triofwd serve` on a route file's text; every daemon is killed by pid at teardown."""
    started: list[Daemon] = []

    def start(text: str, *args: str, suffix: str = ".toml", ready: bool = True, **kw: Any) -> Daemon:
        path = tmp_path / f"routes{len(started)}{suffix}"
        path.write_text(text)
        d = Daemon(path, *args, **kw)
        started.append(d)
        return d.wait_ready() if ready else d

    yield start
    for d in started:
        d.stop()
