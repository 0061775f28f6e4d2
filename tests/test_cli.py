"""The real `triofwd serve` process: start-up errors, readiness, signals, EMFILE."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import REPO, Daemon, free_port, limit_fds, open_fds, roundtrip, run_triofwd, threaded_echo


def routes(target: str, *extra: str) -> str:
    return "\n".join([
        "[settings]",
        'shutdown_grace = "1s"',
        "[[routes]]",
        'name = "echo"',
        "ports = [0]",
        'bind = "127.0.0.1"',
        f'targets = ["{target}"]',
        *extra,
    ])  # fmt: skip


def test_an_invalid_route_file_exits_2_with_one_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[routes]]\nname = "x"\nports = [70000]\ntargets = ["127.0.0.1:1"]\n')
    result = run_triofwd("serve", str(path))
    assert result.returncode == 2
    assert result.stderr == f"triofwd: {path}: Expected `int` <= 65535 - at `$.routes[0].ports[0]`\n"


def test_an_unreadable_route_file_exits_2_with_one_line(tmp_path: pathlib.Path) -> None:
    result = run_triofwd("serve", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert result.stderr == f"triofwd: {tmp_path / 'missing.toml'}: cannot read route file: No such file or directory\n"


def test_a_busy_port_exits_2_with_one_line(tmp_path: pathlib.Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        path = tmp_path / "busy.toml"
        path.write_text(f'[[routes]]\nname = "x"\nports = [{port}]\nbind = "127.0.0.1"\ntargets = ["127.0.0.1:1"]\n')
        result = run_triofwd("serve", str(path))
    assert result.returncode == 2
    assert result.stderr == f"triofwd: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert "Traceback" not in result.stderr


def test_python_dash_m_is_the_same_program(tmp_path: pathlib.Path) -> None:
    result = run_triofwd("check", str(REPO / "routes" / "demo.toml"))
    assert (result.returncode, result.stdout) == (0, "ok: 2 routes\n")


def test_ready_is_logged_and_sent_to_systemd(tmp_path: pathlib.Path, daemon) -> None:
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, threaded_echo() as target:
        notify.bind(notify_path)
        notify.settimeout(10)
        d = daemon(routes(target), env={**os.environ, "NOTIFY_SOCKET": notify_path})
        assert notify.recv(100) == b"READY=1"
        roundtrip(d.address("echo")).close()
    assert list(d.listeners) == ["echo"]


def test_sighup_reloads_and_open_connections_keep_running(daemon) -> None:
    with threaded_echo() as target:
        d = daemon(routes(target))
        old = roundtrip(d.address("echo"))
        d.routefile.write_text(routes(target) + '\n[[routes]]\nname = "second"\nports = [0]\nbind = "127.0.0.1"\naction = "reject"\n')
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded")
        old.sendall(b"after reload")
        assert old.recv(12, socket.MSG_WAITALL) == b"after reload"
        # A bad file: logged, and the old table stays in force.
        d.routefile.write_text("[[routes]]\nname = 1\n")
        d.signal(signal.SIGHUP)
        [failed] = d.wait_log("reload failed")
        assert "Expected `str`, got `int` - at `$.routes[0].name`" in failed["msg"]
        roundtrip(d.address("echo")).close()
        old.close()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0


def test_sigterm_lets_connections_finish_within_the_grace_then_closes_them(daemon) -> None:
    with threaded_echo() as target:
        d = daemon(routes(target))
        lingering = roundtrip(d.address("echo"))
        start = time.monotonic()
        d.signal(signal.SIGTERM)
        d.wait_log("shutting down")
        lingering.sendall(b"grace")  # still forwarded during the grace period
        assert lingering.recv(5, socket.MSG_WAITALL) == b"grace"
        assert lingering.recv(1) == b""  # closed by the forwarder when the grace ran out
        assert d.wait() == 0
        elapsed = time.monotonic() - start
    assert [r["reason"] for r in d.access_records()] == ["shutdown"]
    assert 0.9 <= elapsed < 5


def test_sigint_stops_too(daemon) -> None:
    with threaded_echo() as target:
        d = daemon(routes(target))
        d.signal(signal.SIGINT)
        assert d.wait() == 0


def test_emfile_backs_off_with_one_warning_per_burst_and_recovers(daemon) -> None:
    """With few fds, accept() fails with EMFILE; the daemon must neither spin nor flood the log."""
    with threaded_echo() as target:
        d = daemon(routes(target), preexec_fn=limit_fds(64))
        # The hard limit cannot be raised: the daemon says how many connections it can hold.
        [limit] = [e["msg"] for e in d.logs() if "open file limit" in e["msg"]]
        assert "(64) holds about 0 connections, fewer than max_connections = 10000" in limit
        spare = 64 - open_fds(d.pid)
        address = d.address("echo")
        # Each connection takes two fds in the daemon; leave room for the splice pipe pool.
        held = [roundtrip(address) for _ in range((spare - 4) // 2)]
        extra = [socket.create_connection(address, timeout=5) for _ in range(20)]  # queued, not accepted
        d.wait_log("accept on")
        cpu_before = _cpu_seconds(d.pid)
        time.sleep(1.0)
        cpu_used = _cpu_seconds(d.pid) - cpu_before
        warnings = [e for e in d.logs() if e["msg"].startswith("accept on") and "failed" in e["msg"]]
        assert len(warnings) == 1
        assert "Too many open files" in warnings[0]["msg"]
        assert cpu_used < 0.5  # backing off, not spinning on a readable listener
        for sock in held:
            sock.close()
        # A queued connection is served once fds are free, or, if it was accepted while they
        # flapped and no target socket could be made, closed with reason capacity.
        outcomes = []
        for sock in extra:
            try:
                sock.sendall(b"late")
                outcomes.append(sock.recv(4, socket.MSG_WAITALL))
            except OSError:
                outcomes.append(b"")
            sock.close()
        assert set(outcomes) <= {b"late", b""}
        roundtrip(address).close()  # and new ones are served
        d.wait_log("accept on", count=2)  # "... works again after N failures"
        assert [e for e in d.logs() if "works again" in e["msg"]]
        reasons = [r["reason"] for r in d.access_records()]
        assert reasons.count("capacity") == outcomes.count(b"")
        d.signal(signal.SIGTERM)
        assert d.wait() == 0


def _cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


UNREACHABLE_SCRIPT = r"""
import json, sys, trio, triofwd

async def main():
    routes = [triofwd.Route(name="r", ports=[0], bind="127.0.0.1", targets=["127.0.0.77:80", "127.0.0.77:81"], connect_retries=1)]
    records = []
    class Log:
        def write(self, text): records.extend(json.loads(l) for l in text.splitlines() if l)
        def flush(self): pass
    async with trio.open_nursery() as nursery:
        fwd = await nursery.start(lambda task_status: triofwd.serve(triofwd.Config(routes=routes), access_log=Log(), task_status=task_status))
        host, port = fwd.addresses["r"][0].rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
            while not records:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    print(json.dumps(records[0]))

trio.run(main)
"""


def test_target_unreachable_in_a_network_namespace(tmp_path: pathlib.Path) -> None:
    """An `unreachable` route in a namespace of the test's own gives a real EHOSTUNREACH."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    script = tmp_path / "unreachable.py"
    script.write_text(UNREACHABLE_SCRIPT)
    setup = "ip link set lo up && ip route add unreachable 127.0.0.77/32 table local && exec \"$0\" \"$1\""
    try:
        result = subprocess.run(["unshare", "-n", "sh", "-c", setup, sys.executable, str(script)], capture_output=True, text=True, timeout=30, cwd=REPO)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if result.returncode != 0 and ("Operation not permitted" in result.stderr or "ip: not found" in result.stderr):
        pytest.skip(f"cannot set up a network namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    record = __import__("json").loads(result.stdout)
    assert (record["reason"], record["target"]) in {("target_unreachable", "127.0.0.77:80"), ("target_unreachable", "127.0.0.77:81")}


OFFLOAD_ROUTES = '[[routes]]\nname = "db"\nports = [15432]\nbind = "127.0.0.1"\naction = "offload"\ntargets = ["127.0.0.1:5432"]\n'


def test_check_show_nft_prints_the_ruleset_without_installing_it(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "offload.toml"
    path.write_text(OFFLOAD_ROUTES)
    result = run_triofwd("check", str(path), "--show-nft")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["# generated by triofwd; replaced as a whole on every change", "table inet triofwd", "delete table inet triofwd"]
    assert "\tcounter route_db {" in lines
    assert any(line.strip().endswith("dnat ip to 127.0.0.1:5432") for line in lines)
    assert lines[-1] == "}"  # the ruleset alone, for `nft -c -f -`
    assert result.stderr == "ok: 1 routes\n"


def test_offload_without_nft_and_without_fallback_exits_2_with_one_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "offload.toml"
    path.write_text(OFFLOAD_ROUTES)
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_triofwd("serve", str(path), env={**os.environ, "PATH": str(empty)})
    assert result.returncode == 2
    assert result.stderr == "triofwd: cannot install nftables rules for offload routes db: nft binary 'nft' not found\n"


@contextlib.contextmanager
def demo_backend() -> Iterator[int]:
    """tools/demo_backend.py, as `make run` starts it, on a free port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "tools/demo_backend.py", "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == f"demo backend on http://127.0.0.1:{port}/\n"
        yield port
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def http_get(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


def test_the_demo_backend_starts_and_answers() -> None:
    """`make run` starts tools/demo_backend.py; tools/inspect.py must not shadow the stdlib for it."""
    with demo_backend() as port:
        answer = http_get(("127.0.0.1", port))
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"hello from the triofwd demo backend\n")


def test_the_demo_serves_through_the_backend_whose_health_check_passes(daemon: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    """routes/demo.toml as `make run` serves it (its ports made free): forwarded, checked, warm."""
    sock = tmp_path / "c.sock"
    with demo_backend() as port:
        text = (REPO / "routes" / "demo.toml").read_text().replace("8080", "0").replace("8083", "0").replace("8081", str(port))
        d = daemon(text, "--control", str(sock))
        assert http_get(d.address("web")).endswith(b"hello from the triofwd demo backend\n")
        deadline = time.monotonic() + 10
        while True:
            inspect = subprocess.run([sys.executable, "tools/inspect.py", "-s", str(sock), "routes", "--json"], cwd=REPO, capture_output=True, text=True, timeout=20)
            [target] = json.loads(inspect.stdout)[0]["target_state"]
            if (target["last_check"], target["warm"]) == ("ok", 2) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert (target["target"], target["up"], target["last_check"], target["warm"]) == (f"127.0.0.1:{port}", True, "ok", 2)
