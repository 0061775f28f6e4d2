"""Hold many connections open through triofwd at once and serve every one.

    python tools/hold.py [--connections 10000] [--json PATH]

Starts an echo backend (a child process, so its sockets do not count against this one's
open-file limit) and `python -m triofwd serve` in front of it, then:

  1. opens N client connections through the forwarder, all held open together;
  2. sends one byte on every connection and reads its echo: all N are served while all N
     are open;
  3. reads the forwarder's resident memory (RSS and Pss, /proc/PID/smaps_rollup) and its
     connection count (open fds / 2);
  4. closes them all and waits for the forwarder to be back to its fds at start.

Prints the time of each step and the memory, and writes them as JSON. The forwarder needs
two fds per connection: N is lowered, with a note, when this machine's hard RLIMIT_NOFILE
cannot hold N in one process (the forwarder logs the same at start).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCALHOST = "127.0.0.1"
DAEMON_FDS = 16  # the forwarder's fds besides its connections: stdio, epoll, listener, wakeup, pipes
STEP_TIMEOUT = 120.0

# The backend: accept everything, echo every byte; one selector loop, no thread per connection.
BACKEND = r"""
import resource, selectors, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
listener.setblocking(False)
print(listener.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        sock = key.fileobj
        if sock is listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
            continue
        try:
            data = sock.recv(65536)
        except ConnectionError:
            data = b""
        if data:
            sock.send(data)
        else:
            sel.unregister(sock)
            sock.close()
"""


def log(message: str) -> None:
    print(f"[hold {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def memory_kib(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return {k.lower(): int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in ("Rss", "Pss")}  # type: ignore[union-attr]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(what: str, check, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"hold: timed out waiting for {what}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", "-n", type=int, default=10000)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = args.connections
    fit = (hard - DAEMON_FDS) // 2  # the forwarder runs with the same hard limit
    if n > fit:
        log(f"{n} connections need {2 * n + DAEMON_FDS} fds in the forwarder; the hard limit is {hard}: holding {fit}")
        n = fit

    tmp = Path(tempfile.mkdtemp(prefix="triofwd-hold-"))
    backend = subprocess.Popen([sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, text=True)
    procs = [backend]
    clients: list[socket.socket] = []
    result: dict[str, object] = {"requested": args.connections, "connections": n, "hard_nofile": hard}
    try:
        target = int(backend.stdout.readline())  # type: ignore[union-attr]
        with socket.socket() as probe:
            probe.bind((LOCALHOST, 0))
            port = probe.getsockname()[1]
        routes = tmp / "hold.toml"
        routes.write_text(
            f'[settings]\nmax_connections = {n}\n\n[[routes]]\nname = "hold"\nports = [{port}]\n'
            f'bind = "{LOCALHOST}"\ntargets = ["{LOCALHOST}:{target}"]\n'
        )
        daemon_log = tmp / "triofwd.log"
        with open(daemon_log, "wb") as out:
            fwd = subprocess.Popen([sys.executable, "-m", "triofwd", "serve", str(routes), "--log-level", "info"],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        procs.append(fwd)
        wait_for("the forwarder's ready line", lambda: b"ready" in daemon_log.read_bytes(), 15)
        base_fds, base_mem = open_fds(fwd.pid), memory_kib(fwd.pid)

        t0 = time.monotonic()
        # Non-blocking connects, a bounded number in flight, so the backlog never overflows.
        sel = selectors.DefaultSelector()
        pending = 0
        while len(clients) < n or pending:
            while len(clients) < n and pending < 512:
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex((LOCALHOST, port))
                sel.register(sock, selectors.EVENT_WRITE)
                clients.append(sock)
                pending += 1
            for key, _ in sel.select(timeout=STEP_TIMEOUT):
                sock = key.fileobj
                if err := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise SystemExit(f"hold: connect failed: {os.strerror(err)}")
                sel.unregister(sock)
                pending -= 1
        wait_for(f"{n} connections in the forwarder", lambda: open_fds(fwd.pid) - base_fds >= 2 * n)
        opened = time.monotonic() - t0
        log(f"{n} connections open through the forwarder in {opened:.2f}s")

        t1 = time.monotonic()
        for sock in clients:
            sock.send(b"x")
            sel.register(sock, selectors.EVENT_READ)
        answered = 0
        while answered < n:
            events = sel.select(timeout=STEP_TIMEOUT)
            if not events:
                raise SystemExit(f"hold: only {answered} of {n} connections answered")
            for key, _ in events:
                if key.fileobj.recv(1) != b"x":
                    raise SystemExit("hold: a connection closed instead of echoing")
                sel.unregister(key.fileobj)
                answered += 1
        served = time.monotonic() - t1
        mem = memory_kib(fwd.pid)
        log(f"all {n} served (a byte each way on every one) in {served:.2f}s, all held open; "
            f"forwarder RSS {mem['rss'] / 1024:.1f} MiB, Pss {mem['pss'] / 1024:.1f} MiB "
            f"({(mem['pss'] - base_mem['pss']) / n:.2f} KiB Pss per connection over its idle start)")  # fmt: skip

        t2 = time.monotonic()
        for sock in clients:
            sock.close()
        clients.clear()
        wait_for("the forwarder to close every connection", lambda: open_fds(fwd.pid) <= base_fds + 2)
        closed = time.monotonic() - t2
        log(f"all closed, and the forwarder's fds back to its start, in {closed:.2f}s")
        warnings = [line for line in daemon_log.read_text(errors="replace").splitlines() if "open file limit" in line]
        result.update(
            open_s=round(opened, 3), serve_s=round(served, 3), close_s=round(closed, 3),
            rss_kib=mem["rss"], pss_kib=mem["pss"], idle_start_rss_kib=base_mem["rss"], idle_start_pss_kib=base_mem["pss"],
            pss_kib_per_connection=round((mem["pss"] - base_mem["pss"]) / n, 2), fd_limit_warning=warnings,
        )  # fmt: skip
        for line in warnings:
            log(f"forwarder: {line}")
    finally:
        for sock in clients:
            sock.close()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
