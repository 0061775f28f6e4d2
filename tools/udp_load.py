"""UDP routes measured: datagrams per second and per CPU-second through `triofwd serve`, and
the memory of an idle session.

    python tools/udp_load.py [--flows 32] [--window 8] [--duration 5] [--size 64] [--idle 2000]
                             [--forwarder triofwd,nginx,socat]

Everything talks to 127.0.0.1. An echo target (a process of its own, a plain blocking loop)
answers every datagram; triofwd runs as `python -m triofwd serve` with one UDP route to it;
the load (this process) keeps `--window` datagrams in flight on each of `--flows` client
sockets (a session each) for `--duration` seconds. Reported: round trips per second (each is
two datagrams through triofwd), and triofwd's datagrams per CPU-second (its utime + stime
from /proc over the run). Then `--idle` more client sockets each send one datagram (one
session each, left idle), and the growth of triofwd's resident set divided by their number
is the memory per idle session. The same load goes through nginx (stream module, `listen
... udp`, one worker) and socat (UDP4-LISTEN with fork: a process per client flow) where they
are installed; their CPU is summed over every process of their session. Every process
started here is stopped by its pid (its session's members with it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
while True:
    data, peer = s.recvfrom(65536)
    s.sendto(data, peer)
"""


def cpu_seconds(sid: int) -> float:
    """utime + stime of every live process of the session `sid` (a forwarder and its children)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # the session id
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def started(argv: list[str], **kw: object) -> Iterator[subprocess.Popen[str]]:
    """A process in a session of its own; stopped (its session's members with it) on exit."""
    proc = subprocess.Popen(argv, text=True, start_new_session=True, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)  # the group is the session: the forwarder's children too
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()


def forwarder_argv(name: str, tmp: Path, listen: int, target: int, sessions: int) -> list[str] | None:
    """The command line of `name` forwarding UDP 127.0.0.1:listen to 127.0.0.1:target, or None
    where it is not installed."""
    if name == "triofwd":
        routes = tmp / "udp.toml"
        routes.write_text(
            f"[settings]\nmax_connections = {sessions}\n\n"
            f'[[routes]]\nname = "u"\nprotocol = "udp"\nports = [{listen}]\nbind = "127.0.0.1"\ntargets = ["127.0.0.1:{target}"]\n'
        )
        return [sys.executable, "-m", "triofwd", "serve", str(routes), "--log-level", "warning"]
    if name == "socat":
        socat = shutil.which("socat")
        return None if socat is None else [socat, "-T", "60", f"UDP4-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr", f"UDP4:127.0.0.1:{target}"]
    if name == "nginx":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
        if not os.path.exists(nginx):
            return None
        load = f"load_module {module};\n" if module.exists() else ""
        conf = tmp / "nginx.conf"
        conf.write_text(
            f"{load}worker_processes 1;\ndaemon off;\nmaster_process off;\nerror_log stderr error;\npid {tmp / 'nginx.pid'};\n"
            f"worker_rlimit_nofile {2 * sessions + 1024};\nevents {{ worker_connections {2 * sessions + 512}; }}\n"
            f"stream {{ server {{ listen 127.0.0.1:{listen} udp; proxy_pass 127.0.0.1:{target}; proxy_timeout 60s; }} }}\n"
        )
        return [nginx, "-c", str(conf), "-p", str(tmp)]
    raise SystemExit(f"unknown forwarder {name!r}")


def load(port: int, flows: int, window: int, duration: float, size: int) -> int:
    """Round trips completed in `duration` with `window` in flight per flow."""
    payload = b"x" * size
    socks = []
    poller = select.epoll()
    for _ in range(flows):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        socks.append(sock)
        poller.register(sock.fileno(), select.EPOLLIN)
        for _ in range(window):
            sock.send(payload)
    by_fd = {s.fileno(): s for s in socks}
    done = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        for fd, _ in poller.poll(0.5):
            sock = by_fd[fd]
            while True:
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
                done += 1
                sock.send(payload)  # keep the window full
    for sock in socks:
        sock.close()
    poller.close()
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=32)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--forwarder", default="triofwd,nginx,socat", help="comma-separated: triofwd, nginx, socat")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle + 1024)), hard))
    for name in args.forwarder.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            measure(name, Path(tmp), args)
    return 0


def measure(name: str, tmp: Path, args: argparse.Namespace) -> None:
    with started([sys.executable, "-c", ECHO], stdout=subprocess.PIPE) as echo:
        assert echo.stdout is not None
        target = int(echo.stdout.readline())
        listen = free_port()
        argv = forwarder_argv(name, tmp, listen, target, args.idle + args.flows + 100)
        if argv is None:
            print(f"{name}: not installed")
            return
        with started(argv, cwd=ROOT) as fwd:
            time.sleep(1.5)  # started: the route is bound
            load(listen, 2, 1, 0.3, args.size)  # warm up
            before = cpu_seconds(fwd.pid)
            began = time.monotonic()
            trips = load(listen, args.flows, args.window, args.duration, args.size)
            elapsed = time.monotonic() - began
            cpu = cpu_seconds(fwd.pid) - before
            print(f"{name}: {args.flows} flows x {args.window} in flight, {args.size}-byte datagrams, {elapsed:.1f} s:")
            print(f"  {trips / elapsed:,.0f} round trips/s = {2 * trips / elapsed:,.0f} datagrams/s through {name}")
            per_cpu = f"{2 * trips / cpu:,.0f}" if cpu > 0 else "n/a"  # socat: its per-flow children may have exited
            print(f"  {name} CPU {cpu:.2f} s ({100 * cpu / elapsed:.0f}% of a core): {per_cpu} datagrams per CPU-second")
            if args.idle and name == "socat":
                print("  idle sessions: not measured (socat forks a process per flow)")
            elif args.idle:
                time.sleep(0.5)
                base = rss_kib(fwd.pid)
                idle = []
                for _ in range(args.idle):  # one at a time: a burst would overflow socket buffers
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.bind(("127.0.0.1", 0))
                    sock.settimeout(5)
                    sock.sendto(b"hi", ("127.0.0.1", listen))
                    sock.recv(16)
                    idle.append(sock)
                time.sleep(1.0)
                grown = rss_kib(fwd.pid) - base
                print(f"  {args.idle} idle sessions: +{grown} KiB resident, {grown / args.idle:.2f} KiB per idle session")
                for sock in idle:
                    sock.close()


if __name__ == "__main__":
    sys.exit(main())
