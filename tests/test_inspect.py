"""tools/inspect.py as a user runs it: a subprocess against the real daemon, `top` under a pseudo-terminal."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import REPO, roundtrip, threaded_echo
from triofwd.control import inspector

INSPECT = REPO / "tools" / "inspect.py"




ROUTES = """
[[routes]]
name = "echo"
ports = [0]
bind = "127.0.0.1"
targets = ["{target}"]

[[routes]]
name = "closed"
ports = [0]
bind = "127.0.0.1"
action = "reject"
"""


@pytest.fixture
def running(daemon: Callable[..., Any], tmp_path: pathlib.Path) -> Iterator[tuple[Any, pathlib.Path]]:
    """A daemon with a control socket, forwarding to an echo server."""
    with threaded_echo() as target:
        path = tmp_path / "c.sock"
        yield daemon(ROUTES.format(target=target), "--control", str(path)), path


def inspect(*args: str, env: dict[str, str] | None = None, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    # From another directory: the inspector must find its triofwd wherever it is started.
    return subprocess.run([sys.executable, str(INSPECT), *args], capture_output=True, text=True, timeout=20, env=env, cwd=cwd or pathlib.Path("/"))


def test_connections_stats_and_kill_for_people_and_for_scripts(running: tuple[Any, pathlib.Path]) -> None:
    d, path = running
    s = str(path)
    with roundtrip(d.address("echo"), b"x" * 2048) as client:
        port = client.getsockname()[1]
        table = inspect("-s", s, "connections")
        assert table.returncode == 0, table.stderr
        header, row = table.stdout.splitlines()
        assert header.split() == ["ID", "ROUTE", "CLIENT", "TARGET", "STATE", "AGE", "IDLE", "IN", "OUT"]
        assert row.split()[1:3] == ["echo", f"127.0.0.1:{port}"] and "2.0 KiB" in row
        [conn] = json.loads(inspect("connections", "--json", "-s", s).stdout)
        assert conn["client"] == f"127.0.0.1:{port}" and conn["bytes_in"] == 2048
        assert inspect("-s", s, "connections", "--route", "closed").stdout == "no connections\n"
        assert json.loads(inspect("-s", s, "connections", "--client", f"127.0.0.1:{port}", "--json").stdout)[0]["id"] == conn["id"]

        stats = inspect("-s", s, "stats")
        assert stats.returncode == 0 and stats.stdout.startswith("active 1  total 1  accept errors 0  in 2.0 KiB  out 2.0 KiB\n")
        assert json.loads(inspect("-s", s, "stats", "--json").stdout)["routes"]["echo"]["active"] == 1
        routes = inspect("-s", s, "routes").stdout.splitlines()
        assert routes[0].split() == ["NAME", "ACTION", "LISTENING", "TARGETS", "ACTIVE"] and routes[1].split()[:2] == ["echo", "forward"]

        killed = inspect("-s", s, "kill", str(conn["id"]))
        assert killed.returncode == 0 and killed.stdout == f"killed connection {conn['id']} (route echo, client 127.0.0.1:{port})\n"
        assert client.recv(1) == b""
    again = inspect("-s", s, "kill", str(conn["id"]))
    assert (again.returncode, again.stdout, again.stderr) == (1, "", f"inspect: no connection {conn['id']}\n")
    stats = json.loads(inspect("-s", s, "stats", "--json").stdout)
    assert stats["terminations"] == {"killed": 1}
    assert "killed 1" in inspect("-s", s, "stats").stdout


def test_reload_drain_metrics_and_the_default_socket(running: tuple[Any, pathlib.Path]) -> None:
    d, path = running
    env = {**os.environ, "TRIOFWD_CONTROL": str(path)}
    assert inspect("reload", env=env).stdout == "reloaded: no changes\n"
    d.routefile.write_text(d.routefile.read_text().replace('name = "closed"', 'name = "shut"'))
    assert inspect("reload", env=env).stdout == "reloaded: added shut; removed closed; changed -\n"
    assert json.loads(inspect("reload", "--json", env=env).stdout) == {"added": [], "removed": [], "changed": []}
    metrics = inspect("metrics", env=env)
    assert metrics.stdout.startswith("# HELP triofwd_") and 'triofwd_connections_active{route="shut"} 0\n' in metrics.stdout
    assert inspect("drain", env=env).stdout == "draining: listeners closed, 0 connections still open\n"
    assert "DRAINING" in inspect("stats", env=env).stdout


def test_an_unusable_socket_is_exit_2_with_one_line(tmp_path: pathlib.Path) -> None:
    missing = inspect("-s", str(tmp_path / "none.sock"), "stats")
    assert (missing.returncode, missing.stderr) == (2, f"inspect: cannot connect to {tmp_path / 'none.sock'}: No such file or directory\n")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    refused = inspect("-s", str(stale), "stats")
    assert (refused.returncode, refused.stderr) == (2, f"inspect: cannot connect to {stale}: Connection refused\n")


def open_then_close(events: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The first connection seen opening and then closing, if the events hold one."""
    opened = {}
    for event in events:
        if event["event"] == "open":
            opened[event["id"]] = event
        elif event["id"] in opened:
            return opened[event["id"]], event
    return None


def test_watch_prints_events_as_json_lines_until_interrupted(running: tuple[Any, pathlib.Path]) -> None:
    d, path = running
    watch = subprocess.Popen([sys.executable, str(INSPECT), "-s", str(path), "watch", "--json"], stdout=subprocess.PIPE)
    assert watch.stdout is not None
    out = watch.stdout.fileno()
    seen = b""
    try:
        deadline = time.monotonic() + 10
        # The watcher subscribes on its own schedule: make connections until it has
        # reported one from its open to its close.
        while not open_then_close([json.loads(line) for line in seen.splitlines(keepends=True) if line.endswith(b"\n")]):
            assert time.monotonic() < deadline and watch.poll() is None, seen
            roundtrip(d.address("echo")).close()
            if select.select([out], [], [], 0.1)[0]:
                seen += os.read(out, 65536)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0  # Ctrl-C is how a watch ends: not an error
        seen += watch.stdout.read()
    finally:
        watch.kill()
        watch.wait(10)
        watch.stdout.close()
    found = open_then_close([json.loads(line) for line in seen.decode().splitlines()])
    assert found
    opened, closed = found
    assert closed["event"] == "close" and closed["reason"] in ("normal", "client_reset") and closed["route"] == "echo"
    assert opened["client"] == closed["client"]


# -- top, under a pseudo-terminal ---------------------------------------------------------------


@contextlib.contextmanager
def top_in_a_terminal(path: pathlib.Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """`inspect.py top` with a pty as its controlling terminal (so ^C is a real SIGINT)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, str(INSPECT), "-s", str(path), "top", "--interval", "0.2"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # after setsid: make the pty ours
    )  # fmt: skip
    try:
        yield proc, master, slave
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(master)
        os.close(slave)


def read_until(master: int, predicate: Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while not predicate(out):
        remaining = deadline - time.monotonic()
        assert remaining > 0, out[-2000:]
        if select.select([master], [], [], remaining)[0]:
            out += os.read(master, 65536)
    return out


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_top_refreshes_a_live_table_and_restores_the_terminal(running: tuple[Any, pathlib.Path], key: bytes) -> None:
    d, path = running
    with roundtrip(d.address("echo"), b"z" * 5000) as client, top_in_a_terminal(path) as (proc, master, slave):
        before = termios.tcgetattr(slave)
        port = client.getsockname()[1]
        # Two frames: the first screen and one refresh of it.
        screen = read_until(master, lambda out: out.count(b"triofwd top") >= 2 and f"127.0.0.1:{port}".encode() in out)
        during = termios.tcgetattr(slave)
        assert during[3] & termios.ICANON == 0 and during[3] & termios.ECHO == 0  # cbreak: keys unechoed, one at a time
        frame = screen.rsplit(b"\x1b[H\x1b[2J", 1)[1].decode()
        lines = frame.splitlines()
        assert lines[0].startswith("triofwd top  1 connections")
        assert lines[2].split() == ["ID", "ROUTE", "CLIENT", "TARGET", "AGE", "IDLE", "IN", "OUT", "RATE"]
        assert lines[3].split()[1:3] == ["echo", f"127.0.0.1:{port}"] and "4.9 KiB" in lines[3]
        os.write(master, key)
        assert proc.wait(10) == 0
        rest = read_until(master, lambda out: inspector.ALT_SCREEN_OFF.encode() in out)
        assert inspector.CURSOR_ON.encode() in rest
        assert termios.tcgetattr(slave) == before


def test_top_frame_sorts_by_throughput_since_the_last_frame() -> None:
    rows = [
        {"id": 1, "route": "a", "client": "c1", "target": "t", "age_s": 100.0, "idle_s": 0.0, "bytes_in": 10_000, "bytes_out": 0},
        {"id": 2, "route": "a", "client": "c2", "target": "t", "age_s": 100.0, "idle_s": 0.0, "bytes_in": 500, "bytes_out": 500},
        {"id": 3, "route": "a", "client": "c3", "target": None, "age_s": 0.5, "idle_s": 0.5, "bytes_in": 4096, "bytes_out": 0},
    ]
    first, totals = inspector.top_frame(rows, {}, None, (200, 50), 1.0)
    assert [line.split()[0] for line in first[3:]] == ["3", "1", "2"]  # lifetime averages: 8 KiB/s, 100 B/s, 10 B/s
    assert totals == {1: 10_000, 2: 1000, 3: 4096}
    rows[1] = {**rows[1], "bytes_out": 500 + 20_480}
    second, _ = inspector.top_frame(rows, totals, 2.0, (200, 50), 1.0)
    assert [line.split()[0] for line in second[3:]] == ["2", "1", "3"]  # 10 KiB/s moved in the last 2 s; the others idle
    assert second[3].endswith("10.0 KiB/s") and second[0].startswith("triofwd top  3 connections  10.0 KiB/s")
    tiny, _ = inspector.top_frame(rows, totals, 2.0, (20, 4), 1.0)
    assert len(tiny) == 3 and all(len(line) <= 20 for line in tiny)


def test_human_units() -> None:
    assert [inspector.human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
    assert [inspector.human_duration(s) for s in (0.25, 59, 95, 3 * 3600 + 120, 2 * 86400 + 3600)] == ["0.2s", "59s", "1m35s", "3h02m", "2d01h"]


def test_a_dynamic_destination_shows_what_was_asked_for_and_what_was_reached() -> None:
    """socks5 / http_connect rows: the destination the client named, the address connected
    to in brackets; other rows: the target alone."""
    row = {"id": 3, "route": "socks", "client": "127.0.0.1:5000", "target": "127.0.0.1:8080", "state": "established",
           "age_s": 1.0, "idle_s": 0.0, "bytes_in": 10, "bytes_out": 20, "reason": None}  # fmt: skip
    [_, plain] = inspector.format_connections([row])
    [_, dynamic] = inspector.format_connections([{**row, "destination": "db.internal:8080"}])
    assert plain.split()[3] == "127.0.0.1:8080"
    assert dynamic.split()[3:5] == ["db.internal:8080", "(127.0.0.1:8080)"]
