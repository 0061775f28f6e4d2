"""Helper for tests/test_offload.py, run inside a fresh network namespace.

Usage: ``unshare -n python offload_netns_helper.py SCENARIO WORKDIR`` (PYTHONPATH must
reach triofwd). It brings ``lo`` up, starts backends on 127.0.0.1 inside the namespace,
runs one scenario against the embedded ``triofwd.serve`` or the real daemon
(``python -m triofwd serve``) and prints one JSON object with what it saw; the test
asserts on it. Nothing here leaves the namespace: every address is 127.0.0.1.

Scenarios:
    embedded  offload traffic, empty connection table, kernel counters, reload (also
              under traffic, 20 times), a connection the kernel did not take (reason
              `offloaded`), normal and exceptional exit of serve()
    fallback  nft not on PATH: offload_fallback = "forward" forwards in user space with a
              warning naming the route; without it serve() raises OffloadError
    daemon    the real daemon: offload traffic, SIGHUP reload, SIGTERM, SIGKILL + restart
    loonly    a namespace with loopback addresses only: a masqueraded offload route and
              one with preserve_source_ip, both to a 127.0.0.1 target
    udp       a `protocol = "udp"` offload route: datagrams DNATed by the kernel (no
              session in triofwd), its counters, a reload to the other target, exit

Backends: each listens on 127.0.0.1:PORT, sends "PORT\\n" at once, then echoes until
EOF, so a client knows which target the kernel (or triofwd) chose.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
# An address of global scope on lo, as every real host has one on some interface: the
# masquerade rule takes its source address from one (the "loonly" scenario has none).
GLOBAL_ADDR = "10.99.0.1"
LOONLY_TIMEOUT_S = 1.5
OFFLOAD_PORT = 8001
FORWARD_PORT = 8100
TARGET_A = 9001
TARGET_B = 9002
PAYLOAD = bytes(range(256)) * 80  # 20 480 bytes
SOCKET_TIMEOUT_S = 3.0
COMMAND_TIMEOUT_S = 10.0
DAEMON_READY_S = 10.0
DAEMON_EXIT_S = 10.0
RELOADS = 200  # a delete-and-recreate update let about 1 SYN in 150-300 reloads past DNAT
EMBEDDED_TIMEOUT_S = 30.0
TABLE_LINE = "table inet triofwd"
# A table of the test's own: untracked packets skip every nat chain, so a connection to
# the offload port reaches triofwd's listener although triofwd's DNAT rule is in place.
BYPASS_RULES = f"""\
table inet bypass {{
    chain pre {{
        type filter hook prerouting priority -300; policy accept;
        tcp dport {OFFLOAD_PORT} notrack
        tcp sport {OFFLOAD_PORT} notrack
    }}
    chain out {{
        type filter hook output priority -300; policy accept;
        tcp dport {OFFLOAD_PORT} notrack
        tcp sport {OFFLOAD_PORT} notrack
    }}
}}
"""

NFT = shutil.which("nft") or "nft"  # resolved before any scenario empties PATH


def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result


def triofwd_tables() -> int:
    """How many `inet triofwd` tables exist in this namespace."""
    out = run(NFT, "list", "tables").stdout
    return sum(1 for line in out.splitlines() if line.strip() == TABLE_LINE)


def ruleset() -> str:
    """The triofwd table as nft shows it ("" if there is none)."""
    result = run(NFT, "list", "table", "inet", "triofwd", check=False)
    return result.stdout if result.returncode == 0 else ""


def kernel_counters() -> dict[str, list[int]]:
    """The route counters, read with nft itself (not through triofwd)."""
    items = json.loads(run(NFT, "-j", "list", "counters", "table", "inet", "triofwd").stdout)["nftables"]
    return {c["counter"]["name"]: [c["counter"]["packets"], c["counter"]["bytes"]] for c in items if "counter" in c}


# ------------------------------------------------------------------ backends and clients


def start_backend(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(128)

    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(SOCKET_TIMEOUT_S)
            try:
                conn.sendall(f"{port}\n".encode())
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def loop() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def _read_line(sock: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line.decode().strip()


def call(port: int, payload: bytes = PAYLOAD, timeout: float = SOCKET_TIMEOUT_S) -> dict[str, Any]:
    """Connect to 127.0.0.1:port, learn the backend's port, send payload, half-close, read the echo."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((HOST, port))
        tag = _read_line(sock)
        if not tag:
            return {"tag": "", "echo_ok": False, "error": "closed before any byte"}
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := sock.recv(65536):
            echoed += chunk
        return {"tag": tag, "echo_ok": echoed == payload, "echoed": len(echoed)}
    except OSError as exc:
        return {"tag": "", "echo_ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        sock.close()


def probe(port: int) -> str:
    """The backend's port tag, "" if the connection was closed at once, or "error: ..."."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(SOCKET_TIMEOUT_S)
    try:
        sock.connect((HOST, port))
        return _read_line(sock)
    except OSError as exc:
        return f"error: {type(exc).__name__}: {exc}"
    finally:
        sock.close()


class Lines:
    """A file-like access log for the embedded forwarder."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, text: str) -> int:
        self.lines.extend(json.loads(line) for line in text.splitlines() if line)
        return len(text)

    def flush(self) -> None:
        pass


# ------------------------------------------------------------------ embedded serve()


async def greeted_echo(port: int) -> tuple[trio.SocketStream, bytes, bytes]:  # noqa: F821 - trio is imported inside: the helper also runs without it
    """Connect, read the backend's greeting line, send PAYLOAD and read its echo; the
    connection stays open for the caller."""
    import trio

    client = await trio.open_tcp_stream(HOST, port)
    greeting = b""
    while not greeting.endswith(b"\n"):
        greeting += await client.receive_some(1)
    await client.send_all(PAYLOAD)
    echoed = b""
    while len(echoed) < len(PAYLOAD):
        echoed += await client.receive_some(65536)
    return client, greeting, echoed


def _config(target: int, **extra: Any) -> Any:
    import triofwd

    return triofwd.Config(
        routes=[
            triofwd.Route(name="off", ports=[OFFLOAD_PORT], bind=HOST, action="offload", targets=[f"{HOST}:{target}"], **extra),
            # A user-space route on the same forwarder: its connection does show up.
            triofwd.Route(name="plain", ports=[FORWARD_PORT], bind=HOST, targets=[f"{HOST}:{TARGET_A}"]),
        ]
    )


def _route_stats(fwd: Any, name: str) -> dict[str, Any]:
    route = fwd.stats()["routes"].get(name, {})
    return {key: route.get(key) for key in ("active", "total", "terminations", "offload")}


async def embedded() -> dict[str, Any]:
    import trio

    out: dict[str, Any] = {}
    access = Lines()
    with trio.fail_after(EMBEDDED_TIMEOUT_S):
        await _embedded(out, access)
    return out


async def _embedded(out: dict[str, Any], access: Lines) -> None:
    import trio

    import triofwd

    async with trio.open_nursery() as nursery:
        fwd = await nursery.start(lambda task_status: triofwd.serve(_config(TARGET_A), access_log=access, task_status=task_status))
        out["tables_running"] = triofwd_tables()
        out["counters_before"] = await fwd.read_offload_counters()

        # 1. A client through the offload port, holding its connection open while the
        # table is looked at: the kernel forwards it, triofwd never sees it.
        watched: list[dict[str, Any]] = []
        with fwd.watch() as events:
            with trio.fail_after(SOCKET_TIMEOUT_S):
                client, greeting, echoed = await greeted_echo(OFFLOAD_PORT)
            out["open_table_size"] = len(fwd.connections)
            await client.send_eof()
            with trio.fail_after(SOCKET_TIMEOUT_S):
                rest = await client.receive_some(1)
            await client.aclose()
            # The user-space route on the same forwarder, for contrast.
            out["plain"] = await trio.to_thread.run_sync(call, FORWARD_PORT)
            with trio.fail_after(SOCKET_TIMEOUT_S):
                while not access.lines:  # written after the "close" event was sent
                    await trio.sleep(0.01)
            while True:
                try:
                    watched.append(events.receive_nowait())
                except trio.WouldBlock:
                    break
        out["offload_call"] = {"tag": greeting.decode().strip(), "echo_ok": echoed == PAYLOAD, "eof_after": rest == b""}
        out["events"] = [[e["event"], e["route"]] for e in watched]
        out["table_size_after"] = len(fwd.connections)
        out["counters_after"] = await fwd.read_offload_counters()
        out["stats_off"] = _route_stats(fwd, "off")
        out["access_routes"] = [line["route"] for line in access.lines]

        # 3. Reload: the new target, and only the new one, in the kernel's table.
        out["ruleset_before_reload"] = ruleset()
        out["reload_change"] = await fwd.reload(_config(TARGET_B))
        out["ruleset_after_reload"] = ruleset()
        out["tables_after_reload"] = triofwd_tables()
        out["after_reload_call"] = await trio.to_thread.run_sync(call, OFFLOAD_PORT)

        # Atomicity: while RELOADS reloads swap the target back and forth, one thread lists
        # the tables as fast as nft answers and another keeps connecting; the table is
        # never missing and every connection reaches one of the two backends.
        stop = threading.Event()
        polls: list[int] = []
        probes: list[str] = []

        def poll_tables() -> None:
            while not stop.is_set():
                polls.append(triofwd_tables())

        def keep_connecting() -> None:
            while not stop.is_set():
                probes.append(probe(OFFLOAD_PORT))

        async with trio.open_nursery() as pollers:
            pollers.start_soon(trio.to_thread.run_sync, poll_tables)
            pollers.start_soon(trio.to_thread.run_sync, keep_connecting)
            for i in range(RELOADS):
                await fwd.reload(_config(TARGET_A if i % 2 == 0 else TARGET_B))
                await trio.sleep(0.005)
            stop.set()
        out["atomic"] = {
            "polls": len(polls),
            "table_counts": sorted(set(polls)),
            "probes": len(probes),
            "probe_results": {result: probes.count(result) for result in sorted(set(probes))},
        }
        out["ruleset_after_reloads"] = ruleset()  # the last reload (i odd) chose TARGET_B

        # Someone else deleted our table: the next reload cannot update it in place and
        # installs it whole instead (then back to TARGET_B for the steps below).
        run(NFT, "delete", "table", "inet", "triofwd")
        await fwd.reload(_config(TARGET_A))
        out["ruleset_after_outside_delete"] = ruleset()
        await fwd.reload(_config(TARGET_B))

        # 6. A connection the kernel path did not take: a table of the test's own marks
        # the port's packets untracked, so nat skips them and triofwd's listener gets it.
        run(NFT, "-f", "-", stdin=BYPASS_RULES)
        try:
            before = len(access.lines)
            out["stats_before_bypass"] = _route_stats(fwd, "off")
            started = time.monotonic()
            bypass = await trio.to_thread.run_sync(probe, OFFLOAD_PORT)
            out["bypass"] = {"result": bypass, "seconds": time.monotonic() - started}
            with trio.fail_after(SOCKET_TIMEOUT_S):
                while len(access.lines) == before:
                    await trio.sleep(0.01)
            out["bypass_access"] = access.lines[before:]
            out["bypass_stats"] = _route_stats(fwd, "off")
        finally:
            run(NFT, "delete", "table", "inet", "bypass")
        out["tables_before_exit"] = triofwd_tables()
        # 2. Normal exit of an embedding: the nursery is cancelled.
        nursery.cancel_scope.cancel()
    out["tables_after_cancel"] = triofwd_tables()

    # An exception inside the embedding's nursery removes the table too.
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(triofwd.serve, _config(TARGET_A))
            out["tables_before_error"] = triofwd_tables()
            raise KeyError("boom")
    except* KeyError:
        out["error_propagated"] = True
    out["tables_after_error"] = triofwd_tables()


# ------------------------------------------------------------------ nft unavailable


async def fallback(workdir: Path) -> dict[str, Any]:
    import trio

    import triofwd
    from triofwd import _offload

    empty = workdir / "empty-path"
    empty.mkdir()
    warnings: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("triofwd").addHandler(Capture())
    out: dict[str, Any] = {}
    saved_path = os.environ.get("PATH", "")
    os.environ["PATH"] = str(empty)  # `nft` cannot be found: as on a host without nftables
    try:
        access = Lines()
        async with trio.open_nursery() as nursery:
            fwd = await nursery.start(
                lambda task_status: triofwd.serve(_config(TARGET_A, offload_fallback="forward"), access_log=access, task_status=task_status)
            )
            out["actions"] = {r.name: r.action for r in fwd.table.routes}
            with trio.fail_after(SOCKET_TIMEOUT_S):
                client, greeting, echoed = await greeted_echo(OFFLOAD_PORT)
            out["open_table"] = [{"route": c.route, "target": c.target, "state": c.state} for c in fwd.connections.values()]
            await client.send_eof()
            with trio.fail_after(SOCKET_TIMEOUT_S):
                rest = await client.receive_some(1)
                await client.aclose()
                while not access.lines:
                    await trio.sleep(0.01)
            out["call"] = {"tag": greeting.decode().strip(), "echo_ok": echoed == PAYLOAD, "eof_after": rest == b""}
            out["access"] = access.lines
            out["counters"] = await fwd.read_offload_counters()
            nursery.cancel_scope.cancel()

        # Without the fallback: serve() refuses to start, naming the route.
        # (nursery.start raises it as is; the nursery around it wraps it in a group.)
        out["strict"] = {"raised": None}
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(triofwd.serve, _config(TARGET_A))
                nursery.cancel_scope.cancel()
        except* _offload.OffloadError as group:
            out["strict"] = {"raised": "OffloadError", "messages": [str(exc) for exc in group.exceptions]}
        out["port_free_after_refusal"] = probe(OFFLOAD_PORT).startswith("error: ConnectionRefusedError")
    finally:
        os.environ["PATH"] = saved_path
    out["warnings"] = warnings
    out["tables_after"] = triofwd_tables()
    return out


# ------------------------------------------------------------------ loopback only


async def loonly() -> dict[str, Any]:
    """Local client, 127.0.0.1 target, no address of global scope in the namespace."""
    import trio

    import triofwd

    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        fwd = await nursery.start(triofwd.serve, _config(TARGET_A, preserve_source_ip=True))
        out["preserve"] = await trio.to_thread.run_sync(call, OFFLOAD_PORT, PAYLOAD, LOONLY_TIMEOUT_S)
        await fwd.reload(_config(TARGET_A))
        out["masquerade"] = await trio.to_thread.run_sync(call, OFFLOAD_PORT, PAYLOAD, LOONLY_TIMEOUT_S)
        out["counters"] = await fwd.read_offload_counters()
        nursery.cancel_scope.cancel()
    return out


# ------------------------------------------------------------------ the real daemon


def _die_with_parent() -> None:
    # A daemon must not outlive this helper (e.g. when the test's timeout kills it).
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


ROUTEFILE = """\
[settings]
shutdown_grace = "1s"

[[routes]]
name = "off"
ports = [{offload}]
bind = "{host}"
action = "{action}"
targets = ["{host}:{target}"]

[[routes]]
name = "plain"
ports = [{forward}]
bind = "{host}"
targets = ["{host}:{plain}"]
"""


class Daemon:
    def __init__(self, workdir: Path, routefile: Path, index: int) -> None:
        self.stderr_path = workdir / f"daemon{index}.stderr"
        self.access_path = workdir / f"daemon{index}.access.jsonl"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "triofwd", "serve", str(routefile), "--log-format", "json", "--access-log", str(self.access_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            preexec_fn=_die_with_parent,
        )

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"msg": line})
        return out

    def wait_log(self, prefix: str, count: int = 1, timeout: float = DAEMON_READY_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for e in self.logs() if str(e.get("msg", "")).startswith(prefix)) >= count:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.stderr_path.read_text()}")
            time.sleep(0.02)
        raise RuntimeError(f"no {prefix!r} log line within {timeout}s: {self.stderr_path.read_text()}")

    def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(DAEMON_EXIT_S)

    def access(self) -> list[dict[str, Any]]:
        if not self.access_path.exists():
            return []
        return [json.loads(line) for line in self.access_path.read_text().splitlines() if line]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DAEMON_EXIT_S)
        self._stderr.close()


def daemon(workdir: Path) -> dict[str, Any]:
    routefile = workdir / "routes.toml"

    def write(target: int, action: str = "offload") -> None:
        routefile.write_text(ROUTEFILE.format(host=HOST, offload=OFFLOAD_PORT, forward=FORWARD_PORT, target=target, plain=TARGET_A, action=action))

    out: dict[str, Any] = {}
    started: list[Daemon] = []

    def start() -> Daemon:
        d = Daemon(workdir, routefile, len(started))
        started.append(d)
        d.wait_log("ready")
        return d

    try:
        # Traffic, SIGHUP reload, SIGTERM.
        write(TARGET_A)
        first = start()
        out["first"] = {
            "tables_running": triofwd_tables(),
            "offload_call": call(OFFLOAD_PORT),
            "plain_call": call(FORWARD_PORT),
        }
        out["first"]["counters"] = kernel_counters()
        write(TARGET_B)
        first.proc.send_signal(signal.SIGHUP)
        first.wait_log("reloaded")
        out["first"]["ruleset_after_hup"] = ruleset()
        out["first"]["after_hup_call"] = call(OFFLOAD_PORT)
        out["first"]["tables_after_hup"] = triofwd_tables()
        out["first"]["exit"] = first.stop(signal.SIGTERM)
        out["first"]["tables_after_term"] = triofwd_tables()
        out["first"]["access_routes"] = [r["route"] for r in first.access()]
        out["first"]["log_errors"] = [e for e in first.logs() if e.get("level") in ("error", "critical") or "traceback" in e]

        # SIGKILL leaves the table; a restart replaces it in one transaction; SIGTERM removes it.
        write(TARGET_A)
        killed = start()
        killed_exit = killed.stop(signal.SIGKILL)
        out["killed"] = {"exit": killed_exit, "tables_after_kill": triofwd_tables(), "stale_ruleset": ruleset()}
        write(TARGET_B)
        restarted = start()
        out["restarted"] = {
            "tables_running": triofwd_tables(),
            "ruleset": ruleset(),
            "call": call(OFFLOAD_PORT),
            "exit": restarted.stop(signal.SIGTERM),
            "tables_after_term": triofwd_tables(),
            "log_errors": [e for e in restarted.logs() if e.get("level") in ("error", "critical") or "traceback" in e],
        }

        # A crash, then a restart whose route file has no offload route any more (port
        # 8001 is now forwarded in user space to the other backend): the stale table must
        # go, or the kernel keeps sending 8001 to the old target, even after a clean stop.
        write(TARGET_A)
        start().stop(signal.SIGKILL)
        stale = {"tables_after_kill": triofwd_tables()}
        write(TARGET_B, action="forward")
        plain = start()
        stale["tables_running"] = triofwd_tables()
        stale["call"] = call(OFFLOAD_PORT)
        stale["exit"] = plain.stop(signal.SIGTERM)
        stale["tables_after_term"] = triofwd_tables()
        out["stale_without_offload"] = stale
    finally:
        for d in started:
            d.close()
    return out


# ------------------------------------------------------------------ UDP


def start_udp_backend(port: int) -> None:
    """A UDP server on 127.0.0.1:port answering each datagram with "PORT:" and the datagram."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, port))

    def loop() -> None:
        while True:
            data, peer = sock.recvfrom(65536)
            sock.sendto(f"{port}:".encode() + data, peer)

    threading.Thread(target=loop, daemon=True).start()


def udp_call(port: int, payload: bytes = b"ping") -> str:
    """Send one datagram to 127.0.0.1:port from a new socket (a new flow): the answering
    backend's port, or "error: ..." (no answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT_S)
        try:
            sock.sendto(payload, (HOST, port))
            data = sock.recv(65536)
        except OSError as exc:
            return f"error: {type(exc).__name__}: {exc}"
    tag, _, echoed = data.partition(b":")
    return tag.decode() if echoed == payload else f"error: echoed {echoed!r}"


async def udp() -> dict[str, Any]:
    import trio

    import triofwd

    def config(target: int) -> Any:
        return triofwd.Config(
            routes=[triofwd.Route(name="dns", protocol="udp", ports=[OFFLOAD_PORT], bind=HOST, action="offload", targets=[f"{HOST}:{target}"])]
        )

    out: dict[str, Any] = {}
    start_udp_backend(TARGET_A)
    start_udp_backend(TARGET_B)
    with trio.fail_after(EMBEDDED_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            fwd = await nursery.start(lambda task_status: triofwd.serve(config(TARGET_A), task_status=task_status))
            out["tables_running"] = triofwd_tables()
            out["ruleset"] = ruleset()
            out["calls"] = [await trio.to_thread.run_sync(udp_call, OFFLOAD_PORT) for _ in range(3)]
            out["sessions"] = len(fwd.connections)
            out["counters"] = await fwd.read_offload_counters()
            await fwd.reload(config(TARGET_B))
            out["after_reload"] = await trio.to_thread.run_sync(udp_call, OFFLOAD_PORT)
            out["ruleset_after_reload"] = ruleset()
            nursery.cancel_scope.cancel()
    out["tables_after_exit"] = triofwd_tables()
    return out


# ------------------------------------------------------------------ entry point


def main() -> dict[str, Any]:
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    run("ip", "link", "set", "lo", "up")
    if scenario != "loonly":
        run("ip", "addr", "add", f"{GLOBAL_ADDR}/32", "dev", "lo")
    if triofwd_tables():
        raise RuntimeError("a triofwd table exists in a fresh namespace")
    start_backend(TARGET_A)
    start_backend(TARGET_B)
    if scenario == "embedded":
        import trio

        return trio.run(embedded)
    if scenario == "fallback":
        import trio

        return trio.run(fallback, workdir)
    if scenario == "daemon":
        return daemon(workdir)
    if scenario == "loonly":
        import trio

        return trio.run(loonly)
    if scenario == "udp":
        import trio

        return trio.run(udp)
    raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    try:
        result = main()
    except BaseException:
        print(json.dumps({"error": traceback.format_exc()}))
        sys.exit(1)
    print(json.dumps(result, default=repr))
