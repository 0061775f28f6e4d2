#!/usr/bin/env python3
"""Soak test: the real daemon under mixed traffic and faults, checked every minute.

    python tools/soak.py [--minutes 30] [--workers 24]      (make soak)

Every minute: a minute of traffic from `--workers` clients, each picking at random a
well-behaved echo exchange or a fault (client reset, half-open client, slowloris,
garbage ClientHello, connections that vanish, a target that resets / refuses / never
answers, an unresolvable target, a handler that raises, a kill over the control socket),
or a case of the feature matrix (tests/reliability/matrix.py: every action — forward,
bridge terminate / reencrypt / bridge_to, socks5, http_connect, handler, offload falling
back to forward, reject — with every keepalive mode, half-close timeout, PROXY protocol in and out, under
each fault that applies), with SIGHUP reloads every two seconds. Then the checks of tests/reliability/harness.py:
empty table, fds back to the baseline, RSS within the bound, one access-log line per
connection with its expected reason, stats totals equal to the connections made. One
line per minute; exit status 1 at the first failed check.

All traffic is on 127.0.0.1; DNS faults are injected in the daemon (names under .invalid).
"""

from __future__ import annotations

import os
import sys

# The soak drives the reliability suite's peers (tests/): the repository root first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import contextlib
import dataclasses
import json
import pathlib
import random
import signal
import ssl
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable

import trio
import trustme

import triofwd
from tests.conftest import Daemon, backend, echo, receive_all, receive_exactly, refused_address, rst_close, split
from tests.reliability import commands, matrix
from tests.reliability.harness import (
    MIB,
    Scenario,
    black_hole_target,
    daemon_env,
    half_open_target,
    raise_own_fd_limit,
    resetting_target,
    rss_bytes,
    trickle,
    write_atomically,
)
from tests.reliability.matrix_peers import UNTIMELY, Peer, TargetServer, ended_by_a_clock, free_ports, nft_stub, play
from triofwd.testing import build_client_hello

# RSS may grow this much over the baseline in the whole soak: the first minutes' high-water
# mark (the allocator keeps freed memory for reuse); a leak grows past it as minutes pass.
RSS_BOUND_MIB = 48
RELOAD_EVERY = 2.0
# What a worker picks: a feature-matrix case, one of the faults below, or a plain echo.
MATRIX_SHARE = 0.25
FAULT_SHARE = 0.3
HANDLER = '''
async def raises(stream, info):
    await stream.receive_some()
    raise RuntimeError("soak: a handler bug")
'''

Fault = Callable[[Scenario, random.Random], Awaitable[None]]


async def exchange(s: Scenario, route: str, expect: str, payload: bytes = b"hello") -> None:
    """Send, then read until the daemon closes: for every route where the daemon ends it."""
    async with await s.open(route, expect=expect) as client:
        with contextlib.suppress(trio.BrokenResourceError):
            await client.send_all(payload)
            await receive_all(client)


async def echoed(s: Scenario, rng: random.Random) -> None:
    payload = rng.randbytes(rng.choice([1, 100, 4096, 65536, 256 * 1024]))
    async with await s.open("echo", expect="normal") as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            assert await receive_exactly(client, len(payload)) == payload
        await client.send_eof()
        assert await receive_all(client) == b""


async def client_reset(s: Scenario, rng: random.Random) -> None:
    client = await s.open("echo", expect="client_reset")
    await client.send_all(rng.randbytes(8192))
    await receive_exactly(client, 1)
    rst_close(client)


async def vanished(s: Scenario, rng: random.Random) -> None:
    """Open and vanish at once, a burst at a time."""
    clients = []
    for _ in range(20):
        client = await s.open("echo", expect="normal")
        await client.send_all(b"!")
        clients.append(client)
    for client in clients:
        assert await receive_exactly(client, 1) == b"!"
        client.socket.close()


async def half_open(s: Scenario, rng: random.Random) -> None:
    async with await s.open("half", expect="half_close_timeout") as client:
        await client.send_all(b"q" * 10)
        await client.send_eof()
        assert await receive_all(client) == b"got 10"


async def slowloris(s: Scenario, rng: random.Random) -> None:
    async with await s.open("tls", expect="initial_data_timeout") as client:
        await trickle(client, build_client_hello("www.example.com"), interval=0.3)


async def garbage_hello(s: Scenario, rng: random.Random) -> None:
    await exchange(s, "tls", "no_route", rng.randbytes(rng.randint(1, 600)))


async def killed(s: Scenario, rng: random.Random) -> None:
    async with await s.open("echo", expect="killed") as client:
        await client.send_all(b"x")
        await receive_exactly(client, 1)
        host, port = client.socket.getsockname()[:2]
        [row] = await s.request("connections", route="echo", client=f"{host}:{port}")  # the port may be in use toward another listener too
        await s.request("kill", id=row["id"])
        assert await receive_all(client) == b""


class Matrix:
    """The feature matrix's cases for the soak: each its own route, run at random."""

    # Reload and shutdown are the soak's own (SIGHUP every two seconds, SIGTERM at the end).
    FAULTS = tuple(f for f in matrix.FAULTS if f not in ("reload", "shutdown"))

    def __init__(self, work: pathlib.Path, target: str) -> None:
        ca = trustme.CA()
        front = ca.issue_cert(matrix.FRONT_NAME, matrix.TARGET_NAME)
        front.private_key_and_cert_chain_pem.write_to_path(str(work / "front.pem"))
        (work / "front.key").write_bytes(front.private_key_pem.bytes())
        ca.cert_pem.write_to_path(str(work / "ca.pem"))
        self.client_tls = ssl.create_default_context()
        ca.configure_trust(self.client_tls)
        self.env = matrix.Environment(str(work / "front.pem"), str(work / "front.key"), str(work / "ca.pem"), target, "commands:handler")
        kept, _ = matrix.combos(dataclasses.replace(self.env, handler=commands.handler))
        self.cases = [c for c in matrix.cases(kept) if c.fault in self.FAULTS]
        offload = [c.name for c in self.cases if c.combo.action == "offload"]
        self.ports = dict(zip(offload, free_ports(len(offload))))
        self.addresses: dict[str, tuple[str, int]] = {}
        self.count = 0
        self.reloaded = self.shutdown = trio.Event()  # never set: no case here waits for them
        self.scenario: Scenario | None = None

    def routes(self) -> list[dict[str, object]]:
        return [matrix.route(case, self.env, self.ports.get(case.name, 0)) for case in self.cases]

    async def request(self, cmd: str, **args: object) -> object:
        assert self.scenario is not None
        return await self.scenario.request(cmd, **args)

    def arrive(self, case: matrix.Case) -> None:
        pass

    async def __call__(self, s: Scenario, rng: random.Random) -> None:
        case = rng.choice(self.cases)
        self.count += 1
        host, _, port = self.env.target.rpartition(":")
        peer = Peer(case, self.addresses[case.name], self.client_tls, self.count % 60000, (host, int(port)))
        try:
            await play(peer, self)
        except UNTIMELY:
            if not ended_by_a_clock(case):
                raise
        finally:
            if peer.client:
                s.expected.append((peer.client, frozenset([case.expected])))
            with contextlib.suppress(AttributeError):
                await peer.aclose()


FAULTS: dict[str, Fault] = {
    "client_reset": client_reset,
    "vanished": vanished,
    "half_open": half_open,
    "slowloris": slowloris,
    "garbage_hello": garbage_hello,
    "killed": killed,
    "target_reset": lambda s, rng: exchange(s, "resetting", "target_reset"),
    "refused": lambda s, rng: exchange(s, "refused", "connect_refused"),
    "silent_target": lambda s, rng: exchange(s, "silent", "inactivity_timeout"),
    "dns_error": lambda s, rng: exchange(s, "dns", "dns_error"),
    "handler_raises": lambda s, rng: exchange(s, "handler", "internal_error"),
}


def route_files(targets: dict[str, str], extra: list[dict[str, object]]) -> list[str]:
    """The soak's route file, and the same with one more route: SIGHUP flips between them."""
    routes = [
        {"name": "echo", "targets": [targets["echo"]]},
        {"name": "half", "targets": [targets["half"]], "half_close_timeout": "500ms"},
        {"name": "tls", "domains": ["www.example.com"], "targets": [targets["echo"]], "initial_data_timeout": "1s"},
        {"name": "resetting", "targets": [targets["resetting"]]},
        {"name": "refused", "targets": [targets["refused"]]},
        {"name": "silent", "targets": [targets["silent"]], "inactivity_timeout": "1s"},
        {"name": "dns", "targets": ["nonexistent.invalid:80"]},
        {"name": "handler", "action": "handler", "handler": "soak_handlers:raises"},
    ]
    routes = [{"ports": [0], "bind": "127.0.0.1", **r} for r in routes]
    routes += extra
    settings = {**matrix.settings(), "shutdown_grace": "1s"}
    return [json.dumps({"settings": settings, "routes": r}) for r in (routes, [*routes, {"name": "extra", "action": "reject", "ports": [0], "bind": "127.0.0.1"}])]


async def minute_of_traffic(s: Scenario, seconds: float, workers: int, rng: random.Random, files: list[str], faults: dict[str, Fault]) -> dict[str, int]:
    made: dict[str, int] = {}
    deadline = trio.current_time() + seconds

    async def worker(seed: int) -> None:
        own = random.Random(seed)
        while trio.current_time() < deadline:
            draw = own.random()
            name = "matrix" if draw < MATRIX_SHARE else own.choice(list(FAULTS)) if draw < MATRIX_SHARE + FAULT_SHARE else "echo"
            await (faults.get(name) or echoed)(s, own)
            made[name] = made.get(name, 0) + 1

    async def reloads() -> None:
        flip = 0
        while trio.current_time() < deadline:
            await trio.sleep(RELOAD_EVERY)
            flip ^= 1
            write_atomically(s.daemon.routefile, files[flip])
            s.daemon.signal(signal.SIGHUP)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reloads)
        for _ in range(workers):
            nursery.start_soon(worker, rng.randrange(2**32))
    write_atomically(s.daemon.routefile, files[0])
    await s.request("reload")  # the baseline's table and listeners again
    return made


async def soak(minutes: int, workers: int, seed: int, rss_bound_mib: float = RSS_BOUND_MIB) -> int:
    raise_own_fd_limit()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="triofwd-soak-") as folder, refused_address() as refused:
        work = pathlib.Path(folder)
        (work / "soak_handlers.py").write_text(textwrap.dedent(HANDLER))
        target_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        async with backend(echo) as echo_at, backend(half_open_target) as half_at, backend(resetting_target(after=0)) as reset_at, backend(black_hole_target) as silent_at, backend(server := TargetServer(target_tls)) as matrix_at:
            mix = Matrix(work, matrix_at)
            target_tls.load_cert_chain(str(work / "front.pem"), str(work / "front.key"))
            files = route_files({"echo": echo_at, "half": half_at, "resetting": reset_at, "refused": refused, "silent": silent_at}, mix.routes())
            routefile = work / "routes.json"
            routefile.write_text(files[0])
            sock = str(work / "control.sock")
            env = daemon_env(work, pathlib.Path(__file__).resolve().parent.parent / "tests" / "reliability")
            env["PATH"] = nft_stub(work) + os.pathsep + env.get("PATH", "")  # offload routes fall back to forwarding
            daemon = Daemon(routefile, "--control", sock, env=env)
            try:
                daemon.wait_log("ready", timeout=60)  # over a thousand routes: a few seconds
                daemon.wait_ready()
                mix.addresses = {c.name: ("127.0.0.1", mix.ports[c.name]) if c.name in mix.ports else split(daemon.listeners[c.name][0]) for c in mix.cases}
                async with triofwd.open_control(sock) as control:
                    s = Scenario(daemon, control, rss_bound_mib, errors_allowed=True)
                    mix.scenario = s
                    faults = {**FAULTS, "matrix": mix}
                    await s.baseline()
                    print(f"soak: {minutes} minutes, {workers} workers, seed {seed}; daemon pid {daemon.pid}, "
                          f"baseline {sum(s.base_fds.values())} fds (pipes apart), rss {s.base_rss / MIB:.1f} MiB", flush=True)  # fmt: skip
                    for minute in range(1, minutes + 1):
                        began = time.monotonic()
                        made = await minute_of_traffic(s, 55.0, workers, rng, files, faults)
                        try:
                            assert not server.errors, server.errors[:5]
                            summary = await s.check()
                            errors = [e for e in daemon.logs() if e.get("level") == "error"]
                            assert len(errors) == summary.reasons.get("internal_error", 0), "an error logged that no handler raised"
                        except AssertionError as exc:
                            print(f"minute {minute}/{minutes}: FAIL: {exc}", flush=True)
                            return 1
                        faulty = sum(n for k, n in made.items() if k != "echo")
                        print(f"minute {minute}/{minutes}: {sum(made.values())} exchanges ({faulty} faults, {made.get('matrix', 0)} matrix cases), "
                              f"{summary.connections} connections so far, fds {sum(s.fds().values())}/{sum(s.base_fds.values())}, "
                              f"rss {rss_bytes(daemon.pid) / MIB:.1f} MiB (+{summary.rss_growth_mib:.1f}), table empty, "
                              f"stats total {summary.connections}, {time.monotonic() - began:.0f}s: ok", flush=True)  # fmt: skip
                    daemon.signal(signal.SIGTERM)
                    status = await trio.to_thread.run_sync(daemon.wait, 15)
                    print(f"soak: passed; daemon exited {status}", flush=True)
                    return 0 if status == 0 else 1
            finally:
                daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--workers", type=int, default=24)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--rss-bound-mib", type=float, default=RSS_BOUND_MIB, help="how much the daemon's RSS may grow over the whole soak")
    args = parser.parse_args()
    return trio.run(soak, args.minutes, args.workers, args.seed, args.rss_bound_mib)


if __name__ == "__main__":
    sys.exit(main())
