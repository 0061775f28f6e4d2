"""The reliability harness: the real `triofwd serve` process, scripted peers, and the checks
run after every scenario.

    async with scenario(ROUTES.format(target=address)) as s:
        client = await s.open("web", expect="normal")
        ...
    # leaving the block ran s.check() (below) and printed one summary line

A scenario starts the daemon from a route file it writes, with a control socket, and
takes a baseline once it is ready. After the traffic it waits until the connection
table is empty (asked over the control socket), then checks:

1. the table is empty (`connections` returns []);
2. the daemon's open file descriptors (/proc/PID/fd) are back to the baseline, pipes
   apart: the splice pipe pool keeps up to 2 * POOL_LIMIT pipe fds for reuse;
3. its RSS has grown by at most the scenario's stated bound;
4. every connection made has exactly one access-log line, matched by its client
   address ("ip:port"), with one of the reasons the scenario expected for it;
5. `stats` counts exactly the connections made: total, the sum of terminations, and no
   active one;
and that the daemon logged no error the scenario did not expect.

Everything listens on 127.0.0.1 with port 0; every wait is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import pathlib
import resource
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import trio

import triofwd
from tests.conftest import Daemon, fd_kinds, fd_targets, receive_all, receive_exactly, rst_close
from triofwd._splice import POOL_LIMIT
from triofwd._targets import alive

HERE = pathlib.Path(__file__).resolve().parent
# On the daemon's PYTHONPATH: sitecustomize.py there injects DNS faults (names under .invalid).
FAULTS = HERE / "faults"
# How long the daemon may take to close and record everything once the traffic is over.
SETTLE_TIMEOUT = 20.0
POLL = 0.05  # polling another process's state: it has no event this process can await
PEER_POLL = 0.5  # how often a silent target looks whether its peer has gone
HALF_OPEN_HOLD = 10.0  # how long a half-open target stays silent after answering
MIB = 1024 * 1024
# The RSS bound of a scenario unless it states its own: the daemon may grow this much.
DEFAULT_RSS_BOUND_MIB = 16


def raise_own_fd_limit() -> None:
    """This process holds both ends of thousands of connections: lift its soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def client_of(stream: trio.SocketStream) -> str:
    """The "ip:port" the daemon's access log names this client by."""
    host, port = stream.socket.getsockname()[:2]
    return f"{host}:{port}"


@dataclasses.dataclass
class Summary:
    """What one scenario did, for the summary line and the README table."""

    connections: int
    faults: int
    reasons: dict[str, int]
    rss_growth_mib: float
    seconds: float

    def line(self, name: str) -> str:
        reasons = " ".join(f"{k}={v}" for k, v in sorted(self.reasons.items()))
        return (f"{name}: {self.connections} connections, {self.faults} faults, {self.seconds:.1f}s, "
                f"rss +{self.rss_growth_mib:.1f} MiB, reasons {reasons}: all checks passed")  # fmt: skip


class Scenario:
    """One daemon under test, its control socket, and what the test expects of it."""

    def __init__(self, daemon: Daemon, control: Any, rss_bound_mib: float, errors_allowed: bool) -> None:
        self.daemon = daemon
        self.control = control
        self.rss_bound = rss_bound_mib * MIB
        self.errors_allowed = errors_allowed
        # How long fds may take to come back after the table is empty: 0, unless something
        # besides connections holds them for a bounded time (a control session's handshake).
        self.fds_settle = 0.0
        self.expected: list[tuple[str, frozenset[str]]] = []
        self.faults = 0
        self.summary: Summary | None = None
        self._started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.daemon.pid

    def address(self, route: str) -> tuple[str, int]:
        return self.daemon.address(route)

    async def baseline(self) -> None:
        """The daemon's state before the scenario: fds, RSS, totals, log lines."""
        self.base_fds = self.fds()
        self.base_rss = rss_bytes(self.pid)
        self.base_total = (await self.control.request("stats"))["total"]
        self.base_records = len(self.daemon.access_records())
        self._started = time.monotonic()

    def fds(self) -> collections.Counter[str]:
        """The daemon's open fds by kind, the splice pool's pipes apart (bounded, not counted)."""
        kinds = fd_kinds(self.pid)
        assert kinds["pipe"] <= 2 * POOL_LIMIT, f"more pipe fds than the splice pool keeps: {kinds}"
        del kinds["pipe"]
        return kinds

    # -- traffic ---------------------------------------------------------------------

    def made(self, stream: trio.SocketStream, expect: str | Iterable[str]) -> trio.SocketStream:
        """Count a connection this test made to the daemon, ending with one of `expect`."""
        reasons = frozenset([expect] if isinstance(expect, str) else expect)
        self.expected.append((client_of(stream), reasons))
        return stream

    async def open(self, route: str, expect: str | Iterable[str], source: str | None = None) -> trio.SocketStream:
        """A connection to `route`'s listener (from `source`, e.g. "127.0.0.2"), counted."""
        stream = await trio.open_tcp_stream(*self.address(route), local_address=source)
        return self.made(stream, expect)

    async def many(self, count: int, one: Callable[[int], Any], concurrency: int = 64) -> None:
        """Run `one(i)` for i in range(count), `concurrency` at a time."""
        limiter = trio.CapacityLimiter(concurrency)

        async def run(i: int) -> None:
            async with limiter:
                await one(i)

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(run, i)

    async def request(self, cmd: str, **args: Any) -> Any:
        return await self.control.request(cmd, **args)

    # -- the checks ------------------------------------------------------------------

    async def settle(self) -> list[dict[str, Any]]:
        """Wait for an empty table and the access log's lines; return this scenario's records."""
        want = self.base_records + len(self.expected)
        with trio.fail_after(SETTLE_TIMEOUT):
            while rows := await self.control.request("connections"):
                await trio.sleep(POLL)
            while self._log_lines() < want:
                await trio.sleep(POLL)
        assert not rows
        return self.daemon.access_records()[self.base_records:]

    def _log_lines(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            with open(self.daemon.access_log, "rb") as f:
                return sum(1 for _ in f)
        return 0

    async def check(self) -> Summary:
        """The five checks of the module docstring, and no unexpected error logged."""
        records = await self.settle()
        # 4. one line per connection, with an expected reason
        reasons = self._check_lines(records)
        # 5. stats count exactly the connections made
        stats = await self.control.request("stats")
        made = len(self.expected)
        assert stats["active"] == 0, stats
        assert stats["total"] == self.base_total + made, (stats["total"], self.base_total, made)
        assert sum(stats["terminations"].values()) == stats["total"], stats["terminations"]
        # 2. file descriptors back to the baseline (the table is empty: nothing may hold one)
        fds = self.fds()
        with trio.move_on_after(self.fds_settle):
            while fds != self.base_fds:
                await trio.sleep(POLL)
                fds = self.fds()
        assert fds == self.base_fds, f"fds before {dict(self.base_fds)}, after {dict(fds)}: {self._fd_listing()}"
        # 3. memory
        growth = rss_bytes(self.pid) - self.base_rss
        assert growth <= self.rss_bound, f"RSS grew {growth / MIB:.1f} MiB, bound {self.rss_bound / MIB:.0f} MiB"
        if not self.errors_allowed:
            errors = [e for e in self.daemon.logs() if e.get("level") == "error"]
            assert not errors, errors
        self.summary = Summary(
            connections=made,
            faults=self.faults,
            reasons=dict(reasons),
            rss_growth_mib=growth / MIB,
            seconds=time.monotonic() - self._started,
        )
        return self.summary

    def _check_lines(self, records: list[dict[str, Any]]) -> collections.Counter[str]:
        """4. one access-log line per connection, each with an expected reason; returns the reasons counted."""
        assert len(records) == len(self.expected), f"{len(records)} access-log lines for {len(self.expected)} connections"
        check_reasons(self.expected, records)
        return collections.Counter(r["reason"] for r in records)

    def _fd_listing(self) -> list[str]:
        return [f"{fd}->{target}" for fd, target in sorted(fd_targets(self.pid).items())]

    def check_records(self) -> Summary:
        """For a daemon that has exited: one access-log line per connection, expected reasons."""
        reasons = self._check_lines(self.daemon.access_records()[self.base_records:])
        self.summary = Summary(len(self.expected), self.faults, dict(reasons), 0.0, time.monotonic() - self._started)
        return self.summary


def check_reasons(expected: list[tuple[str, frozenset[str]]], records: list[dict[str, Any]]) -> None:
    """Exactly one line per connection made, with one of its expected reasons.

    Lines are matched by client address; the kernel may reuse a client port within a
    scenario (TIME_WAIT reuse on loopback, or at once toward another listener), so an
    address made twice needs two lines, each reason matching one of its connections.
    """
    wanted: dict[str, list[frozenset[str]]] = collections.defaultdict(list)
    for client, reasons in expected:
        wanted[client].append(reasons)
    got: dict[str, list[str]] = collections.defaultdict(list)
    for record in records:
        got[record["client"]].append(record["reason"])
    problems = []
    for client in wanted.keys() | got.keys():
        allowed, seen = wanted.get(client, []), sorted(got.get(client, []))
        if len(allowed) != len(seen):
            problems.append(f"{client}: {len(seen)} lines {seen} for {len(allowed)} connections")
            continue
        if not _matched(allowed, seen):
            problems.append(f"{client}: reasons {seen}, expected one each of {[sorted(a) for a in allowed]}")
    assert not problems, f"{len(problems)} connections logged wrongly, e.g. {problems[:5]}"


def write_atomically(path: pathlib.Path, text: str) -> None:
    """A reload must never read half a file: write beside it, then rename over it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _matched(allowed: list[frozenset[str]], seen: list[str]) -> bool:
    """Whether each line's reason can be given to a different connection that allows it
    (a bipartite matching, Kuhn's algorithm: an address has a handful of connections)."""
    owner: dict[int, int] = {}  # line -> connection

    def place(conn: int, tried: set[int]) -> bool:
        for line, reason in enumerate(seen):
            if reason in allowed[conn] and line not in tried:
                tried.add(line)
                if line not in owner or place(owner[line], tried):
                    owner[line] = conn
                    return True
        return False

    return all(place(conn, set()) for conn in range(len(allowed)))


def daemon_env(*paths: str | os.PathLike[str]) -> dict[str, str]:
    """The daemon's environment: the fault injector (and `paths`, e.g. a handler module's folder) importable."""
    path = os.pathsep.join([str(FAULTS), *map(str, paths)])
    return {**os.environ, "PYTHONPATH": path}


@contextlib.asynccontextmanager
async def running(
    start: Callable[..., Daemon],
    text: str,
    *,
    name: str,
    rss_bound_mib: float = DEFAULT_RSS_BOUND_MIB,
    errors_allowed: bool = False,
    check: bool = True,
    paths: Iterable[str | os.PathLike[str]] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> AsyncIterator[Scenario]:
    """The daemon for one scenario (started by conftest's `daemon` fixture, killed by it at teardown)."""
    raise_own_fd_limit()
    folder = tempfile.mkdtemp(prefix="triofwd-rel-")  # short: a socket path has 107 bytes
    try:
        sock = os.path.join(folder, "control.sock")
        daemon = start(text, "--control", sock, env=daemon_env(*paths), preexec_fn=preexec_fn)
        async with triofwd.open_control(sock) as control:
            s = Scenario(daemon, control, rss_bound_mib, errors_allowed)
            await s.baseline()
            yield s
            if check:
                summary = await s.check()
                print(summary.line(name))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def trickle(client: trio.SocketStream, data: bytes, interval: float) -> None:
    """Slowloris: send `data` one byte per `interval` until the daemon closes the connection;
    raise AssertionError if every byte went through."""
    for byte in data:
        try:
            await client.send_all(bytes([byte]))
        except trio.BrokenResourceError:
            return
        with trio.move_on_after(interval):
            if await receive_all(client) == b"":
                return
    raise AssertionError(f"all {len(data)} bytes went through at one byte per {interval}s")


# -- scripted peers (trio handlers for tests.conftest.backend) -----------------------------


async def until_peer_hangs_up(stream: trio.SocketStream) -> None:
    """Hold the connection, reading nothing, until the peer closes or resets it.

    A silent target must still let go once the forwarder does: held forever, its sockets
    pile up in the process that runs it (the soak ran out of fds after 20 minutes).
    """
    while alive(stream.socket):
        await trio.sleep(PEER_POLL)


async def black_hole_target(stream: trio.SocketStream) -> None:
    """Accepts, then never reads nor answers (and lets go once the peer does)."""
    async with stream:
        await until_peer_hangs_up(stream)


def resetting_target(after: int, reply: bytes = b"") -> Callable[[trio.SocketStream], Any]:
    """Reads `after` bytes, sends `reply`, then resets (SO_LINGER 0)."""

    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await receive_exactly(stream, after)
            if reply:
                await stream.send_all(reply)
        rst_close(stream)

    return handler


def early_closing_target(after: int) -> Callable[[trio.SocketStream], Any]:
    """Reads `after` bytes and closes while the client is still sending."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await receive_exactly(stream, after)

    return handler


async def half_open_target(stream: trio.SocketStream) -> None:
    """Reads until the client's EOF, answers once, then stays open and silent (HALF_OPEN_HOLD)."""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            data = await receive_all(stream)
            await stream.send_all(b"got %d" % len(data))
            # Its peer's EOF came already, so a close would not show without writing: hold
            # for longer than any scenario's timeouts, then let go (a long soak would pile them up).
            await trio.sleep(HALF_OPEN_HOLD)



def route_file(settings: dict[str, Any] | None = None, *routes: dict[str, Any]) -> str:
    """A TOML route file from Python values (every route on 127.0.0.1, port 0 unless given)."""

    def value(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = ["[settings]", *(f"{k} = {value(v)}" for k, v in (settings or {}).items())]
    for r in routes:
        lines += ["", "[[routes]]", *(f"{k} = {value(v)}" for k, v in {"ports": [0], "bind": "127.0.0.1", **r}.items())]
    return "\n".join(lines) + "\n"
