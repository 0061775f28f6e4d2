"""`triofwd serve` with workers = 2: a supervisor and two worker processes, as an operator sees them.

The daemon is the real process tree. Workers are told apart by the ids of their connections
(worker N numbers its connections from N * ID_SPAN + 1) and by the `worker` field of their
log lines; the supervisor's lines have none.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import select
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

import triofwd
from tests.conftest import Daemon, echo_process, roundtrip, run_triofwd, split, threaded_echo
from triofwd import _reuseport as reuseport
from triofwd._addresses import format_address
from triofwd._config import worker_count
from triofwd._reuseport import SKF_NET_OFF, Instruction, bind_group, steer, steered_keys, steering_program
from triofwd._table import compile_table
from triofwd._worker import ID_SPAN, share
from triofwd.control.workers import merge_stats, merge_targets

TIMEOUT = 20.0


def routes(target: str, *extra: str, settings: tuple[str, ...] = ()) -> str:
    return "\n".join([
        "[settings]",
        "workers = 2",
        'shutdown_grace = "1s"',
        *settings,
        "[[routes]]",
        'name = "echo"',
        "ports = [0]",
        'bind = "127.0.0.1"',
        f'targets = ["{target}"]',
        *extra,
    ])  # fmt: skip


def supervisor_ready(d: Daemon, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The supervisor's `ready` line (the workers' have a `worker` field), once every worker is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in d.logs():
            if entry.get("msg") == "ready" and "worker" not in entry:
                d.listeners = entry["listeners"]
                return entry
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited {d.proc.returncode}: {d.stderr_path.read_text()}")
        time.sleep(0.02)
    raise AssertionError(f"the supervisor was not ready within {timeout}s: {d.stderr_path.read_text()}")


ANY = object()


def logged(d: Daemon, msg: str, count: int = 1, timeout: float = TIMEOUT, worker: Any = ANY) -> list[dict[str, Any]]:
    """Wait for `count` log lines starting with `msg`: of any process, of worker N, or (worker=None) the supervisor's."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in d.logs() if e.get("msg", "").startswith(msg) and (worker is ANY or e.get("worker") == worker)]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} {msg!r} lines (worker {worker}) within {timeout}s: {d.stderr_path.read_text()}")
        time.sleep(0.02)


def ended(sock: socket.socket) -> bool:
    """The daemon closed the connection (EOF or reset)."""
    sock.settimeout(TIMEOUT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def ask(path: pathlib.Path, cmd: str, **args: Any) -> Any:
    async def run() -> Any:
        with trio.fail_after(TIMEOUT):
            async with triofwd.open_control(path) as client:
                return await client.request(cmd, **args)

    return trio.run(run)


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def refused(address: tuple[str, int]) -> bool:
    """Nothing listens at `address` any more."""
    try:
        socket.create_connection(address, timeout=TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def echo_target() -> Iterator[str]:
    with threaded_echo() as target:
        yield target


@contextlib.contextmanager
def held(address: tuple[str, int], count: int) -> Iterator[list[socket.socket]]:
    conns = []
    try:
        for _ in range(count):
            conns.append(roundtrip(address))
        yield conns
    finally:
        for sock in conns:
            sock.close()


@pytest.fixture
def udp_echo() -> Iterator[str]:
    """A UDP echo server in a thread on 127.0.0.1: "127.0.0.1:port"."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                data, peer = sock.recvfrom(65536)
                sock.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield format_address(sock.getsockname())
    finally:
        stop.set()
        thread.join(TIMEOUT)
        sock.close()


def udp_client(host: str) -> socket.socket:
    """A client flow: a UDP socket on `host` with a port of its own."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(TIMEOUT)
    return sock


def udp_exchange(sock: socket.socket, address: tuple[str, int]) -> None:
    """One datagram through the daemon and its echo back: the flow's own address as the
    payload, so a reply that reached another client would show."""
    payload = format_address(sock.getsockname()).encode()
    sock.sendto(payload, address)
    assert sock.recv(65536) == payload


def udp_replies(socks: list[socket.socket], count: int, quiet: float = 0.5) -> list[socket.socket]:
    """The sockets that got a reply: wait for `count` of them, then `quiet` seconds for any more."""
    answered: list[socket.socket] = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        waiting = [s for s in socks if s not in answered]
        if len(answered) >= count:
            deadline = min(deadline, time.monotonic() + quiet)
        ready, _, _ = select.select(waiting, [], [], max(0.0, min(0.05, deadline - time.monotonic())))
        for sock in ready:
            sock.recv(65536)
            answered.append(sock)
    return answered


class ConnectionLoop:
    """`total` short connections (connect, one byte, its echo, close) from `threads` threads,
    each outcome recorded: "ok" or the error. A connection numbered at or past a gate's index
    waits for that gate's event: the loop spans what the test does meanwhile, however fast
    the machine is."""

    def __init__(self, address: tuple[str, int], total: int, threads: int = 16, gates: dict[int, threading.Event] | None = None) -> None:
        self.address = address
        self.total = total
        self.gates = gates or {}
        self.outcomes: list[str] = []
        self.started = 0
        self.stopped = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self.stopped or self.started == self.total:
                    return
                number, self.started = self.started, self.started + 1
            for index, gate in self.gates.items():
                if number >= index:
                    gate.wait(TIMEOUT * 3)
            try:
                with socket.create_connection(self.address, timeout=TIMEOUT) as sock:
                    sock.sendall(b"x")
                    outcome = "ok" if sock.recv(1) == b"x" else "eof"
            except OSError as exc:
                outcome = type(exc).__name__
            self.outcomes.append(outcome)

    def join(self, timeout: float) -> None:
        """Wait for every connection; stop the loop (and fail) when it takes longer."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.stop()
        assert len(self.outcomes) == self.total, f"{len(self.outcomes)} of {self.total} connections within {timeout}s"

    def stop(self) -> None:
        self.stopped = True
        for gate in self.gates.values():
            gate.set()


def processes_of(routefile: pathlib.Path) -> set[int]:
    """The live processes (zombies left out) started on this route file: supervisors and workers."""
    found = set()
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(routefile).encode() in (entry / "cmdline").read_bytes().split(b"\0") and not gone(int(entry.name)):
                    found.add(int(entry.name))
    return found


# -- the real daemon ---------------------------------------------------------------------


def test_both_workers_serve_and_the_supervisor_shows_them_all(daemon: Callable[..., Daemon], echo_target: str, tmp_path: pathlib.Path) -> None:
    control = tmp_path / "control.sock"
    d = daemon(routes(echo_target), "--control", str(control), "--metrics", "127.0.0.1:0", ready=False)
    ready = supervisor_ready(d)
    assert ready["workers"] == 2 and len(ready["pids"]) == 2
    address = d.address("echo")
    with held(address, 64) as conns:
        rows = ask(control, "connections")
        assert len(rows) == 64
        assert len({row["id"] for row in rows}) == 64
        # Spread by the kernel's hash of each connection's ports: no worker below a third of
        # its fair share (32). A binomial(64, 1/2) falls below 11 once in about 10^8 runs.
        shares = collections.Counter(row["worker"] for row in rows)
        assert set(shares) == {1, 2} and min(shares.values()) >= 64 // 2 // 3, shares
        assert all(row["id"] // ID_SPAN == row["worker"] for row in rows)
        assert ask(control, "stats")["active"] == 64
        # kill reaches the right worker: one connection of each
        by_port = {sock.getsockname()[1]: sock for sock in conns}
        for number in (1, 2):
            row = next(r for r in rows if r["worker"] == number)
            assert ask(control, "kill", id=row["id"])["id"] == row["id"]
            assert ended(by_port[int(row["client"].rpartition(":")[2])])
        wait_until(lambda: len(ask(control, "connections")) == 62)
        with pytest.raises(triofwd.ControlError, match="no connection"):
            ask(control, "kill", id=3 * ID_SPAN + 1)
    wait_until(lambda: ask(control, "stats")["active"] == 0)
    stats = ask(control, "stats")
    assert stats["routes"]["echo"]["total"] == 64
    assert stats["terminations"] == {"killed": 2, "normal": 62}
    assert stats["workers"]["count"] == 2
    metrics_at = logged(d, "metrics at")[0]["metrics"]
    text = urllib.request.urlopen(f"http://{metrics_at}/metrics", timeout=TIMEOUT).read().decode()
    assert 'triofwd_connections_total{route="echo"} 64' in text
    assert "triofwd_workers 2" in text
    assert "triofwd_worker_restarts_total 0" in text
    status = json.loads(urllib.request.urlopen(f"http://{metrics_at}/status.json", timeout=TIMEOUT).read())
    assert status["routes"][0]["name"] == "echo"
    routes_view = ask(control, "routes")
    assert routes_view[0]["listening"] == d.listeners["echo"]
    assert routes_view[0]["target_state"][0]["target"] == echo_target


def test_watch_merges_the_events_of_every_worker(daemon: Callable[..., Daemon], echo_target: str, tmp_path: pathlib.Path) -> None:
    control = tmp_path / "control.sock"
    d = daemon(routes(echo_target), "--control", str(control), ready=False)
    supervisor_ready(d)
    address = d.address("echo")

    async def run() -> list[dict[str, Any]]:
        with trio.fail_after(TIMEOUT):
            async with triofwd.open_control(control) as client:
                request_id = await client.send("watch", {})
                assert (await client.receive()) == {"id": request_id, "ok": True, "result": {"watching": True}}
                for _ in range(20):
                    await trio.to_thread.run_sync(lambda: roundtrip(address).close())
                events: list[dict[str, Any]] = []
                while len([e for e in events if e["event"] == "close"]) < 20:
                    events.append(await client.receive())
                return events

    events = trio.run(run)
    assert len([e for e in events if e["event"] == "open"]) == 20
    assert {e["id"] // ID_SPAN for e in events} == {1, 2}


def test_a_per_ip_limit_is_exact_across_workers(daemon: Callable[..., Daemon], echo_target: str, tmp_path: pathlib.Path) -> None:
    control = tmp_path / "control.sock"
    d = daemon(routes(echo_target, "max_connections_per_ip = 3"), "--control", str(control), ready=False)
    supervisor_ready(d)
    served, refused = [], 0
    try:
        for _ in range(10):
            sock = socket.create_connection(d.address("echo"), timeout=TIMEOUT)
            sock.sendall(b"x")
            try:
                reply = sock.recv(1)
            except ConnectionResetError:
                reply = b""
            if reply == b"x":
                served.append(sock)
            else:
                refused += 1
                sock.close()
        assert (len(served), refused) == (3, 7)
        assert len({row["worker"] for row in ask(control, "connections")}) == 1, "one client, one worker"
        # other clients: each one's connections meet in one worker, and the workers share the clients
        for last in (2, 3, 4, 5):
            for _ in range(3):
                sock = socket.create_connection(d.address("echo"), timeout=TIMEOUT, source_address=(f"127.0.0.{last}", 0))
                served.append(sock)
                sock.sendall(b"y")
                assert sock.recv(1) == b"y"
        workers_of: dict[str, set[int]] = {}
        for row in ask(control, "connections"):
            workers_of.setdefault(row["client"].rpartition(":")[0], set()).add(row["worker"])
        assert len(workers_of) == 5 and all(len(w) == 1 for w in workers_of.values()), workers_of
        assert set().union(*workers_of.values()) == {1, 2}
    finally:
        for sock in served:
            sock.close()
    wait_until(lambda: ask(control, "stats")["terminations"].get("ip_limit") == 7)


def test_a_killed_worker_is_replaced_and_no_connection_is_refused(daemon: Callable[..., Daemon], echo_target: str, tmp_path: pathlib.Path) -> None:
    control = tmp_path / "control.sock"
    d = daemon(routes(echo_target), "--control", str(control), ready=False)
    pids = supervisor_ready(d)["pids"]
    address = d.address("echo")
    outcomes: list[tuple[float, str]] = []  # (when the connection began, "ok" or the error)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            began = time.monotonic()
            try:
                roundtrip(address).close()
                outcomes.append((began, "ok"))
            except (OSError, AssertionError) as exc:  # AssertionError: closed before the echo
                outcomes.append((began, type(exc).__name__))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(outcomes) >= 50)
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        logged(d, "worker 1 exited", worker=None)
        logged(d, "ready", count=2, worker=1)  # its replacement
        served_before = len(outcomes)
        wait_until(lambda: len(outcomes) >= served_before + 50)
    finally:
        stop.set()
        thread.join(TIMEOUT)
    wait_until(lambda: gone(pids[0]))
    assert not [o for o in outcomes if o[1] == "ConnectionRefusedError"]
    # a connection the killed worker held is reset; every one that began after it died is served
    assert not [o for o in outcomes if o[0] > killed_at + 0.05 and o[1] != "ok"]
    assert ask(control, "stats")["workers"]["restarts"] == 1
    with held(address, 20):
        assert {row["worker"] for row in ask(control, "connections")} == {1, 2}, "the replacement serves"


def test_sighup_adds_a_route_every_worker_serves_and_a_bad_file_changes_nothing(
    daemon: Callable[..., Daemon], echo_target: str, tmp_path: pathlib.Path
) -> None:
    control = tmp_path / "control.sock"
    d = daemon(routes(echo_target), "--control", str(control), ready=False)
    supervisor_ready(d)
    d.routefile.write_text(routes(echo_target, "[[routes]]", 'name = "more"', "ports = [0]", 'bind = "127.0.0.1"', f'targets = ["{echo_target}"]'))
    d.signal(signal.SIGHUP)
    logged(d, "reloaded", count=3)  # the supervisor and both workers
    more = next(r for r in ask(control, "routes") if r["name"] == "more")
    address = split(more["listening"][0])
    for _ in range(30):
        roundtrip(address).close()
    wait_until(lambda: len([r for r in d.access_records() if r["route"] == "more"]) == 30)
    assert {r["id"] // ID_SPAN for r in d.access_records() if r["route"] == "more"} == {1, 2}
    before = ask(control, "routes")
    d.routefile.write_text(routes(echo_target, "ports = [70000]"))
    d.signal(signal.SIGHUP)
    logged(d, "reload failed", worker=None)
    assert ask(control, "routes") == before
    assert not [e for e in d.logs() if e.get("msg", "").startswith("reload failed") and "worker" in e], "no worker saw the bad file"
    roundtrip(address).close()
    roundtrip(d.address("echo")).close()


# 50 long connections, each moving LONG_CHUNKS chunks of LONG_CHUNK bytes: one before the
# upgrade, the others while the old generation drains, then a half-close and the rest.
LONG_CONNECTIONS = 50
LONG_CHUNK = 16 * 1024
LONG_CHUNKS = 4
SHORT_CONNECTIONS = 5000


def test_sigusr2_upgrade_under_5000_short_connections_and_50_long_ones(daemon: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    """A client loop of 5,000 short connections and 50 long ones through an upgrade: none
    refused or reset, every long one finishes with all its bytes, and then one supervisor
    is left (with its workers), the old generation gone."""
    control = tmp_path / "control.sock"
    with echo_process() as target:
        d = daemon(routes(target).replace('shutdown_grace = "1s"', 'shutdown_grace = "20s"'), "--control", str(control), ready=False)
        old = supervisor_ready(d)
        address = d.address("echo")
        long_ones = [roundtrip(address, b"a" * LONG_CHUNK) for _ in range(LONG_CONNECTIONS)]
        # Connections 2,500 and on wait for the new generation, 4,000 and on for the old one
        # to be gone: the loop runs before, during and after each step.
        new_ready, old_gone = threading.Event(), threading.Event()
        loop = ConnectionLoop(address, SHORT_CONNECTIONS, gates={2500: new_ready, 4000: old_gone})
        new_pid = 0
        try:
            wait_until(lambda: len(loop.outcomes) >= 500)
            d.signal(signal.SIGUSR2)
            new = logged(d, "ready", count=2, worker=None)[-1]
            new_pid = new["pid"]
            assert new_pid != old["pid"] and new["listeners"] == old["listeners"]
            new_ready.set()
            logged(d, "shutting down", count=2)  # the old generation's two workers drain
            for sock in long_ones:  # ... and their connections go on
                for _ in range(LONG_CHUNKS - 2):
                    sock.sendall(b"b" * LONG_CHUNK)
                    assert sock.recv(LONG_CHUNK, socket.MSG_WAITALL) == b"b" * LONG_CHUNK
                sock.sendall(b"c" * LONG_CHUNK)
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(LONG_CHUNK, socket.MSG_WAITALL) == b"c" * LONG_CHUNK
                assert sock.recv(1) == b"", "closed cleanly once the echo is whole"
                sock.close()
            assert d.wait(TIMEOUT) == 0, "the old supervisor exits once its connections are done"
            wait_until(lambda: all(gone(pid) for pid in old["pids"]))
            old_gone.set()
            loop.join(120)
            assert processes_of(d.routefile) == {new_pid, *new["pids"]}, "one supervisor left, with its workers"
            assert ask(control, "stats")["workers"]["count"] == 2, "the control socket is the new generation's"
        finally:
            loop.stop()
            for sock in long_ones:
                sock.close()
            if new_pid:
                os.kill(new_pid, signal.SIGTERM)
                wait_until(lambda: gone(new_pid))
    failures = [o for o in loop.outcomes if o != "ok"]
    assert not failures, f"{len(failures)} of {len(loop.outcomes)} connections failed: {failures[:5]}"
    long_records = [r for r in d.access_records() if r["bytes_in"] == LONG_CHUNK * LONG_CHUNKS]
    assert len(long_records) == LONG_CONNECTIONS
    assert all(r["reason"] == "normal" and r["bytes_out"] == LONG_CHUNK * LONG_CHUNKS for r in long_records)


def test_a_failed_upgrade_leaves_the_running_generation_serving(daemon: Callable[..., Daemon], echo_target: str, tmp_path: pathlib.Path) -> None:
    control = tmp_path / "control.sock"
    d = daemon(routes(echo_target), "--control", str(control), ready=False)
    old = supervisor_ready(d)
    d.routefile.write_text("[settings]\nworkers = 2\n[[routes]]\nports = [1]\n")  # the new generation cannot start
    d.signal(signal.SIGUSR2)
    logged(d, "upgrade failed", worker=None)
    assert d.proc.poll() is None
    roundtrip(d.address("echo")).close()
    assert ask(control, "stats")["workers"]["count"] == 2
    assert all(not gone(pid) for pid in old["pids"])


def test_sigterm_drains_every_worker_and_exits_0(daemon: Callable[..., Daemon], echo_target: str) -> None:
    text = routes(echo_target).replace('shutdown_grace = "1s"', 'shutdown_grace = "10s"')
    d = daemon(text, ready=False)
    pids = supervisor_ready(d)["pids"]
    with held(d.address("echo"), 8) as conns:
        d.signal(signal.SIGTERM)
        logged(d, "shutting down", count=2)  # both workers
        for sock in conns:  # still served while they drain
            sock.sendall(b"again")
            assert sock.recv(5, socket.MSG_WAITALL) == b"again"
        wait_until(lambda: refused(d.address("echo")))  # every copy of the listening sockets closed
    assert d.wait(TIMEOUT) == 0
    assert all(gone(pid) for pid in pids)


def test_sigkill_of_the_supervisor_leaves_no_process_behind(daemon: Callable[..., Daemon], echo_target: str, udp_echo: str) -> None:
    """The workers drain on their own (PDEATHSIG): a held connection ends `shutdown` after
    the grace, a UDP session too, and what a worker would tell its gone supervisor (its UDP
    socket closing) is dropped quietly, not a traceback that cuts the drain short."""
    dgram = ("[[routes]]", 'name = "dgram"', "ports = [0]", 'bind = "127.0.0.1"', f'targets = ["{udp_echo}"]', 'protocol = "udp"')
    d = daemon("\n".join([routes(echo_target), *dgram]), ready=False)
    pids = supervisor_ready(d)["pids"]
    address = d.address("echo")
    held_conn = roundtrip(address)
    session = udp_client("127.0.0.2")
    try:
        udp_exchange(session, d.address("dgram"))
        d.signal(signal.SIGKILL)
        d.wait(TIMEOUT)
        wait_until(lambda: all(gone(pid) for pid in pids))
        assert refused(address)
    finally:
        held_conn.close()
        session.close()
    reasons = {r["route"]: r["reason"] for r in d.access_records()}
    assert reasons == {"echo": "shutdown", "dgram": "shutdown"}, reasons
    stderr = d.stderr_path.read_text()
    assert "Traceback" not in stderr, stderr[stderr.find("Traceback") :]


def test_udp_flows_stay_in_one_worker_and_each_reply_reaches_its_client(daemon: Callable[..., Daemon], udp_echo: str, tmp_path: pathlib.Path) -> None:
    control = tmp_path / "control.sock"
    d = daemon(routes(udp_echo, 'protocol = "udp"'), "--control", str(control), ready=False)
    pids = supervisor_ready(d)["pids"]
    address = d.address("echo")
    clients = [udp_client(f"127.0.0.{last}") for last in range(2, 21) for _ in range(2)]  # 19 addresses, two flows each
    try:
        for sock in clients:
            udp_exchange(sock, address)
        for sock in clients:  # a flow's later datagrams meet its session: no new one
            udp_exchange(sock, address)
        rows = ask(control, "connections")
        assert len(rows) == len(clients) and {row["protocol"] for row in rows} == {"udp"}
        worker_of = {row["client"]: row["worker"] for row in rows}
        assert len(worker_of) == len(clients), "one session per flow"
        assert set(worker_of.values()) == {1, 2}, "both workers serve"
        # kill reaches the worker that holds the session
        row = next(r for r in rows if r["worker"] == 2)
        assert ask(control, "kill", id=row["id"])["id"] == row["id"]
        wait_until(lambda: any(r["id"] == row["id"] and r["reason"] == "killed" for r in d.access_records()))
        assert row["id"] not in {r["id"] for r in ask(control, "connections")}
        # A worker killed: its replacement reads the same sockets. A datagram sent while no
        # worker reads waits in the socket's buffer and is answered by the replacement.
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: gone(pids[0]))
        orphans = [s for s in clients if worker_of[format_address(s.getsockname())] == 1]
        for sock in orphans:
            sock.sendto(format_address(sock.getsockname()).encode(), address)
        for sock in orphans:
            assert sock.recv(65536) == format_address(sock.getsockname()).encode()
        logged(d, "ready", count=2, worker=1)
        for sock in clients:
            udp_exchange(sock, address)
        assert {r["worker"] for r in ask(control, "connections")} == {1, 2}
    finally:
        for sock in clients:
            sock.close()


def test_a_udp_per_ip_limit_is_exact_across_workers(daemon: Callable[..., Daemon], udp_echo: str, tmp_path: pathlib.Path) -> None:
    """10 flows from one address, max_connections_per_ip = 3: exactly 3 sessions, all in one
    worker (the kernel's own hash would spread the flows, and each worker allow 3)."""
    control = tmp_path / "control.sock"
    d = daemon(routes(udp_echo, 'protocol = "udp"', "max_connections_per_ip = 3"), "--control", str(control), ready=False)
    supervisor_ready(d)
    address = d.address("echo")

    def ten_flows_from(host: str) -> None:
        flows = [udp_client(host) for _ in range(10)]
        try:
            for sock in flows:
                sock.sendto(b"x", address)
            assert len(udp_replies(flows, 3)) == 3
            rows = [r for r in ask(control, "connections") if r["client"].startswith(host + ":")]
            assert len(rows) == 3 and len({r["worker"] for r in rows}) == 1, rows
            wait_until(lambda: len([r for r in d.access_records() if r["client"].startswith(host + ":") and r["reason"] == "ip_limit"]) == 7)
        finally:
            for sock in flows:
                sock.close()

    ten_flows_from("127.0.0.2")
    ten_flows_from("127.0.0.3")


def test_a_reload_listening_again_on_a_dropped_udp_port_takes_the_same_sockets(daemon: Callable[..., Daemon], udp_echo: str, tmp_path: pathlib.Path) -> None:
    """A UDP route dropped and added back while its sessions live: the workers still hold the
    port's sockets, and the supervisor hands the same ones out again. A group bound anew
    would join theirs in the kernel, and the program would steer flows to sockets no worker
    reads."""
    control = tmp_path / "control.sock"
    other = ("[[routes]]", 'name = "other"', "ports = [0]", 'bind = "127.0.0.1"', 'targets = ["127.0.0.1:1"]')
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a port of its own, not 0: the route's key stays one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A per-IP limit: the group is steered by client address, so the test knows each client's worker.
    steered = routes(udp_echo, 'protocol = "udp"', "max_connections_per_ip = 100")
    with_udp = "\n".join([steered.replace("ports = [0]", f"ports = [{port}]"), *other])
    d = daemon(with_udp, "--control", str(control), ready=False)
    supervisor_ready(d)
    address = d.address("echo")
    # A session in worker 1 only: it keeps worker 1's socket open, the first of its group.
    first = next(host for host in (f"127.0.0.{last}" for last in range(2, 30)) if steered_to(host) == 0)
    clients = [udp_client(first)]
    try:
        udp_exchange(clients[0], address)
        assert [r["worker"] for r in ask(control, "connections")] == [1]
        without_udp = with_udp.split("[[routes]]")[0] + "\n".join(other)
        d.routefile.write_text(without_udp)
        d.signal(signal.SIGHUP)
        logged(d, "reloaded", count=3)
        d.routefile.write_text(with_udp)
        d.signal(signal.SIGHUP)
        logged(d, "reloaded", count=6)
        fresh = [udp_client(f"127.0.0.{last}") for last in range(2, 21)]
        clients += fresh
        for sock in fresh:
            udp_exchange(sock, address)
        assert {r["worker"] for r in ask(control, "connections")} == {1, 2}
        # Dropped again: once its last session has ended in every worker, the port is free.
        d.routefile.write_text(without_udp)
        d.signal(signal.SIGHUP)
        logged(d, "reloaded", count=9)
        assert not bindable(port)
        for row in ask(control, "connections"):
            ask(control, "kill", id=row["id"])
        wait_until(lambda: bindable(port))
    finally:
        for sock in clients:
            sock.close()


def bindable(port: int) -> bool:
    """A UDP socket of this process (no SO_REUSEPORT) can bind 127.0.0.1:port: no one holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_sigusr2_hands_the_udp_sockets_over(daemon: Callable[..., Daemon], udp_echo: str, tmp_path: pathlib.Path) -> None:
    """After an upgrade every datagram reaches the new generation: the old one's workers, still
    draining their sessions, no longer read the sockets they share with it (or they would take,
    and drop, datagrams of new flows)."""
    control = tmp_path / "control.sock"
    text = routes(udp_echo, 'protocol = "udp"')
    d = daemon(text.replace('shutdown_grace = "1s"', 'shutdown_grace = "20s"'), "--control", str(control), ready=False)
    old = supervisor_ready(d)
    address = d.address("echo")
    clients = [udp_client(f"127.0.0.{last}") for last in range(2, 12)]
    new_pid = 0
    try:
        for sock in clients:  # sessions in the old generation: they keep it draining
            udp_exchange(sock, address)
        d.routefile.write_text(text)  # the new generation's grace: 1s
        d.signal(signal.SIGUSR2)
        new = logged(d, "ready", count=2, worker=None)[-1]
        new_pid = new["pid"]
        logged(d, "shutting down", count=2)
        fresh = [udp_client(f"127.0.0.{last}") for last in range(2, 12) for _ in range(4)]
        clients += fresh
        for sock in fresh:
            udp_exchange(sock, address)
        rows = ask(control, "connections")  # the new generation's
        assert {r["client"] for r in rows} >= {format_address(s.getsockname()) for s in fresh}
        assert not gone(old["pids"][0]) and not gone(old["pids"][1]), "the old workers are still draining"
        d.signal(signal.SIGTERM)  # the second stop: the old generation's sessions end at once
        assert d.wait(TIMEOUT) == 0
        wait_until(lambda: all(gone(pid) for pid in old["pids"]))
        for sock in clients:  # the old sessions' clients too: the new generation answers
            udp_exchange(sock, address)
    finally:
        for sock in clients:
            sock.close()
        if new_pid:
            os.kill(new_pid, signal.SIGTERM)
            wait_until(lambda: gone(new_pid))


def test_access_log_lines_all_parse_after_10000_connections(daemon: Callable[..., Daemon]) -> None:
    """Both workers append to one file: after 10,000 connections it has 10,000 lines, each
    whole (a line per write(), O_APPEND), none lost, none interleaved with another."""
    total = 10_000
    with echo_process() as target:
        d = daemon(routes(target), ready=False)
        supervisor_ready(d)
        loop = ConnectionLoop(d.address("echo"), total)
        loop.join(120)
        assert set(loop.outcomes) == {"ok"}
        wait_until(lambda: len(d.access_records()) >= total, timeout=60)
    lines = d.access_log.read_text().splitlines()
    assert len(lines) == total
    records = [json.loads(line) for line in lines]  # every line parses: none interleaved
    assert {r["id"] // ID_SPAN for r in records} == {1, 2}
    assert len({r["id"] for r in records}) == total
    assert {r["reason"] for r in records} == {"normal"}


# -- the parts, without processes ------------------------------------------------------------


def test_workers_auto_is_the_usable_cpus() -> None:
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3
    config = triofwd.Config(settings=triofwd.Settings(workers="auto"))
    assert config.settings.workers == "auto"


def test_a_bad_workers_value_is_an_error_with_its_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[settings]\nworkers = 0\n")
    with pytest.raises(triofwd.ConfigError, match=r"settings\.workers"):
        triofwd.load_config(path)


def test_max_connections_is_shared_out() -> None:
    table = compile_table(
        triofwd.Config(
            settings=triofwd.Settings(max_connections=10), routes=[triofwd.Route(name="r", ports=[1000], targets=["127.0.0.1:1"], max_connections=3)]
        )
    )
    parts = [share(table, n, 3) for n in (1, 2, 3)]
    assert [p.limits.max_connections for p in parts] == [4, 3, 3]
    assert [p.routes[0].limits.max_connections for p in parts] == [1, 1, 1]
    unlimited = compile_table(triofwd.Config(settings=triofwd.Settings(max_connections=0)))
    assert share(unlimited, 2, 2).limits.max_connections == 0  # off stays off


def test_the_steering_program_reads_the_source_address_and_picks_a_socket() -> None:
    v4 = steering_program(socket.AF_INET, 2)
    assert v4[0][3] == -0x100000 + 12  # the source address in the IPv4 header
    assert v4[-2] == (0x94, 0, 0, 2)  # modulo the sockets in the group
    assert v4[-1] == (0x16, 0, 0, 0)  # returned as the index
    v6 = steering_program(socket.AF_INET6, 4)
    assert [i[3] for i in v6 if i[0] == 0x20] == [-0x100000 + 8, -0x100000 + 12, -0x100000 + 16, -0x100000 + 20]


def run_program(program: list[Instruction], network_header: bytes) -> int:
    """What a steering program returns for a packet with this network header (the
    instructions steering_program uses, as the kernel runs them)."""
    a = x = 0
    for code, _, _, k in program:
        if code == reuseport.LD_W_ABS:
            a = int.from_bytes(network_header[k - SKF_NET_OFF : k - SKF_NET_OFF + 4], "big")
        elif code == reuseport.MISC_TAX:
            x = a
        elif code == reuseport.ALU_RSH_K:
            a >>= k
        elif code == reuseport.ALU_XOR_X:
            a ^= x
        elif code == reuseport.ALU_MOD_K:
            a %= k
        elif code == reuseport.RET_A:
            return a
    raise AssertionError("the program does not return")


def steered_to(host: str, count: int = 2) -> int:
    """The socket (worker - 1) the program picks for a client at this IPv4 address."""
    return run_program(steering_program(socket.AF_INET, count), bytes(12) + socket.inet_aton(host) + socket.inet_aton("127.0.0.1"))


@pytest.mark.parametrize("udp", [True, False], ids=["udp", "tcp"])
def test_the_kernel_steers_each_client_address_to_the_socket_the_program_names(udp: bool) -> None:
    """The program runs with the packet's data past the transport header, the TCP header or
    UDP's 8 bytes: its loads relative to the network header read the source address for
    both. Each datagram or connection, two from each of 19 addresses, reaches the socket
    the program (run here) names for its source address; both sockets get some."""
    group = bind_group(("127.0.0.1", 0, "/udp" if udp else ""), 2)
    picked = set()
    try:
        steer(group, True)
        for last in range(2, 21):
            host = f"127.0.0.{last}"
            expected = steered_to(host)
            picked.add(expected)
            for _ in range(2):
                if udp:
                    with udp_client(host) as client:
                        client.sendto(b"x", ("127.0.0.1", group.port))
                else:
                    client = socket.create_connection(("127.0.0.1", group.port), timeout=TIMEOUT, source_address=(host, 0))
                ready, _, _ = select.select(group.sockets, [], [], TIMEOUT)
                assert [group.sockets.index(s) for s in ready] == [expected], host
                if udp:
                    ready[0].recv(1)
                else:
                    ready[0].accept()[0].close()
                    client.close()
    finally:
        group.close()
    assert picked == {0, 1}


def test_udp_routes_run_with_workers_and_are_steered_by_client_address_only_with_a_per_ip_limit() -> None:
    table = compile_table(
        triofwd.Config(
            settings=triofwd.Settings(workers=2),
            routes=[
                triofwd.Route(name="dns", protocol="udp", ports=[5353], targets=["127.0.0.1:53"]),
                triofwd.Route(name="ntp", protocol="udp", ports=[5123], targets=["127.0.0.1:123"], max_connections_per_ip=3),
                triofwd.Route(name="web", ports=[8080], targets=["127.0.0.1:80"]),
            ],
        )
    )
    assert steered_keys(table) == {("0.0.0.0", 5123, "/udp")}, "the kernel's flow hash elsewhere, UDP as TCP"


def test_stats_of_workers_add_up() -> None:
    one = {"active": 1, "total": 5, "draining": False, "terminations": {"normal": 4},
           "routes": {"r": {"active": 1, "connect_time": {"buckets": {"0.001": 2, "+Inf": 4}, "count": 4, "sum": 0.5}}},
           "targets": {"r": [{"target": "a:1", "up": True, "circuit": "closed", "active": 1, "checks_passed": 3, "backoff_s": 1.0}]}}  # fmt: skip
    two = {"active": 2, "total": 7, "draining": False, "terminations": {"normal": 3, "killed": 2},
           "routes": {"r": {"active": 2, "connect_time": {"buckets": {"0.001": 1, "+Inf": 5}, "count": 5, "sum": 1.0}}},
           "targets": {"r": [{"target": "a:1", "up": False, "circuit": "open", "active": 2, "checks_passed": 1, "backoff_s": 2.0}]}}  # fmt: skip
    merged = merge_stats([one, two])
    assert merged["active"] == 3 and merged["total"] == 12
    assert merged["terminations"] == {"normal": 7, "killed": 2}
    assert merged["routes"]["r"]["connect_time"] == {"buckets": {"0.001": 3, "+Inf": 9}, "count": 9, "sum": 1.5}
    assert merged["targets"]["r"] == [{"target": "a:1", "up": False, "circuit": "open", "active": 3, "checks_passed": 4, "backoff_s": 2.0}]
    assert merge_targets([]) == []


def test_a_busy_port_stops_the_supervisor_before_any_worker_starts(tmp_path: pathlib.Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        path = tmp_path / "busy.toml"
        path.write_text(f'[settings]\nworkers = 2\n[[routes]]\nname = "x"\nports = [{port}]\nbind = "127.0.0.1"\ntargets = ["127.0.0.1:1"]\n')
        result = run_triofwd("serve", str(path))
    assert result.returncode == 2
    assert result.stderr == f"triofwd: cannot listen on 127.0.0.1:{port}: Address already in use\n"
