"""`triofwd serve` with workers = 2: a supervisor and two worker processes, as an operator sees them.

The daemon is the real process tree. Workers are told apart by the ids of their connections
(worker N numbers its connections from N * ID_SPAN + 1) and by the `worker` field of their
log lines; the supervisor's lines have none.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
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
from tests.conftest import Daemon, roundtrip, run_triofwd, split, threaded_echo
from triofwd._config import worker_count
from triofwd._reuseport import steering_program
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


# -- the real daemon ---------------------------------------------------------------------


def test_both_workers_serve_and_the_supervisor_shows_them_all(daemon: Callable[..., Daemon], echo_target: str, tmp_path: pathlib.Path) -> None:
    control = tmp_path / "control.sock"
    d = daemon(routes(echo_target), "--control", str(control), "--metrics", "127.0.0.1:0", ready=False)
    ready = supervisor_ready(d)
    assert ready["workers"] == 2 and len(ready["pids"]) == 2
    address = d.address("echo")
    with held(address, 20) as conns:
        rows = ask(control, "connections")
        assert len(rows) == 20
        assert len({row["id"] for row in rows}) == 20
        assert {row["worker"] for row in rows} == {1, 2}, "both workers serve"
        assert all(row["id"] // ID_SPAN == row["worker"] for row in rows)
        assert ask(control, "stats")["active"] == 20
        # kill reaches the right worker: one connection of each
        by_port = {sock.getsockname()[1]: sock for sock in conns}
        for number in (1, 2):
            row = next(r for r in rows if r["worker"] == number)
            assert ask(control, "kill", id=row["id"])["id"] == row["id"]
            assert ended(by_port[int(row["client"].rpartition(":")[2])])
        wait_until(lambda: len(ask(control, "connections")) == 18)
        with pytest.raises(triofwd.ControlError, match="no connection"):
            ask(control, "kill", id=3 * ID_SPAN + 1)
    wait_until(lambda: ask(control, "stats")["active"] == 0)
    stats = ask(control, "stats")
    assert stats["routes"]["echo"]["total"] == 20
    assert stats["terminations"] == {"killed": 2, "normal": 18}
    assert stats["workers"]["count"] == 2
    metrics_at = logged(d, "metrics at")[0]["metrics"]
    text = urllib.request.urlopen(f"http://{metrics_at}/metrics", timeout=TIMEOUT).read().decode()
    assert 'triofwd_connections_total{route="echo"} 20' in text
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


def test_sigusr2_upgrades_without_refusing_a_connection(daemon: Callable[..., Daemon], echo_target: str, tmp_path: pathlib.Path) -> None:
    control = tmp_path / "control.sock"
    d = daemon(routes(echo_target).replace('shutdown_grace = "1s"', 'shutdown_grace = "20s"'), "--control", str(control), ready=False)
    old = supervisor_ready(d)
    address = d.address("echo")
    outcomes: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                roundtrip(address).close()
                outcomes.append("ok")
            except (OSError, AssertionError) as exc:
                outcomes.append(type(exc).__name__)

    new_pid = 0
    thread = threading.Thread(target=loop, daemon=True)
    try:
        with held(address, 10) as long_ones:
            thread.start()
            wait_until(lambda: len(outcomes) >= 50)
            d.signal(signal.SIGUSR2)
            new = logged(d, "ready", count=2, worker=None)[-1]
            new_pid = new["pid"]
            assert new_pid != old["pid"] and new["listeners"] == old["listeners"]
            logged(d, "shutting down", count=2)  # the old generation's two workers
            for sock in long_ones:  # the old generation drains: its connections go on
                sock.sendall(b"still")
                assert sock.recv(5, socket.MSG_WAITALL) == b"still"
            served = len(outcomes)
            wait_until(lambda: len(outcomes) >= served + 50)
        assert d.wait(TIMEOUT) == 0, "the old supervisor exits once its connections are done"
        wait_until(lambda: all(gone(pid) for pid in old["pids"]))
        assert not gone(new_pid), "one supervisor left: the new one"
        assert ask(control, "stats")["workers"]["count"] == 2, "the control socket is the new generation's"
        served = len(outcomes)
        wait_until(lambda: len(outcomes) >= served + 50)
    finally:
        stop.set()
        thread.join(TIMEOUT)
        if new_pid:
            os.kill(new_pid, signal.SIGTERM)
            wait_until(lambda: gone(new_pid))
    assert set(outcomes) == {"ok"}, f"{len(outcomes)} connections: {[o for o in outcomes if o != 'ok'][:5]}"


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


def test_sigkill_of_the_supervisor_leaves_no_process_behind(daemon: Callable[..., Daemon], echo_target: str) -> None:
    d = daemon(routes(echo_target), ready=False)
    pids = supervisor_ready(d)["pids"]
    address = d.address("echo")
    d.signal(signal.SIGKILL)
    d.wait(TIMEOUT)
    wait_until(lambda: all(gone(pid) for pid in pids))
    assert refused(address)


def test_access_log_lines_of_both_workers_are_all_whole(daemon: Callable[..., Daemon], echo_target: str) -> None:
    d = daemon(routes(echo_target), ready=False)
    supervisor_ready(d)
    host, port = d.address("echo")
    total = 3000

    async def clients() -> None:
        async def one() -> None:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"

        limiter = trio.CapacityLimiter(32)

        async def limited() -> None:
            async with limiter:
                await one()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(total):
                    nursery.start_soon(limited)

    trio.run(clients)
    wait_until(lambda: len(d.access_records()) >= total, timeout=60)
    lines = d.access_log.read_text().splitlines()
    assert len(lines) == total
    records = [json.loads(line) for line in lines]  # every line parses: none interleaved
    assert {r["id"] // ID_SPAN for r in records} == {1, 2}
    assert len({r["id"] for r in records}) == total


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
