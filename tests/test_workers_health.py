"""Health checks with workers = 2: the supervisor checks each target once, every worker follows.

The daemon is the real process tree (see test_workers.py); targets are threaded TCP servers
on fixed 127.0.0.1 ports that a test stops (connects are refused) and starts again. A target
answers a check's PING with PONG, noting when, and a client with its name; routes have
connect_retries = 0, so a worker that sent a client to a stopped target would show it (the
client gets no name back).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import triofwd
from tests.conftest import Daemon, config, route
from tests.test_metrics import parse_exposition, value
from tests.test_workers import TIMEOUT, ask, logged, supervisor_ready, wait_until
from triofwd._table import compile_table
from triofwd._targets import TargetRegistry
from triofwd._worker import ID_SPAN
from triofwd.control.workers import merge_targets, with_checks

INTERVAL = 0.2
CHECK = f'health_check = {{ interval = "{INTERVAL}s", timeout = "1s", rise = 2, fall = 2, send = "PING", expect = "PONG" }}'
CLIENTS = 40


class Target:
    """A TCP target on a fixed 127.0.0.1 port: PING gets PONG (its time noted in `probes`),
    anything else its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.probes: list[float] = []  # time.monotonic() of each check
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        target = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    data = self.request.recv(64)
                    if data.startswith(b"PING"):
                        target.probes.append(time.monotonic())
                        self.request.sendall(b"PONG")
                    elif data:
                        self.request.sendall(target.name.encode())

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True  # the same port again after stop()
            daemon_threads = True
            request_queue_size = 128

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listening socket: connects are refused from now on."""
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(TIMEOUT)


@pytest.fixture
def two_targets() -> Iterator[tuple[Target, Target]]:
    a, b = Target("a"), Target("b")
    a.start()
    b.start()
    yield a, b
    for target in (a, b):
        with contextlib.suppress(AssertionError, OSError):
            target.stop()


def routes(*targets: Target, check: str = CHECK) -> str:
    listed = ", ".join(f'"{t.address}"' for t in targets)
    return "\n".join([
        "[settings]",
        "workers = 2",
        'shutdown_grace = "1s"',
        "[[routes]]",
        'name = "r"',
        "ports = [0]",
        'bind = "127.0.0.1"',
        f"targets = [{listed}]",
        "connect_retries = 0",
        check,
    ])  # fmt: skip


def clients(d: Daemon, count: int = CLIENTS) -> tuple[list[bytes], list[dict[str, Any]]]:
    """`count` clients one after the other: what each got back (a target's name, or b"" when
    its connection failed), and the access-log records of their connections."""
    before = len(d.access_records())
    replies = []
    for _ in range(count):
        with socket.create_connection(d.address("r"), timeout=TIMEOUT) as sock:
            sock.sendall(b"hi")
            reply = b""
            with contextlib.suppress(ConnectionResetError):
                while data := sock.recv(64):
                    reply += data
            replies.append(reply)
    wait_until(lambda: len(d.access_records()) >= before + count)
    return replies, d.access_records()[before:]


def workers_of(records: list[dict[str, Any]], target: Target) -> set[int]:
    return {r["id"] // ID_SPAN for r in records if r["target"] == target.address}


def followed(d: Daemon, target: Target | UdpTarget, state: str) -> None:
    """Wait until both workers say they follow the supervisor's verdict on `target`."""
    msg = f"route r: target {target.address} is {state}, as the supervisor's checks say"
    for number in (1, 2):
        logged(d, msg, worker=number)


def target_rows(control: pathlib.Path) -> dict[str, dict[str, Any]]:
    """The route's targets as the supervisor's `routes` shows them, one row each."""
    [route] = ask(control, "routes")
    rows = route["target_state"]
    assert len(rows) == len({row["target"] for row in rows}), rows
    return {row["target"]: row for row in rows}


def test_each_target_is_checked_once_per_interval_not_once_per_worker(daemon: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    a = Target("a")
    a.start()
    try:
        control = tmp_path / "control.sock"
        d = daemon(routes(a), "--control", str(control), ready=False)
        supervisor_ready(d)
        wait_until(lambda: len(a.probes) >= 12)
        probes = a.probes[:12]
        rows = target_rows(control)
        seen = len(a.probes)
    finally:
        a.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(probes)]
    # One checker paces itself (sleep_until: never early), so 12 checks span 11 intervals; a
    # checker in each worker would double the rate (12 in about 6 intervals) and put checks
    # of one between those of the other. The margins leave room for a loaded machine.
    assert probes[-1] - probes[0] >= 11 * INTERVAL * 0.8, gaps
    # `routes` counts the supervisor's checks: as many as the target saw
    row = rows[a.address]
    assert row["up"] and row["last_check"] == "ok"
    assert seen - 2 <= row["checks_passed"] <= seen, (row, seen)


def test_a_target_down_is_skipped_by_every_worker_shown_once_and_brought_back(
    daemon: Callable[..., Daemon], two_targets: tuple[Target, Target], tmp_path: pathlib.Path
) -> None:
    a, b = two_targets
    control = tmp_path / "control.sock"
    d = daemon(routes(a, b), "--control", str(control), ready=False)
    supervisor_ready(d)
    wait_until(lambda: all(row["last_check"] == "ok" for row in target_rows(control).values()))
    replies, records = clients(d)
    assert set(replies) == {b"a", b"b"}
    assert workers_of(records, b) == {1, 2}

    b.stop()
    wait_until(lambda: not target_rows(control)[b.address]["up"])
    followed(d, b, "down")
    rows = target_rows(control)
    assert list(rows) == [a.address, b.address]
    assert rows[b.address]["last_check"] == "connect_refused" and not rows[b.address]["usable"]
    assert rows[a.address]["up"] and rows[a.address]["usable"]
    lines = [e for e in d.logs() if e.get("msg", "").startswith(f"route r: target {b.address} is down (")]
    assert len(lines) == 1 and "worker" not in lines[0], "the supervisor checks, once"
    replies, records = clients(d)
    assert replies == [b"a"] * CLIENTS, "no worker sends a client to the target that is down"
    assert workers_of(records, a) == {1, 2} and {r["reason"] for r in records} == {"normal"}
    stats = ask(control, "stats")
    assert [(t["target"], t["up"]) for t in stats["targets"]["r"]] == [(a.address, True), (b.address, False)]
    fams = parse_exposition(ask(control, "metrics"))
    assert value(fams, "triofwd_target_up", route="r", target=b.address) == 0
    assert value(fams, "triofwd_target_up", route="r", target=a.address) == 1

    b.start()  # the same port again
    wait_until(lambda: target_rows(control)[b.address]["up"])
    followed(d, b, "up")
    logged(d, f"route r: target {b.address} is up again", worker=None)
    replies, records = clients(d)
    assert set(replies) == {b"a", b"b"}
    assert workers_of(records, b) == {1, 2}, "every worker sends clients to it again"


def test_a_restarted_worker_starts_with_the_verdicts_of_now(
    daemon: Callable[..., Daemon], two_targets: tuple[Target, Target], tmp_path: pathlib.Path
) -> None:
    a, b = two_targets
    control = tmp_path / "control.sock"
    d = daemon(routes(a, b), "--control", str(control), ready=False)
    pids = supervisor_ready(d)["pids"]
    b.stop()
    wait_until(lambda: not target_rows(control)[b.address]["up"])
    os.kill(pids[0], signal.SIGKILL)
    logged(d, "ready", count=2, worker=1)  # its replacement
    replies, records = clients(d)
    assert replies == [b"a"] * CLIENTS, "the replacement never sends a client to the target that is down"
    assert workers_of(records, a) == {1, 2}, "the replacement serves"


def test_a_reload_checks_the_new_targets_and_every_worker_follows(daemon: Callable[..., Daemon], two_targets: tuple[Target, Target], tmp_path: pathlib.Path) -> None:
    a, b = two_targets
    control = tmp_path / "control.sock"
    d = daemon(routes(a), "--control", str(control), ready=False)
    supervisor_ready(d)
    b.stop()
    d.routefile.write_text(routes(a, b))
    d.signal(signal.SIGHUP)
    logged(d, "reloaded", count=3)  # the supervisor and both workers
    wait_until(lambda: not target_rows(control).get(b.address, {"up": True})["up"])
    replies, records = clients(d)
    assert replies == [b"a"] * CLIENTS
    assert workers_of(records, a) == {1, 2}
    # a route that stops checking: its targets are up again for the supervisor and every worker
    d.routefile.write_text(routes(a, b, check=""))
    d.signal(signal.SIGHUP)
    logged(d, "reloaded", count=6)
    wait_until(lambda: target_rows(control)[b.address]["up"])
    b.start()
    replies, records = clients(d)
    assert set(replies) == {b"a", b"b"} and workers_of(records, b) == {1, 2}
    assert b.probes == [], "no check reaches it any more"


# -- the pieces ----------------------------------------------------------------------------


def test_a_worker_registry_follows_verdicts_only_where_its_route_is_checked() -> None:
    checks = triofwd.HealthCheck(interval="1s")
    table = compile_table(config(route("r", targets=["127.0.0.1:1", "127.0.0.1:2"], health_check=checks), route("plain", targets=["127.0.0.1:2"])))
    started: list[object] = []
    registry = TargetRegistry(verdicts={"r": ["127.0.0.1:2"], "plain": ["127.0.0.1:2"]})
    registry.update(table.routes, started.append)
    assert started == [], "a worker runs no checks of its own"

    def ups() -> dict[str, list[bool]]:
        return {name: [row["up"] for row in rows] for name, rows in registry.describe(0.0).items()}

    assert ups() == {"r": [True, False], "plain": [True]}, "a route without health_check is never held down"
    assert registry.down() == {"r": ["127.0.0.1:2"]}
    registry.follow({"r": ["127.0.0.1:1"]})
    assert ups() == {"r": [False, True], "plain": [True]}
    registry.follow({})
    assert ups() == {"r": [True, True], "plain": [True]}
    supervisor = TargetRegistry(warm=False)
    supervisor.update(compile_table(config(route("w", targets=["127.0.0.1:1"], warm=2))).routes, started.append)
    assert started == [], "a supervisor keeps no warm sockets"


def test_the_supervisor_s_checks_replace_the_workers_check_fields_once_per_target() -> None:
    worker_rows = [
        [{"target": "t:1", "up": True, "usable": True, "circuit": "closed", "active": 2, "checks_passed": 0, "checks_failed": 0, "last_check": ""}],
        [{"target": "t:1", "up": True, "usable": True, "circuit": "open", "active": 3, "checks_passed": 0, "checks_failed": 0, "last_check": ""}],
    ]
    checked = [
        {"target": "t:1", "up": False, "usable": False, "circuit": "closed", "active": 0, "checks_passed": 7, "checks_failed": 3, "last_check": "connect_refused"},
        {"target": "t:2", "up": True, "usable": True, "circuit": "closed", "active": 0, "checks_passed": 5, "checks_failed": 0, "last_check": "ok"},
    ]
    [t1, t2] = with_checks(merge_targets(worker_rows), checked)
    assert t1 == {"target": "t:1", "up": False, "usable": False, "circuit": "open", "active": 5, "checks_passed": 7, "checks_failed": 3, "last_check": "connect_refused"}
    assert t2 == checked[1], "a target no worker answered for: the supervisor's row"


class UdpTarget:
    """A UDP target on a fixed 127.0.0.1 port, in a thread: PING gets PONG (its time noted
    in `probes`), anything else its name. Stopped, its port answers ICMP port unreachable."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.probes: list[float] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self._running = threading.Event()
        self._running.set()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._running.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            if data == b"PING":
                self.probes.append(time.monotonic())
                self.sock.sendto(b"PONG", peer)
            else:
                self.sock.sendto(self.name.encode(), peer)

    def stop(self) -> None:
        self._running.clear()
        self._thread.join(TIMEOUT)
        self.sock.close()


def test_udp_targets_are_checked_once_per_interval_and_every_worker_follows(daemon: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    """A UDP route with workers = 2: the supervisor's datagram checks, once per interval for
    both workers; a target that stops (ICMP unreachable) gets no new session from either."""
    a, b = UdpTarget("a"), UdpTarget("b")
    try:
        text = routes(check=CHECK).replace("targets = []", f'targets = ["{a.address}", "{b.address}"]\nprotocol = "udp"\nresponses = 1')
        control = tmp_path / "control.sock"
        d = daemon(text, "--control", str(control), ready=False)
        supervisor_ready(d)
        wait_until(lambda: len(a.probes) >= 8)
        probes = a.probes[:8]
        assert probes[-1] - probes[0] >= 7 * INTERVAL * 0.8, "one checker, not one per worker"

        def flows(count: int = CLIENTS) -> tuple[list[bytes], list[dict[str, Any]]]:
            """`count` flows, each its own client socket: the target's name each got back."""
            before = len(d.access_records())
            replies = []
            for _ in range(count):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(TIMEOUT)
                    sock.sendto(b"hi", d.address("r"))
                    replies.append(sock.recv(64))
            wait_until(lambda: len(d.access_records()) >= before + count)
            return replies, d.access_records()[before:]

        replies, records = flows()
        assert set(replies) == {b"a", b"b"}
        b.stop()
        wait_until(lambda: not target_rows(control)[b.address]["up"])
        assert target_rows(control)[b.address]["last_check"].startswith("connect_refused")
        followed(d, b, "down")
        replies, records = flows()
        assert replies == [b"a"] * CLIENTS, "no worker starts a session with the target that is down"
        assert {r["id"] // ID_SPAN for r in records} == {1, 2}, "both workers served"
        assert {r["reason"] for r in records} == {"normal"}
    finally:
        a.stop()
        with contextlib.suppress(OSError, RuntimeError):
            b.stop()
