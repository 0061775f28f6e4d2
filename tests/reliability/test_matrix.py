"""The feature matrix (matrix.py) against the real `triofwd serve`, over real sockets.

Every case is one route of one daemon and one connection to it: real TLS with
certificates made here, real PROXY headers, the real handler import, and offload routes
where nft is unavailable (a stub `nft` that says "Operation not permitted" comes first on
the daemon's PATH), so they fall back to forwarding. The far end is one target server in
this process that reads the hop's PROXY header, terminates TLS where the bytes are TLS, and
speaks commands.py.

The cases run side by side, then the reload cases' reload, then the shutdown: SIGTERM with
shutdown_grace "0" ends the shutdown cases. Checked after:
- the daemon never stopped but for the SIGTERM, and exited 0;
- every case has exactly one access-log line, on its route, with the expected reason, the
  expected client address, byte counts equal to what crossed (where a case fixes them), and
  a duration no shorter than the timeout that ended it;
- the target saw the PROXY header naming the client, where one is sent;
- before the SIGTERM: the table holds only the shutdown cases, stats count every case, and
  the daemon's fds are its baseline plus two sockets per open connection, less the
  listeners of the routes the reload removed; no error was logged.

`make test` runs the whole matrix when TRIOFWD_MATRIX_SAMPLE is unset; a sample of N cases
with TRIOFWD_MATRIX_SAMPLE=N (the seed is printed; TRIOFWD_MATRIX_SEED replays one).

It runs again with `workers = 2` (a supervisor and two worker processes, the connections
spread between them by the kernel): a sample of WORKERS_SAMPLE cases in which every fault
and every action is represented, the same checks, the fds and memory those of the workers.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import random
import signal
import ssl
import tempfile
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trustme

import triofwd
from tests.conftest import backend, fd_kinds
from tests.reliability import commands, matrix
from tests.reliability.harness import daemon_env, raise_own_fd_limit, rss_bytes
from tests.reliability.matrix_peers import UNTIMELY, Peer, TargetServer, ended_by_a_clock, free_ports, nft_stub, play
from triofwd._splice import POOL_LIMIT

HERE = pathlib.Path(__file__).resolve().parent
CONCURRENCY = 48
CASE_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0
STARTUP_TIMEOUT = 60.0
POLL = 0.05
# A sanity bound, not a leak check (the soak is that): a few hundred TLS connections are open
# at the peak here, and the memory they took stays with the process as its high-water mark.
RSS_BOUND_MIB = 256
# The cases of the run with two worker processes (every fault and action among them).
WORKERS_SAMPLE = 400


def _sample_size() -> int | None:
    text = os.environ.get("TRIOFWD_MATRIX_SAMPLE", "")
    return int(text) if text.strip() else None


class Run:
    """One daemon serving every case, and what the cases wait for from each other."""

    def __init__(
        self,
        daemon: Any,
        control: triofwd.ControlClient,
        cases: list[matrix.Case],
        addresses: dict[str, tuple[str, int]],
        tls: ssl.SSLContext,
        destination: tuple[str, int],
    ) -> None:
        self.daemon = daemon
        self.destination = destination  # the target server, as socks5 / http_connect clients ask for it
        self.control = control
        self.cases = cases
        self.addresses = addresses
        self.tls = tls
        self.peers: dict[str, Peer] = {}
        self.failures: list[str] = []
        self.arrived: set[str] = set()
        self.reload_waiting = 0
        self.reload_due = sum(1 for c in cases if c.fault == "reload")
        self.reload_ready = trio.Event()
        self.reloaded = trio.Event()
        self.shutdown = trio.Event()
        self.waiting_shutdown = 0
        self.shutdown_ready = trio.Event()
        self.shutdown_due = sum(1 for c in cases if c.fault == "shutdown")

    async def case(self, index: int, case: matrix.Case) -> None:
        """Run one case's script; a failure is noted (all are reported at the end), never raised."""
        peer = self.peers[case.name] = Peer(case, self.addresses[case.name], self.tls, index, self.destination)
        try:
            with trio.fail_after(CASE_TIMEOUT):
                try:
                    await play(peer, self)
                except UNTIMELY:
                    if not ended_by_a_clock(case):
                        raise
        except Exception as exc:
            self.failures.append(f"{case.name}: {exc!r}")
        finally:
            self.arrive(case)  # a failed case must not keep the others waiting
            with contextlib.suppress(AttributeError):
                await peer.aclose()

    async def request(self, cmd: str, **args: Any) -> Any:
        return await self.control.request(cmd, **args)

    def arrive(self, case: matrix.Case) -> None:
        """The case is at its barrier (reload, shutdown), or will never get there."""
        if case.name in self.arrived or case.fault not in ("reload", "shutdown"):
            return
        self.arrived.add(case.name)
        if case.fault == "reload":
            self.reload_waiting += 1
            if self.reload_waiting == self.reload_due:
                self.reload_ready.set()
        else:
            self.waiting_shutdown += 1
            if self.waiting_shutdown == self.shutdown_due:
                self.shutdown_ready.set()

# -- the test ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, pathlib.Path]:
    folder = tmp_path_factory.mktemp("matrix-certs")
    ca = trustme.CA()
    front = ca.issue_cert(matrix.FRONT_NAME)
    front.private_key_and_cert_chain_pem.write_to_path(str(folder / "front.pem"))
    (folder / "front.key").write_bytes(front.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return ca, folder


def _route_file(
    cases: list[matrix.Case], env: matrix.Environment, ports: dict[str, int], change: Callable[[matrix.Case], str] | None = None, workers: int = 1
) -> str:
    routes = []
    for case in cases:
        what = change(case) if change else "keep"
        if what == "remove":
            continue
        spec = matrix.route(case, env, ports.get(case.name, 0))
        if what == "change":
            spec["inactivity_timeout"] = "31s"  # a new spec for the route: live connections keep the old one
        routes.append(spec)
    return json.dumps({"settings": {**matrix.settings(), "workers": workers}, "routes": routes}, indent=1)


def _reload_change(case: matrix.Case) -> str:
    """Half the reload cases' routes are removed by the reload, half changed."""
    if case.fault != "reload":
        return "keep"
    return "remove" if zlib.crc32(case.name.encode()) % 2 else "change"


def _fds_of(pids: list[int]) -> collections.Counter[str]:
    return sum((_sockets_and_others(pid) for pid in pids), collections.Counter())


def _sockets_and_others(pid: int) -> collections.Counter[str]:
    kinds = fd_kinds(pid)
    assert kinds["pipe"] <= 2 * POOL_LIMIT, kinds
    del kinds["pipe"]
    return kinds


@pytest.mark.parametrize("workers", [1, 2])
async def test_feature_matrix(daemon: Callable[..., Any], certificates: tuple[trustme.CA, pathlib.Path], tmp_path: pathlib.Path, workers: int) -> None:
    """Every combination of action, keepalive, half_close_timeout, proxy_protocol and
    accept_proxy_protocol (pruned only where check refuses it) under every fault that
    applies: one access-log line each, with the expected reason; nothing leaks; the daemon
    never stops."""
    raise_own_fd_limit()
    ca, certs = certificates
    target_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(matrix.FRONT_NAME, matrix.TARGET_NAME).configure_cert(target_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    server = TargetServer(target_tls)
    async with backend(server) as target:
        code_env = matrix.Environment(str(certs / "front.pem"), str(certs / "front.key"), str(certs / "ca.pem"), target, commands.handler)
        kept, refused = matrix.combos(code_env)
        everything = matrix.cases(kept)
        seed = int(os.environ.get("TRIOFWD_MATRIX_SEED") or random.randrange(2**32))
        size = _sample_size()
        if workers > 1:
            size = min(size or WORKERS_SAMPLE, WORKERS_SAMPLE)
        cases = matrix.sample(everything, size, seed)
        print("\n".join(matrix.summary(kept, refused, cases)))
        print(f"feature matrix: {len(cases)} of {len(everything)} cases, seed {seed} (TRIOFWD_MATRIX_SEED={seed} replays it)")
        assert len({c.name for c in everything}) == len(everything)
        env = matrix.Environment(code_env.cert, code_env.key, code_env.ca, target, "commands:handler")
        offload = [c.name for c in cases if c.combo.action == "offload"]
        ports = dict(zip(offload, free_ports(len(offload))))
        text = _route_file(cases, env, ports, workers=workers)
        environ = daemon_env(HERE)
        environ["PATH"] = nft_stub(tmp_path) + os.pathsep + environ.get("PATH", "")
        with tempfile.TemporaryDirectory(prefix="triofwd-mx-") as folder:  # short: a socket path has 107 bytes
            sock = os.path.join(folder, "control.sock")
            d = daemon(text, "--control", sock, suffix=".json", env=environ, ready=False)  # the fixture kills it at teardown
            # A route file of over a thousand routes, a third with TLS, takes a few seconds to load.
            ready = await trio.to_thread.run_sync(lambda: _ready(d, workers))
            d.listeners = ready["listeners"]
            async with triofwd.open_control(sock) as control:
                await _run(d, control, cases, env, ports, client_tls, server, ready.get("pids", [d.pid]))


def _ready(d: Any, workers: int) -> dict[str, Any]:
    """The daemon's `ready` line: the process's, or with workers the supervisor's (every
    worker is ready then; its `pids` are theirs)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        # A route file of over a thousand routes, a third with TLS, takes a few seconds to load.
        for entry in d.wait_log("ready", timeout=STARTUP_TIMEOUT):
            if workers == 1 or ("pids" in entry and "worker" not in entry):
                return dict(entry)
        time.sleep(POLL)
    raise AssertionError(f"not ready within {STARTUP_TIMEOUT}s")


async def _run(
    d: Any,
    control: triofwd.ControlClient,
    cases: list[matrix.Case],
    env: matrix.Environment,
    ports: dict[str, int],
    client_tls: ssl.SSLContext,
    server: TargetServer,
    pids: list[int],
) -> None:
    """`pids`: the processes that serve (the daemon, or its workers), whose fds and memory are checked."""
    addresses = {c.name: ("127.0.0.1", ports[c.name]) if c.name in ports else _split(d.listeners[c.name][0]) for c in cases}
    base_fds = _fds_of(pids)
    base_rss = {pid: rss_bytes(pid) for pid in pids}
    run = Run(d, control, cases, addresses, client_tls, _split(env.target))
    started = time.monotonic()
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def one(index: int, case: matrix.Case) -> None:
        if case.fault in ("reload", "shutdown"):  # they wait for each other: never for a slot
            await run.case(index, case)
            return
        async with limiter:
            await run.case(index, case)

    async with trio.open_nursery() as nursery:
        for index, case in enumerate(cases):
            nursery.start_soon(one, index, case)
        if run.reload_due:
            with trio.fail_after(SETTLE_TIMEOUT + CASE_TIMEOUT):
                await run.reload_ready.wait()
            pathlib.Path(d.routefile).write_text(_route_file(cases, env, ports, change=_reload_change, workers=len(pids)))
            change = await control.request("reload")
            assert len(change["removed"]) + len(change["changed"]) == run.reload_due, change
        run.reloaded.set()
        # Everything but the shutdown cases ends; then the daemon's state is checked.
        shutdown_names = {c.name for c in cases if c.fault == "shutdown"}
        others = len(cases) - len(shutdown_names)
        with trio.fail_after(SETTLE_TIMEOUT + 2 * CASE_TIMEOUT):
            if run.shutdown_due:
                await run.shutdown_ready.wait()
            while len(d.access_records()) < others:
                await trio.sleep(POLL)
            while len(rows := await control.request("connections")) > len(shutdown_names):
                await trio.sleep(POLL)
        assert {r["route"] for r in rows} == shutdown_names and len(rows) == len(shutdown_names), rows
        stats = await control.request("stats")
        assert stats["total"] == len(cases) and stats["active"] == len(shutdown_names), stats
        assert sum(stats["terminations"].values()) == others, stats["terminations"]
        removed = sum(1 for c in cases if _reload_change(c) == "remove")
        fds = _fds_of(pids)
        expected_fds = base_fds.copy()
        # An open connection holds its client's socket, and its target's where it dialed one;
        # a removed route's listener was a socket in every serving process.
        expected_fds["socket"] += sum(1 + c.combo.dials for c in cases if c.fault == "shutdown") - removed * len(pids)
        assert fds == expected_fds, f"fds {dict(fds)}, expected {dict(expected_fds)} (baseline {dict(base_fds)})"
        growth = max(rss_bytes(pid) - base_rss[pid] for pid in pids)
        assert growth <= RSS_BOUND_MIB * 1024 * 1024, f"RSS grew {growth / 2**20:.1f} MiB"
        print(f"feature matrix: the serving processes' RSS grew {growth / 2**20:.1f} MiB at most")
        d.signal(signal.SIGTERM)
        run.shutdown.set()
    status = await trio.to_thread.run_sync(d.wait, 20)
    assert status == 0, d.stderr_path.read_text()[-3000:]
    assert not run.failures, f"{len(run.failures)} of {len(cases)} case scripts failed:\n" + "\n".join(run.failures[:40])
    _check_records(d, run, cases, server)
    print(f"feature matrix: {len(cases)} cases passed in {time.monotonic() - started:.1f}s")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _check_records(d: Any, run: Run, cases: list[matrix.Case], server: TargetServer) -> None:
    # A connection that never sent the bytes that pick its route is logged without one
    # (route null): it is found by its client address instead.
    by_client = {run.peers[c.name].client: c.name for c in cases if c.fault == "initial_data_timeout"}
    records: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for record in d.access_records():
        records[record["route"] or by_client.get(record["client"], "")].append(record)
    logs = d.logs()
    errors = [e for e in logs if e.get("level") == "error"]
    assert not errors, errors[:5]
    assert not server.errors, server.errors[:5]
    warned = collections.Counter(int(e["msg"].split()[1]) for e in logs if "(keepalive extended)" in e.get("msg", ""))
    problems = []
    for case in cases:
        peer = run.peers[case.name]
        lines = records.pop(case.name, [])
        if len(lines) != 1:
            problems.append(f"{case.name}: {len(lines)} access-log lines")
            continue
        [line] = lines
        problems += [f"{case.name}: {p}" for p in _line_problems(case, peer, line, warned, server.record)]
    assert not records, f"lines for no case: {list(records)[:5]}"
    assert not problems, f"{len(problems)} of {len(cases)} cases wrong:\n" + "\n".join(problems[:40])


def _line_problems(case: matrix.Case, peer: Peer, line: dict[str, Any], warned: collections.Counter[int], record: commands.Record) -> list[str]:
    combo, fault = case.combo, case.fault
    problems = []
    if line["reason"] != case.expected:
        problems.append(f"reason {line['reason']}, expected {case.expected}")
    if line["client"] != peer.client:
        problems.append(f"client {line['client']}, expected {peer.client}")
    if line["duration_ms"] < matrix.lower_bound(case) * 1000:
        problems.append(f"ended after {line['duration_ms']} ms, before its timeout of {matrix.lower_bound(case)} s")
    extended_idle = combo.keepalive == "extended" and fault == "inactivity"
    if warned[line["id"]] != (1 if extended_idle else 0):
        problems.append(f"{warned[line['id']]} keepalive-extended warnings (the line: {line})")
    if fault in ("normal", "target_half_close", "reload") or (fault == "client_half_close" and not combo.tls):
        if combo.action in ("terminate", "reencrypt"):  # counted as plaintext, on both sides of the terminator
            want = (peer.sent, peer.received)
        else:
            want = (peer.raw.sent - peer.header_bytes, peer.raw.received - peer.answer_bytes)
        if (line["bytes_in"], line["bytes_out"]) != want:
            problems.append(f"bytes in/out {line['bytes_in']}/{line['bytes_out']}, expected {want[0]}/{want[1]}")
    sends_header = combo.proxy or combo.action == "bridge_to"
    # A case a clock ended may have ended before its command reached the target.
    reached_target = combo.dials and fault != "initial_data_timeout" and not (ended_by_a_clock(case) and case.name not in record.headers)
    if reached_target and sends_header:
        header = record.headers.get(case.name)
        seen = None if header is None else "%s:%d" % header.source
        if seen != peer.client:
            problems.append(f"the target's PROXY header named {seen}, expected {peer.client}")
    if fault == "target_half_close" and combo.action in ("forward", "offload") and record.after_halfclose.get(case.name) != b"more":
        problems.append(f"after its half-close the target read {record.after_halfclose.get(case.name)!r}, expected b'more'")
    return problems
