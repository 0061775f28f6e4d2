"""`triofwd serve` under systemd: sockets passed in, READY/STATUS/RELOADING/STOPPING, the watchdog.

The daemon is the real process; systemd is played by the test: a datagram socket named by
NOTIFY_SOCKET, and listening sockets the test holds and passes on fds 3, 4, ... through
the launcher tests/test_systemd.py uses (LISTEN_PID set to the pid that execs triofwd).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import Daemon, backend, config, echo, forwarder, receive_exactly, roundtrip, route, run_triofwd, threaded_echo
from tests.test_systemd import ACTIVATE
from triofwd import ListenError
from triofwd._systemd import PassedSockets

TIMEOUT = 10.0


def routes(target: str, port: int, *extra: str) -> str:
    """Route "echo" on 127.0.0.1:`port` and route "own" on a port the daemon binds itself."""
    return "\n".join([
        "[settings]",
        'shutdown_grace = "1s"',
        "[[routes]]",
        'name = "echo"',
        f"ports = [{port}]",
        'bind = "127.0.0.1"',
        f'targets = ["{target}"]',
        "[[routes]]",
        'name = "own"',
        "ports = [0]",
        'bind = "127.0.0.1"',
        f'targets = ["{target}"]',
        *extra,
    ])  # fmt: skip


@contextlib.contextmanager
def listening(count: int = 1) -> Iterator[list[socket.socket]]:
    """Listening sockets on 127.0.0.1, as systemd binds them for a .socket unit, and holds them."""
    made = []
    try:
        for _ in range(count):
            sock = socket.socket()
            made.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
        yield made
    finally:
        for sock in made:
            sock.close()


def activated(sockets: list[socket.socket], names: str) -> dict[str, Any]:
    """Daemon arguments that pass `sockets` as systemd does (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID)."""
    fds = [sock.fileno() for sock in sockets]
    return {"python_args": ["-c", ACTIVATE, ",".join(map(str, fds)), names], "pass_fds": fds}


def port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


class FakeSystemd:
    """The notification socket of a service manager: every datagram received is kept, in order."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[bytes] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": self.path, **extra}

    def next(self, timeout: float = TIMEOUT) -> bytes:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        self.received.append(data)
        return data

    def expect(self, match: Callable[[bytes], bool], timeout: float = TIMEOUT) -> bytes:
        """The next datagram that `match`es (those before it are kept in `received` too)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching notification within {timeout}s; received {self.received[-10:]}")
            try:
                data = self.next(remaining)
            except TimeoutError:
                continue
            if match(data):
                return data

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def fake_systemd(tmp_path: pathlib.Path) -> Iterator[FakeSystemd]:
    manager = FakeSystemd(tmp_path / "notify.sock")
    try:
        yield manager
    finally:
        manager.close()


def not_watchdog(data: bytes) -> bool:
    return data != b"WATCHDOG=1"


def test_passed_sockets_serve_their_routes_and_systemd_hears_every_state(daemon: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    with threaded_echo() as target, listening(2) as (web, spare), fake_systemd(tmp_path) as systemd:
        text = routes(target, port(web))
        # WATCHDOG_USEC=200ms: a ping every 100 ms.
        d = daemon(text, env=systemd.env(WATCHDOG_USEC="200000"), **activated([web, spare], "web:spare"))
        assert systemd.next() == b"READY=1"
        assert systemd.expect(not_watchdog) == b"STATUS=0 connections open"
        # "echo" accepts on the very socket the test holds, passed in (not one of its own
        # bound beside it); "own" (port 0) is bound by the daemon as usual.
        assert d.listeners["echo"] == [f"127.0.0.1:{port(web)}"]
        fd_of_echo = os.readlink(f"/proc/{d.pid}/fd/3")
        assert fd_of_echo == os.readlink(f"/proc/self/fd/{web.fileno()}")
        roundtrip(d.address("own")).close()
        held = roundtrip(web.getsockname())
        assert systemd.expect(not_watchdog) == b"STATUS=1 connection open"  # within a few seconds
        pings = len([data for data in systemd.received if data == b"WATCHDOG=1"])
        for _ in range(3):
            systemd.expect(lambda data: data == b"WATCHDOG=1")
        assert pings + 3 <= systemd.received.count(b"WATCHDOG=1")
        # The passed socket no route listens on is named in a warning and kept open...
        [unused] = [e for e in d.logs() if e["msg"].startswith("systemd passed a socket")]
        assert (unused["level"], unused["msg"]) == ("warning", f"systemd passed a socket no route listens on: spare (127.0.0.1:{port(spare)})")
        # ...for a reload that adds a route at its port; RELOADING=1 (with the time, as
        # Type=notify-reload wants) and READY=1 around the reload.
        d.routefile.write_text(text + f'\n[[routes]]\nname = "late"\nports = [{port(spare)}]\nbind = "127.0.0.1"\ntargets = ["{target}"]\n')
        d.signal(signal.SIGHUP)
        reloading = systemd.expect(not_watchdog)
        assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", reloading), reloading
        assert systemd.expect(not_watchdog) == b"READY=1"
        d.wait_log("reloaded")
        roundtrip(spare.getsockname()).close()
        # A bad file: refused, and READY=1 all the same (the old table serves on).
        d.routefile.write_text("[[routes]]\nname = 1\n")
        d.signal(signal.SIGHUP)
        assert systemd.expect(not_watchdog).startswith(b"RELOADING=1\n")
        assert systemd.expect(not_watchdog) == b"READY=1"
        d.signal(signal.SIGTERM)
        assert systemd.expect(not_watchdog) == b"STOPPING=1\nSTATUS=stopping: 1 connection open"
        systemd.expect(lambda data: data == b"WATCHDOG=1")  # pinging through the shutdown grace
        held.close()
        assert d.wait() == 0
        # Our copies were closed, never shut down: systemd's still listen, and a client
        # that comes now waits in the backlog for the next triofwd.
        with socket.create_connection(web.getsockname(), timeout=TIMEOUT), socket.create_connection(spare.getsockname(), timeout=TIMEOUT):
            pass


def test_a_restart_on_the_same_passed_socket_refuses_no_connection(daemon: Callable[..., Daemon]) -> None:
    with threaded_echo() as target, listening() as [web]:
        text = routes(target, port(web))
        address = web.getsockname()
        first = daemon(text, **activated([web], "web"))
        outcomes: list[str] = []
        progress = threading.Condition()
        stop = threading.Event()

        def client_loop() -> None:
            """Connections one after another all through the restart: each must be served."""
            while not stop.is_set():
                try:
                    roundtrip(address, b"loop").close()
                    outcome = "ok"
                except (OSError, AssertionError) as exc:
                    outcome = repr(exc)
                with progress:
                    outcomes.append(outcome)
                    progress.notify_all()

        def served(count: int) -> None:
            with progress:
                assert progress.wait_for(lambda: len(outcomes) >= count, TIMEOUT), outcomes[-3:]

        loop = threading.Thread(target=client_loop, daemon=True)
        loop.start()
        try:
            served(5)
            first.signal(signal.SIGTERM)
            assert first.wait() == 0
            # No triofwd now: clients connect all the same (the kernel completes the
            # handshake on the socket the test holds) and wait in its backlog.
            queued = [socket.create_connection(address, timeout=TIMEOUT) for _ in range(20)]
            for i, sock in enumerate(queued):
                sock.sendall(b"queued %2d" % i)
            second = daemon(text, **activated([web], "web"))
            for i, sock in enumerate(queued):
                assert sock.recv(9, socket.MSG_WAITALL) == b"queued %2d" % i
                sock.close()
            served(len(outcomes) + 5)  # and the loop goes on through the second daemon
        finally:
            stop.set()
            loop.join(TIMEOUT)
        second.signal(signal.SIGTERM)
        assert second.wait() == 0
    assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    records = first.access_records() + second.access_records()
    assert len(records) == len(outcomes) + len(queued)
    assert {r["reason"] for r in records} == {"normal"}


def test_malformed_systemd_variables_exit_2_with_one_line() -> None:
    result = run_triofwd("serve", "routes/demo.toml", env={**os.environ, "LISTEN_PID": "x", "LISTEN_FDS": "1"})
    assert (result.returncode, result.stderr) == (2, "triofwd: LISTEN_PID='x' from the environment is not a number\n")
    result = run_triofwd("serve", "routes/demo.toml", env={**os.environ, "WATCHDOG_USEC": "30s"})
    assert (result.returncode, result.stderr) == (2, "triofwd: WATCHDOG_USEC='30s' from the environment is not a number\n")


async def test_a_passed_socket_goes_back_open_when_its_listener_stops_or_its_reload_fails() -> None:
    """A passed socket claimed for a new route, while another new port cannot be bound: the
    reload is refused, and the socket goes back unclaimed and open, for the next reload. A
    reload that drops its route gives it back too, and one that adds the route again takes it."""
    with listening(2) as (spare, busy), trio.fail_after(TIMEOUT):
        passed = PassedSockets([("spare", spare)])
        async with backend(echo) as target, forwarder(config(route("a", targets=[target])), passed=passed) as fwd:
            assert passed.unclaimed == [("spare", spare)]
            late = route("late", ports=[port(spare)], targets=[target])
            with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port(busy)}: Address already in use"):
                await fwd.reload(config(route("a", targets=[target]), late, route("busy", ports=[port(busy)], targets=[target])))
            assert passed.unclaimed == [("spare", spare)] and spare.fileno() != -1
            await fwd.reload(config(route("a", targets=[target]), late))
            assert passed.unclaimed == []
            assert fwd.addresses["late"] == [f"127.0.0.1:{port(spare)}"]
            async with await trio.open_tcp_stream("127.0.0.1", port(spare)) as stream:
                await stream.send_all(b"late")
                assert await receive_exactly(stream, 4) == b"late"
            await fwd.reload(config(route("a", targets=[target])))
            await trio.testing.wait_all_tasks_blocked()  # the accept task has left
            assert passed.unclaimed == [("spare", spare)] and spare.fileno() != -1
            await fwd.reload(config(route("a", targets=[target]), late))
            async with await trio.open_tcp_stream("127.0.0.1", port(spare)) as stream:
                await stream.send_all(b"back")
                assert await receive_exactly(stream, 4) == b"back"
        # serve() has ended: the socket is the caller's again, open.
        assert passed.unclaimed == [("spare", spare)] and spare.fileno() != -1


def test_passed_sockets_with_two_workers_one_queue_every_worker_holds_and_a_reload_gives_back(daemon: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    """workers = 2 under socket activation: systemd's one socket per address is every
    worker's (each holds it and accepts from its queue), READY=1 once both are ready, a port
    with a per-IP limit says that limit counts per worker there, and a reload that drops the
    route gives the socket back, open, for the next reload to claim."""
    with threaded_echo() as target, listening() as [web], fake_systemd(tmp_path) as systemd:
        text = routes(target, port(web)).replace("[settings]", "[settings]\nworkers = 2\nmax_connections_per_ip = 100")
        d = daemon(text, "--log-level", "info", env=systemd.env(), ready=False, **activated([web], "web"))
        assert systemd.expect(not_watchdog) == b"READY=1\nSTATUS=2 workers"
        assert len([e for e in d.logs() if e.get("msg") == "ready" and "worker" in e]) == 2, "READY=1 after both workers"
        [steering] = [e for e in d.logs() if "is systemd's socket" in e.get("msg", "")]
        assert steering["msg"] == f"127.0.0.1:{port(web)} is systemd's socket, one queue for every worker: per-IP limits count per worker there"
        [supervisor] = [e for e in d.logs() if e.get("msg") == "ready" and "worker" not in e]
        for pid in supervisor["pids"]:
            socket_fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert os.readlink(f"/proc/self/fd/{web.fileno()}") in socket_fds, "the worker holds systemd's socket itself"
        held = [roundtrip(web.getsockname()) for _ in range(40)]
        for sock in held:
            sock.close()
        deadline = time.monotonic() + TIMEOUT
        while len([r for r in d.access_records() if r["route"] == "echo"]) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        # Which worker takes a connection is whichever wakes first: not asserted, only that
        # every one was served by one of the two.
        served = [r for r in d.access_records() if r["route"] == "echo"]
        assert len(served) == 40 and {r["reason"] for r in served} == {"normal"}
        assert {r["id"] // 10**12 for r in served} <= {1, 2}
        # A reload without the route: the socket goes back to the supervisor, open; a reload
        # with it again claims it again.
        without = text.split('[[routes]]\nname = "echo"')[0] + '[[routes]]\nname = "own"' + text.split('[[routes]]\nname = "own"')[1]
        d.routefile.write_text(without)
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded", count=3)  # each worker's, then the supervisor's
        d.routefile.write_text(text)
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded", count=6)
        roundtrip(web.getsockname()).close()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        with socket.create_connection(web.getsockname(), timeout=TIMEOUT):
            pass  # systemd's copy still listens
