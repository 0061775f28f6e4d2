"""triofwd._systemd: sd_notify, socket activation as systemd does it, the watchdog; contrib's units."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import trio

from tests.conftest import REPO
from triofwd import _systemd as systemd
from triofwd._config import Settings, parse_duration

TIMEOUT = 10.0


# -- notify ----------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """What systemd listens on: an AF_UNIX datagram socket named by $NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        yield sock


def pending(sock: socket.socket) -> list[bytes]:
    """The datagrams waiting on `sock` now, without waiting for more."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


def test_notify_sends_its_fields_in_one_datagram(notify_socket: socket.socket) -> None:
    systemd.notify("READY=1", "STATUS=3 connections")
    assert pending(notify_socket) == [b"READY=1\nSTATUS=3 connections"]


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"triofwd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        systemd.notify("STOPPING=1")
        assert pending(sock) == [b"STOPPING=1"]


def test_notify_without_notify_socket_does_nothing(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    systemd.notify("READY=1")
    assert caplog.records == []


def test_a_notify_that_fails_is_logged_not_raised(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, "triofwd.systemd"):
        systemd.notify("READY=1")
    assert [r.getMessage() for r in caplog.records] == [f"cannot notify systemd at {tmp_path / 'nobody-listens'}: No such file or directory"]


def test_reloading_says_ready_again_even_when_the_reload_fails(notify_socket: socket.socket) -> None:
    with systemd.reloading():
        [reloading] = pending(notify_socket)
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", reloading)
    assert abs(int(reloading.rsplit(b"=", 1)[1]) / 1e6 - time.monotonic()) < 5  # CLOCK_MONOTONIC, as systemd reads it
    assert pending(notify_socket) == [b"READY=1"]
    with pytest.raises(ValueError, match="bad route file"), systemd.reloading():
        raise ValueError("bad route file")
    assert pending(notify_socket)[-1] == b"READY=1"


# -- socket activation -----------------------------------------------------------------

# What systemd does between fork and exec: the passed sockets to fds 3, 4, ... (moved out
# of the way first, since one may already sit on a number another needs), LISTEN_PID set
# to the pid that is about to exec, then exec the service:
#   python -c ACTIVATE FD,FD,... NAME:NAME:... PYTHON-ARGS...
ACTIVATE = """
import fcntl, os, sys
sources = [int(fd) for fd in sys.argv[1].split(",")]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in sources]
for fd in sources:
    os.close(fd)
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(moved)), LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""

# The service: takes what it was passed, serves one connection on "web", reports.
SERVICE = """
import json, os
from triofwd._systemd import listen_fds
passed = listen_fds()
web = dict(passed)["web"]
web.settimeout(10)
conn, _ = web.accept()
conn.sendall(b"served by the activated process")
conn.close()
print(json.dumps({
    "passed": [[name, sock.fileno(), sock.family.name, sock.type.name, list(sock.getsockname()[:2]), os.get_inheritable(sock.fileno())] for name, sock in passed],
    "environment": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}))
"""


def test_listen_fds_takes_the_sockets_as_systemd_passes_them() -> None:
    with socket.socket() as web, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dns:
        web.bind(("127.0.0.1", 0))
        web.listen()
        dns.bind(("127.0.0.1", 0))
        read, write = os.pipe()  # systemd may pass fds that are not sockets (ListenFIFO=)
        try:
            fds = [web.fileno(), dns.fileno(), read]
            child = subprocess.Popen(
                [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), "web:dns:fifo", "-c", SERVICE],
                pass_fds=fds, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        finally:
            os.close(read)
            os.close(write)
        # systemd keeps its own copy of a passed socket; so does this test: the connection
        # waits in the shared backlog until the activated process accepts it.
        with socket.create_connection(web.getsockname(), timeout=TIMEOUT) as client:
            assert client.recv(100, socket.MSG_WAITALL) == b"served by the activated process"
        out, err = child.communicate(timeout=TIMEOUT)
        addresses = [list(web.getsockname()), list(dns.getsockname())]
    assert child.returncode == 0, err
    report = json.loads(out)
    assert report["passed"] == [
        ["web", 3, "AF_INET", "SOCK_STREAM", addresses[0], False],
        ["dns", 4, "AF_INET", "SOCK_DGRAM", addresses[1], False],
    ]
    assert report["environment"] == []  # unset: a child of the service must not take them
    assert "systemd passed fd 5 (fifo), which is not a socket" in err


def test_listen_fds_meant_for_another_process_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent's LISTEN_* inherited by accident: nothing taken, and not passed on either."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS"} & set(os.environ)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, []),
        ({"LISTEN_PID": "42"}, []),
        ({"LISTEN_PID": "41", "LISTEN_FDS": "2"}, []),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, []),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, [(3, "unknown"), (4, "unknown")]),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "web:web:tls"}, [(3, "web"), (4, "web"), (5, "tls")]),
    ],
)
def test_parse_listen_fds(environ: dict[str, str], expected: list[tuple[int, str]]) -> None:
    assert systemd.parse_listen_fds(environ, 42) == expected


@pytest.mark.parametrize(
    ("environ", "error"),
    [
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "LISTEN_PID='x' from the environment is not a number"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' from the environment is not a number"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"}, "LISTEN_FDNAMES names 1 sockets, LISTEN_FDS=2"),
    ],
)
def test_malformed_listen_variables_are_errors(environ: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        systemd.parse_listen_fds(environ, 42)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test makes, closed after it."""
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def make(made: list[socket.socket], family: int, address: object, *, kind: int = socket.SOCK_STREAM, v6only: bool | None = None, listen: bool = True) -> socket.socket:
    sock = socket.socket(family, kind)
    made.append(sock)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    sock.bind(address)
    if listen and kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@pytest.fixture
def ipv6() -> None:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 here: {exc}")


def test_a_passed_socket_serves_the_listener_bound_where_it_is(sockets: list[socket.socket]) -> None:
    web = make(sockets, socket.AF_INET, ("127.0.0.1", 0))
    dns = make(sockets, socket.AF_INET, ("127.0.0.1", 0), kind=socket.SOCK_DGRAM)
    passed = systemd.PassedSockets([("web", web), ("dns", dns)])
    wants = [
        ("127.0.0.1", port(web), "tcp"),
        ("127.0.0.1", port(dns), "udp"),
        ("127.0.0.1", port(dns), "tcp"),  # nothing passed listens for TCP there
        ("127.0.0.2", port(web), "tcp"),  # another address
        ("0.0.0.0", port(web), "tcp"),  # a wider one: the socket does not serve it
        ("localhost", port(web), "tcp"),  # names are never matched
        ("127.0.0.1", 0, "tcp"),  # port 0: a fresh port each time
    ]
    assert passed.claim(wants) == {("127.0.0.1", port(web), "tcp"): web, ("127.0.0.1", port(dns), "udp"): dns}
    assert passed.unclaimed == []
    assert passed.claim(wants) == {}  # each socket goes to one listener (and a reload finds it taken)


def test_what_no_listener_takes_is_reported_by_name(sockets: list[socket.socket], tmp_path: pathlib.Path) -> None:
    web = make(sockets, socket.AF_INET, ("127.0.0.1", 0))
    unused = make(sockets, socket.AF_INET, ("127.0.0.1", 0))
    control = make(sockets, socket.AF_UNIX, str(tmp_path / "c.sock"))
    bound_only = make(sockets, socket.AF_INET, ("127.0.0.1", 0), listen=False)  # what Accept=yes would pass: not a listener
    passed = systemd.PassedSockets([("web", web), ("spare", unused), ("control", control), ("conn", bound_only)])
    assert passed.claim([("127.0.0.1", port(web), "tcp"), ("127.0.0.1", port(bound_only), "tcp")]) == {("127.0.0.1", port(web), "tcp"): web}
    assert passed.unclaimed == [("spare", unused), ("control", control), ("conn", bound_only)]


def test_ipv6_addresses_match_in_any_spelling(ipv6: None, sockets: list[socket.socket]) -> None:
    loopback = make(sockets, socket.AF_INET6, ("::1", 0))
    passed = systemd.PassedSockets([("v6", loopback)])
    assert passed.claim([("0:0::1", port(loopback), "tcp")]) == {("0:0::1", port(loopback), "tcp"): loopback}


def test_a_dual_stack_socket_serves_0_0_0_0_too(ipv6: None, sockets: list[socket.socket]) -> None:
    """ListenStream=443 is [::]:443 with IPV6_V6ONLY off: it takes IPv4 clients, so it serves a "0.0.0.0" listener."""
    dual = make(sockets, socket.AF_INET6, ("::", 0), v6only=False)
    passed = systemd.PassedSockets([("https", dual)])
    assert passed.claim([("0.0.0.0", port(dual), "tcp")]) == {("0.0.0.0", port(dual), "tcp"): dual}


def test_a_dual_stack_socket_goes_to_the_ipv6_listener_first(ipv6: None, sockets: list[socket.socket]) -> None:
    dual = make(sockets, socket.AF_INET6, ("::", 0), v6only=False)
    for wants in ([("0.0.0.0", port(dual), "tcp"), ("::", port(dual), "tcp")], [("::", port(dual), "tcp"), ("0.0.0.0", port(dual), "tcp")]):
        passed = systemd.PassedSockets([("https", dual)])
        assert passed.claim(wants) == {("::", port(dual), "tcp"): dual}


def test_an_ipv6_only_socket_does_not_serve_0_0_0_0(ipv6: None, sockets: list[socket.socket]) -> None:
    """BindIPv6Only=ipv6-only: [::] takes no IPv4 client."""
    only = make(sockets, socket.AF_INET6, ("::", 0), v6only=True)
    passed = systemd.PassedSockets([("https", only)])
    assert passed.claim([("0.0.0.0", port(only), "tcp")]) == {}
    assert passed.claim([("::", port(only), "tcp")]) == {("::", port(only), "tcp"): only}


def test_an_ipv4_mapped_address_is_its_ipv4_address(ipv6: None, sockets: list[socket.socket]) -> None:
    mapped = make(sockets, socket.AF_INET6, ("::ffff:127.0.0.1", 0), v6only=False)
    passed = systemd.PassedSockets([("web", mapped)])
    assert passed.claim([("127.0.0.1", port(mapped), "tcp")]) == {("127.0.0.1", port(mapped), "tcp"): mapped}


# -- the watchdog ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, None),  # the main process's, not ours
        ({"WATCHDOG_USEC": "500000"}, 0.25),
    ],
)
def test_watchdog_interval_is_half_the_timeout(environ: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(environ, 42) == expected


def test_watchdog_interval_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_USEC", "2s")
    with pytest.raises(ValueError, match="WATCHDOG_USEC='2s' from the environment is not a number"):
        systemd.watchdog_interval()


async def test_the_watchdog_pings_every_interval(autojump_clock: trio.testing.MockClock, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    pings: list[tuple[float, bytes]] = []

    async def receive() -> None:
        while True:
            data = await sock.recv(100)
            pings.append((trio.current_time(), data))

    with sock, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            start = trio.current_time()
            nursery.start_soon(systemd.watchdog, 15.0)
            await trio.sleep(50)
            nursery.cancel_scope.cancel()
    assert [(round(t - start, 6), data) for t, data in pings] == [(0.0, b"WATCHDOG=1"), (15.0, b"WATCHDOG=1"), (30.0, b"WATCHDOG=1"), (45.0, b"WATCHDOG=1")]


async def test_a_blocked_event_loop_stops_the_pings(notify_socket: socket.socket) -> None:
    """The pings come from the event loop, not a thread: while the loop is stuck, none."""
    interval = 0.02
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(systemd.watchdog, interval)
            await trio.sleep(interval * 5)
            assert pending(notify_socket)  # pinging
            time.sleep(interval * 10)  # the loop is wedged: no checkpoint
            assert pending(notify_socket) == []
            await trio.sleep(interval * 3)
            assert pending(notify_socket)  # unstuck: pinging again
            nursery.cancel_scope.cancel()


# -- contrib/: the units ---------------------------------------------------------------

CONTRIB = REPO / "contrib"


def unit(path: pathlib.Path) -> dict[str, list[str]]:
    """Section.Key -> its values, in order (systemd keys repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            out.setdefault(f"{section}.{key}", []).append(value)
    return out


@pytest.fixture
def units(tmp_path: pathlib.Path) -> pathlib.Path:
    """Copies of contrib's units whose commands exist here (systemd-analyze checks them):
    /usr/local/bin/triofwd becomes this Python running -m triofwd."""
    for name in ("triofwd.service", "triofwd.socket"):
        text = (CONTRIB / name).read_text().replace("/usr/local/bin/triofwd", f"{sys.executable} -m triofwd")
        (tmp_path / name).write_text(text)
    return tmp_path


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


def test_the_units_pass_systemd_analyze_verify(units: pathlib.Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(units / "triofwd.socket"), str(units / "triofwd.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    ours = [line for line in result.stderr.splitlines() if "triofwd" in line]  # not the host's own units
    assert (result.returncode, ours) == (0, [])


def test_the_service_is_hardened(units: pathlib.Path) -> None:
    """systemd's own review of the sandbox: exposure at most 2.0 of 10 ("OK")."""
    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--threshold=20", str(units / "triofwd.service")], capture_output=True, text=True, timeout=60)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 250")
    assert result.returncode == 0, result.stdout[-400:]


def test_the_units_say_what_triofwd_relies_on() -> None:
    service, sockets = unit(CONTRIB / "triofwd.service"), unit(CONTRIB / "triofwd.socket")
    assert service["Service.Type"] == ["notify"] and service["Service.NotifyAccess"] == ["main"]
    assert service["Service.ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert parse_duration(service["Service.WatchdogSec"][0]) > 0
    # systemd's SIGKILL must not cut the graceful shutdown short.
    assert parse_duration(service["Service.TimeoutStopSec"][0]) > parse_duration(Settings().shutdown_grace)
    assert service["Service.DynamicUser"] == ["yes"] and service["Service.ProtectSystem"] == ["strict"]
    assert service["Service.AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    [control] = re.findall(r"--control (\S+)", service["Service.ExecStart"][0])
    assert pathlib.PurePath(control).parent == pathlib.PurePath("/run", *service["Service.RuntimeDirectory"])
    assert sockets["Socket.Service"] == ["triofwd.service"] and sockets["Socket.FileDescriptorName"]
    assert all(re.fullmatch(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+|\d+", listen) for listen in sockets["Socket.ListenStream"])
