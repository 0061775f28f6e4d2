"""Side-by-side benchmark of triofwd and the forwarders users would pick instead.

    python tools/bench.py [--quick] [--only triofwd,haproxy] [--duration S] [--runs R] [--idle N]
                          [--measure bulk,http,idle,tls,udp] [--udp-flows F] [--triofwd-at REV]
                          [--json PATH] [--no-pin]
    python tools/bench.py --measure udp          # the UDP group alone (triofwd, nginx, socat)

`make bench` installs the tools first (tools/bench_setup.sh) and runs this with the defaults.

Everything talks to 127.0.0.1. The backends are an iperf3 server (bulk), nginx answering
`200 ok` with keep-alive (HTTP; tools/demo_backend.py when nginx is missing), an idle
listener inside this process (memory) and a UDP echo target (tools/udp_load.py echo). Each
forwarder runs as one process (socat: one per connection or UDP flow, as it is used) in front
of them, started fresh for every group of measurements:

  bulk 1 / 8 streams   iperf3 -c ... -t DURATION [-P 8], receiver's rate, GB/s = 10^9 bytes/s
  keep-alive req/s     wrk -t2 -c64 -d DURATION --latency (p99 from its latency distribution)
  new conn/s           the same wrk run with "Connection: close": every request is a new TCP
                       connection through the forwarder and a new one to the backend
  TLS keep-alive req/s the keep-alive run over https://, the forwarder terminating TLS
  KiB / idle conn      N connections opened through the forwarder to the idle listener, one
                       byte passed each way on each, then the growth of the forwarder's
                       proportional set size (Pss, /proc/PID/smaps_rollup, summed over its
                       session: nginx's workers, socat's children) divided by N; measured on
                       a process that has served nothing else yet
  UDP datagrams/s      tools/udp_load.py load: --udp-flows (64) flows (a client socket each, a
                       session each in the forwarder), one datagram of 64 bytes in flight per flow (send, wait
                       for the echo, send the next), for DURATION; datagrams through the
                       forwarder per second, each way counted (2 per round trip); p99 of the
                       round trips; the generator's and the echo target's own CPU shares too
  KiB / idle UDP sess  N flows each make one round trip through a fresh forwarder and are left
                       idle (sessions held: 1 h inactivity limits), then the growth of the
                       forwarder's Pss (as for KiB / idle conn) divided by N

Every measurement is repeated --runs times and the median reported; the runs go round the
forwarders in turn (order rotated each round) so the machine's noise falls on all of them
alike. With two or more CPUs the forwarder is pinned to the last CPU and everything else
(load generators, backends, this script) to the others, so the forwarder has a core of its
own. A "direct" row (load generator straight to the backend) shows the ceiling of the rig.

`--triofwd-at REV` adds a row for triofwd as it was at a git revision (extracted with git
archive into the scratch dir), to compare a change with what came before in the same run.

A forwarder or tool that is missing is reported "n/a" with the reason. Every process this
script starts gets its own session and is stopped by its id (its session's members by
theirs) when its measurement ends, and in any case on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from udp_load import client_address  # tools/, this script's directory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCALHOST = "127.0.0.1"

FORWARDERS = ["triofwd", "triofwd_2_workers", "haproxy", "nginx", "socat", "plain_trio", "asyncio_uvloop", "trio_engine_prototype"]
ROWS = ["direct", *FORWARDERS]
METRICS = {  # key: (column title, unit, higher is better)
    "bulk1": ("1 stream GB/s", "GB/s", True),
    "bulk8": ("8 streams GB/s", "GB/s", True),
    "rps": ("keep-alive req/s", "req/s", True),
    "p99": ("keep-alive p99 ms", "ms", False),
    "cps": ("new conn/s", "conn/s", True),
    "idle": ("KiB / idle conn", "KiB", False),
    "tls": ("TLS keep-alive req/s", "req/s", True),
    "udp": ("UDP datagrams/s", "datagrams/s", True),
    "udp_p99": ("UDP p99 ms", "ms", False),
    "udp_idle": ("KiB / idle UDP session", "KiB", False),
}
# The same throughputs divided by the forwarder's CPU share during the measurement: work per
# second of the forwarder's own CPU time. On a shared machine, where other work takes the
# forwarder's core now and then, these move much less between runs than the rates above.
PER_CPU = {  # key: (column title, metric, its CPU share key)
    "bulk1": ("1 stream GB per CPU-s", "bulk1_cpu"),
    "bulk8": ("8 streams GB per CPU-s", "bulk8_cpu"),
    "rps": ("keep-alive req per CPU-s", "rps_cpu"),
    "cps": ("new conn per CPU-s", "cps_cpu"),
    "tls": ("TLS req per CPU-s", "tls_cpu"),
    "udp": ("UDP datagrams per CPU-s", "udp_cpu"),
}
GROUPS = {"idle": ["idle"], "bulk": ["bulk1", "bulk8"], "http": ["rps", "p99", "cps"], "tls": ["tls"],
          "udp": ["udp", "udp_p99", "udp_idle"]}  # fmt: skip

HTTP_CONNECTIONS = 64
UDP_FLOWS = 64  # as many flows as wrk's keep-alive connections: the two rows compare
UDP_SIZE = 64  # bytes per datagram: a small query and its answer
UDP_IDLE_TIMEOUT = 3600  # seconds: every forwarder holds an idle UDP session this long
WRK_THREADS = 2
PARALLEL_STREAMS = 8
START_TIMEOUT = 10.0  # a forwarder or backend must be listening within this
STOP_GRACE = 3.0  # SIGTERM, then this long, then SIGKILL
FD_RESERVE = 256  # fds this script keeps for itself besides the idle connections
DEFAULT_JSON = Path(tempfile.gettempdir()) / "triofwd-bench" / "results.json"

# The performance goals, checked at the end: (metric, other row, factor, basis). triofwd's
# median must be >= factor x the other row's (for p99, lower is better: <= factor x), per
# second of the forwarder's own CPU ("cpu") or by the clock ("wall"). A row "triofwd@REV"
# (--triofwd-at) stands for "main": the goals against it are checked when one is measured.
# A fifth element names the row judged, when it is not "triofwd" (two workers against one:
# the supervisor costs nothing on the hot path).
GOALS: list[tuple[str, ...]] = [
    ("rps", "asyncio_uvloop", 1.2, "cpu"),
    ("rps", "plain_trio", 3.0, "cpu"),
    ("p99", "asyncio_uvloop", 1.0, "wall"),
    ("cps", "asyncio_uvloop", 1.0, "cpu"),
    ("bulk1", "haproxy", 1.3, "wall"),
    ("bulk8", "haproxy", 1.3, "wall"),
    ("bulk1", "triofwd@", 1.0, "cpu"),
    ("bulk8", "triofwd@", 1.0, "cpu"),
    ("tls", "triofwd@", 1.0, "cpu"),
    ("rps", "triofwd", 0.9, "cpu", "triofwd_2_workers"),
    ("cps", "triofwd", 0.9, "cpu", "triofwd_2_workers"),
]
IDLE_TARGET_KIB = 5.0
# Same-run noise on this kind of machine: a ratio within this of its goal is reported as
# "within noise" rather than met or missed.
NOISE = 0.05


class Unavailable(Exception):
    """A forwarder, backend or tool that cannot run here: reported as n/a with this reason."""


class MeasureError(Exception):
    """One measurement failed: recorded for that run, the others go on."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes: each in its own session, stopped by id.


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def session_members(sid: int, *, zombies: bool = False) -> list[int]:
    """Processes of session `sid` (a process we started with start_new_session)."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[3]) == sid and (zombies or fields[0] != "Z"):
                members.append(int(entry.name))
    return members


class Proc:
    """A process we started, its own session leader; output goes to a log file."""

    def __init__(self, name: str, argv: list[str], logdir: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = logdir / f"{name.replace('/', '_')}.{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as out:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM the leader and its session, wait, then SIGKILL whatever is left, by pid."""
        members = [self.pid] if self.alive() else []
        members += [pid for pid in session_members(self.pid) if pid != self.pid]
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and (self.alive() or session_members(self.pid)):
            time.sleep(0.05)
        for pid in ([self.pid] if self.alive() else []) + session_members(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=STOP_GRACE)


class Processes:
    """Every process the benchmark starts; `close()` stops those still running."""

    def __init__(self, logdir: Path, pin: Pinning) -> None:
        self.logdir = logdir
        self.pin = pin
        self.running: list[Proc] = []

    def start(self, name: str, argv: list[str], *, forwarder: bool = False, cwd: Path | None = None) -> Proc:
        if forwarder and self.pin.forwarder:
            argv = ["taskset", "-c", self.pin.forwarder, *argv]  # taskset execs: the pid is the forwarder's
        proc = Proc(name, argv, self.logdir, cwd)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.running:
            self.running.remove(proc)

    def close(self) -> None:
        while self.running:
            self.stop(self.running[-1])


@dataclasses.dataclass
class Pinning:
    """CPU lists for taskset: the forwarder's, and the rest (this script, load, backends)."""

    forwarder: str = ""
    others: str = ""

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled or len(cpus) < 2 or not shutil.which("taskset"):
            return cls()
        return cls(str(cpus[-1]), ",".join(map(str, cpus[:-1])))

    def apply_to_self(self) -> None:
        if self.others:
            os.sched_setaffinity(0, {int(c) for c in self.others.split(",")})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? Read from /proc, so nothing connects to it."""
    want = f"0100007F:{port:04X}"
    anywhere = f"00000000:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if fields[3] == "0A" and fields[1] in (want, anywhere):
            return True
    return False


def wait_listening(proc: Proc, port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if not proc.alive():
            raise MeasureError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        if time.monotonic() > deadline:
            raise MeasureError(f"{proc.name} not listening on {port} after {timeout:.0f}s: {proc.log_tail()}")
        time.sleep(0.02)


def udp_bound(port: int) -> bool:
    """Is a UDP socket bound to 127.0.0.1:port (or the wildcard)? Read from /proc, nothing sent."""
    want = (f"0100007F:{port:04X}", f"00000000:{port:04X}")
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] in want for line in lines)


def wait_udp_bound(proc: Proc, port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not udp_bound(port):
        if not proc.alive():
            raise MeasureError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        if time.monotonic() > deadline:
            raise MeasureError(f"{proc.name} not bound to UDP port {port} after {timeout:.0f}s: {proc.log_tail()}")
        time.sleep(0.02)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


# Rows whose port listens before they serve (a supervisor binds it, then starts its workers):
# the log line that says they serve, awaited once the port listens.
READY_LOG = {"triofwd_2_workers": "triofwd.supervisor: ready"}


def wait_logged(proc: Proc, text: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log_path.read_text(errors="replace"):
        if not proc.alive():
            raise MeasureError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        if time.monotonic() > deadline:
            raise MeasureError(f"{proc.name} did not log {text!r} after {timeout:.0f}s: {proc.log_tail()}")
        time.sleep(0.02)


def run_tool(argv: list[str], timeout: float) -> str:
    """Run a load generator to completion; its stdout."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as exc:  # run() kills the child (it is alone in its session)
        raise MeasureError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
    if done.returncode != 0 and not done.stdout.strip():
        raise MeasureError(f"{' '.join(argv[:2])} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return done.stdout


# ---------------------------------------------------------------------------------------------
# Forwarders: each a command line that listens on 127.0.0.1:port and forwards to target.


@dataclasses.dataclass
class Rig:
    """What every forwarder's command needs: a scratch dir, fd budget, python."""

    tmp: Path
    maxconn: int
    forwarder_cpus: str = ""  # the CPUs the forwarder is pinned to ("": not pinned)
    triofwd_revs: dict[str, Path] = dataclasses.field(default_factory=dict)  # "triofwd@REV" row: its tree
    python: str = sys.executable


def _need(binary: str) -> str:
    path = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.access(p, os.X_OK)), None
    )
    if not path:
        raise Unavailable(f"{binary} not installed (run tools/bench_setup.sh)")
    return path


def cmd_triofwd(rig: Rig, port: int, target: int, workers: int = 1, route: str = 'name = "bench"') -> list[str]:
    """The working tree's triofwd (run from ROOT, where `python -m triofwd` finds it first),
    one route to the target; `route`: its name and any keys of its own."""
    routes = rig.tmp / f"triofwd-{port}-{workers}.toml"
    routes.write_text(
        f"""# generated by tools/bench.py
[settings]
max_connections = {rig.maxconn}
shutdown_grace  = "1s"
workers         = {workers}

[[routes]]
{route}
ports   = [{port}]
bind    = "{LOCALHOST}"
targets = ["{LOCALHOST}:{target}"]
"""
    )
    # With workers, "ready" (an info line) says when every worker serves: READY_LOG.
    return [rig.python, "-m", "triofwd", "serve", str(routes), "--log-level", "info" if workers > 1 else "warning"]


def cmd_haproxy(rig: Rig, port: int, target: int) -> list[str]:
    binary = _need("haproxy")
    cfg = rig.tmp / f"haproxy-{port}.cfg"
    cfg.write_text(
        f"""# generated by tools/bench.py: one thread, TCP mode, splice where the kernel allows
global
    nbthread 1
    maxconn {rig.maxconn}

defaults
    mode tcp
    option splice-auto
    maxconn {rig.maxconn}
    timeout connect 10s
    timeout client 1h
    timeout server 1h

frontend bench
    bind {LOCALHOST}:{port}
    default_backend target

backend target
    server t1 {LOCALHOST}:{target}
"""
    )
    return [binary, "-db", "-f", str(cfg)]


def _nginx_module(name: str) -> Path:
    for base in ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/usr/lib64/nginx/modules"):
        if (path := Path(base) / name).exists():
            return path
    raise Unavailable(f"{name} not found (Debian: apt-get install libnginx-mod-stream)")


def _nginx_conf(rig: Rig, name: str, body: str, modules: str = "") -> list[str]:
    binary = _need("nginx")
    prefix = rig.tmp / name
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""# generated by tools/bench.py
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {2 * rig.maxconn + FD_RESERVE};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{modules}
events {{ worker_connections {2 * rig.maxconn + FD_RESERVE}; }}
{body}
"""
    )
    return [binary, "-p", f"{prefix}/", "-e", f"{prefix}/error.log", "-c", str(conf)]


def cmd_nginx(rig: Rig, port: int, target: int) -> list[str]:
    module = _nginx_module("ngx_stream_module.so")
    body = f"""stream {{
    server {{
        listen {LOCALHOST}:{port} backlog=4096;
        proxy_pass {LOCALHOST}:{target};
        proxy_connect_timeout 10s;
        proxy_timeout 1h;
    }}
}}"""
    return _nginx_conf(rig, f"nginx-stream-{port}", body, f"load_module {module};")


def cmd_socat(rig: Rig, port: int, target: int) -> list[str]:
    binary = _need("socat")
    return [binary, f"TCP-LISTEN:{port},bind={LOCALHOST},fork,reuseaddr,backlog=4096", f"TCP:{LOCALHOST}:{target}"]


def cmd_plain_trio(rig: Rig, port: int, target: int) -> list[str]:
    return [rig.python, str(HERE / "forwarders" / "plain_trio.py"), str(port), LOCALHOST, str(target)]


def cmd_asyncio_uvloop(rig: Rig, port: int, target: int) -> list[str]:
    if importlib.util.find_spec("uvloop") is None:
        raise Unavailable(f"uvloop not installed for {rig.python} (run tools/bench_setup.sh)")
    return [rig.python, str(HERE / "forwarders" / "asyncio_uvloop.py"), str(port), LOCALHOST, str(target)]


def cmd_trio_engine_prototype(rig: Rig, port: int, target: int) -> list[str]:
    """The design of triofwd's data engine without triofwd's features, in its fastest settings."""
    return [rig.python, str(HERE / "forwarders" / "engine_prototype.py"), str(port), LOCALHOST, str(target),
            "--connect", "engine", "--raw-accept"]  # fmt: skip


# TLS termination: the forwarder speaks TLS to wrk and plain HTTP to the backend, with the
# demo certificate (an ECDSA P-256 key) in every forwarder that can terminate.
CERT, KEY = ROOT / "routes" / "certs" / "demo.pem", ROOT / "routes" / "certs" / "demo.key"


def tls_triofwd(rig: Rig, port: int, target: int) -> list[str]:
    routes = rig.tmp / f"triofwd-tls-{port}.toml"
    routes.write_text(
        f"""# generated by tools/bench.py
[settings]
max_connections = {rig.maxconn}
shutdown_grace  = "1s"

[[routes]]
name    = "bench-tls"
ports   = [{port}]
bind    = "{LOCALHOST}"
action  = "bridge"
targets = ["{LOCALHOST}:{target}"]
[routes.tls]
mode = "terminate"
cert = "{CERT}"
key  = "{KEY}"
"""
    )
    return [rig.python, "-m", "triofwd", "serve", str(routes), "--log-level", "warning"]


def tls_haproxy(rig: Rig, port: int, target: int) -> list[str]:
    binary = _need("haproxy")
    pem = rig.tmp / "haproxy-tls.pem"
    pem.write_text(CERT.read_text() + KEY.read_text())
    cfg = rig.tmp / f"haproxy-tls-{port}.cfg"
    cfg.write_text(
        f"""# generated by tools/bench.py: one thread, TCP mode, TLS terminated
global
    nbthread 1
    maxconn {rig.maxconn}

defaults
    mode tcp
    maxconn {rig.maxconn}
    timeout connect 10s
    timeout client 1h
    timeout server 1h

frontend bench
    bind {LOCALHOST}:{port} ssl crt {pem}
    default_backend target

backend target
    server t1 {LOCALHOST}:{target}
"""
    )
    return [binary, "-db", "-f", str(cfg)]


def tls_nginx(rig: Rig, port: int, target: int) -> list[str]:
    module = _nginx_module("ngx_stream_module.so")
    body = f"""stream {{
    server {{
        listen {LOCALHOST}:{port} ssl backlog=4096;
        ssl_certificate {CERT};
        ssl_certificate_key {KEY};
        proxy_pass {LOCALHOST}:{target};
        proxy_connect_timeout 10s;
        proxy_timeout 1h;
    }}
}}"""
    return _nginx_conf(rig, f"nginx-tls-{port}", body, f"load_module {module};")


# UDP: each forwarder takes datagrams on 127.0.0.1:port and keeps a session per client flow
# (address and port) with a socket of its own to the echo target, held UDP_IDLE_TIMEOUT idle.


def udp_triofwd(rig: Rig, port: int, target: int, workers: int = 1) -> list[str]:
    """One `protocol = "udp"` route; `responses` unset (0): a flow's session carries every exchange."""
    return cmd_triofwd(rig, port, target, workers, f'name = "bench-udp"\nprotocol = "udp"\ninactivity_timeout = "{UDP_IDLE_TIMEOUT}s"')


def udp_triofwd_2_workers(rig: Rig, port: int, target: int) -> list[str]:
    return udp_triofwd(rig, port, target, workers=2)


def udp_nginx(rig: Rig, port: int, target: int) -> list[str]:
    """`listen ... udp`: a session per client address, as triofwd's. No proxy_responses (nor
    proxy_requests): a flow of many exchanges stays one session until proxy_timeout, where
    `proxy_responses 1` is for one query and its answer."""
    module = _nginx_module("ngx_stream_module.so")
    body = f"""stream {{
    server {{
        listen {LOCALHOST}:{port} udp;
        proxy_pass {LOCALHOST}:{target};
        proxy_timeout {UDP_IDLE_TIMEOUT}s;
    }}
}}"""
    return _nginx_conf(rig, f"nginx-udp-{port}", body, f"load_module {module};")


def udp_socat(rig: Rig, port: int, target: int) -> list[str]:
    """UDP4-LISTEN with fork: a child per client flow, connected to it, for the flow's life
    (-T: the idle limit). UDP4-RECVFROM with fork would fork a child per datagram."""
    binary = _need("socat")
    return [binary, "-T", str(UDP_IDLE_TIMEOUT), f"UDP4-LISTEN:{port},bind={LOCALHOST},fork,reuseaddr", f"UDP4:{LOCALHOST}:{target}"]


UDP_COMMANDS: dict[str, Callable[[Rig, int, int], list[str]]] = {
    "triofwd": udp_triofwd,
    "triofwd_2_workers": udp_triofwd_2_workers,
    "nginx": udp_nginx,
    "socat": udp_socat,
}
UDP_MISSING = {  # rows with no UDP forwarding: why
    "haproxy": "HAProxy (community) does not proxy UDP",
    "plain_trio": "a TCP forwarder",
    "asyncio_uvloop": "a TCP forwarder",
    "trio_engine_prototype": "a TCP forwarder",
}


def triofwd_at(rev: str, tmp: Path) -> tuple[str, Path]:
    """The triofwd package of git revision `rev`, extracted under `tmp`: (row name, its directory).

    `python -m triofwd` run with that directory as cwd imports it ahead of the editable
    install, with the same venv's dependencies; nothing in the repository is touched.
    """
    try:
        short = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        where = tmp / f"triofwd-at-{short}"
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", short, "triofwd"], capture_output=True, timeout=30, check=True)
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"bench: cannot extract triofwd at {rev!r}: {getattr(exc, 'stderr', b'') or exc}") from exc
    return f"triofwd@{short}", where


def cmd_triofwd_2_workers(rig: Rig, port: int, target: int) -> list[str]:
    """triofwd with a supervisor and two worker processes (in the forwarder's session: measured with it)."""
    return cmd_triofwd(rig, port, target, workers=2)


COMMANDS: dict[str, Callable[[Rig, int, int], list[str]]] = {
    "triofwd": cmd_triofwd,
    "triofwd_2_workers": cmd_triofwd_2_workers,
    "haproxy": cmd_haproxy,
    "nginx": cmd_nginx,
    "socat": cmd_socat,
    "plain_trio": cmd_plain_trio,
    "asyncio_uvloop": cmd_asyncio_uvloop,
    "trio_engine_prototype": cmd_trio_engine_prototype,
}
TLS_COMMANDS: dict[str, Callable[[Rig, int, int], list[str]]] = {
    "triofwd": tls_triofwd,
    "haproxy": tls_haproxy,
    "nginx": tls_nginx,
}


# ---------------------------------------------------------------------------------------------
# Backends.


def start_http_backend(procs: Processes, rig: Rig) -> tuple[int, str]:
    """nginx returning a 2-byte body with keep-alive; the demo backend if nginx is missing."""
    port = free_port()
    try:
        argv = _nginx_conf(
            rig,
            "nginx-backend",
            f"""http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {rig.tmp}/nginx-backend/body;
    proxy_temp_path {rig.tmp}/nginx-backend/proxy;
    fastcgi_temp_path {rig.tmp}/nginx-backend/fastcgi;
    uwsgi_temp_path {rig.tmp}/nginx-backend/uwsgi;
    scgi_temp_path {rig.tmp}/nginx-backend/scgi;
    server {{
        listen {LOCALHOST}:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}""",
        )
        name = "nginx"
    except Unavailable:
        argv = [rig.python, str(HERE / "demo_backend.py"), "--host", LOCALHOST, "--port", str(port)]
        name = "tools/demo_backend.py"
    proc = procs.start("http-backend", argv)
    wait_listening(proc, port)
    return port, name


class Backends:
    """The targets the forwarders forward to, by measurement group, or why one is missing."""

    def __init__(self, procs: Processes, rig: Rig, groups: list[str]) -> None:
        self.procs = procs
        self.rig = rig
        self.ports: dict[str, int] = {}
        self.why: dict[str, str] = {}
        self.http_server = ""
        self.iperf: Proc | None = None
        self.idle: IdleBackend | None = None
        self.echo: Proc | None = None  # the UDP echo target
        if "bulk" in groups:
            self._try("bulk", self._start_iperf)
        if "http" in groups or "tls" in groups:
            self._try("http", self._start_http)
            if "http" in self.ports:
                self.ports["tls"] = self.ports["http"]  # plain HTTP behind the forwarder's TLS
            elif "http" in self.why:
                self.why["tls"] = self.why["http"]
        if "idle" in groups:
            self.idle = IdleBackend()
            self.ports["idle"] = self.idle.port
        if "udp" in groups:
            self._try("udp", self._start_echo)

    def _try(self, group: str, start: Callable[[], None]) -> None:
        try:
            start()
        except (Unavailable, MeasureError) as exc:
            self.why[group] = f"backend: {exc}"
            log(f"{group}: no backend: {exc}")

    def _start_iperf(self) -> None:
        binary = _need("iperf3")
        port = free_port()
        self.iperf = self.procs.start("iperf3-server", [binary, "-s", "-B", LOCALHOST, "-p", str(port)])
        wait_listening(self.iperf, port)
        self.ports["bulk"] = port

    def restart_iperf(self) -> None:
        """After a failed client run the server may still be busy with it: start a fresh one."""
        if self.iperf is not None:
            self.procs.stop(self.iperf)
        self.ports.pop("bulk", None)
        self._try("bulk", self._start_iperf)

    def _start_echo(self) -> None:
        port = free_udp_port()
        self.echo = self.procs.start("udp-echo", [self.rig.python, str(HERE / "udp_load.py"), "echo", "--port", str(port)])
        wait_udp_bound(self.echo, port)
        self.ports["udp"] = port

    def _start_http(self) -> None:
        _need("wrk")
        self.ports["http"], self.http_server = start_http_backend(self.procs, self.rig)

    def close(self) -> None:
        if self.idle is not None:
            self.idle.close()


class IdleBackend:
    """A listener in this process that accepts connections and holds them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOCALHOST, 0))
        self.sock.listen(4096)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.error: OSError | None = None  # the last accept() failure, for the report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="idle-backend", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # ECONNABORTED, EMFILE...: note it, keep accepting
                if self._stop.is_set():
                    return
                self.error = exc
                time.sleep(0.01)
                continue
            self.accepted.append(conn)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def drop_all(self) -> None:
        conns, self.accepted = self.accepted, []
        for conn in conns:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        self.drop_all()


# ---------------------------------------------------------------------------------------------
# Measurements.


def measure_bulk(port: int, streams: int, duration: float, omit: int) -> float:
    """GB/s (10^9 bytes/s) received by the iperf3 server through `port`."""
    out = run_tool(
        ["iperf3", "-c", LOCALHOST, "-p", str(port), "-t", f"{duration:g}", "-O", str(omit),
         "-P", str(streams), "-J", "--connect-timeout", "3000"],
        timeout=duration + omit + 20,
    )  # fmt: skip
    try:
        report = json.loads(out)
    except json.JSONDecodeError as exc:
        raise MeasureError(f"iperf3 printed no JSON: {out[-200:]!r}") from exc
    if "error" in report:
        raise MeasureError(f"iperf3: {report['error']}")
    bps = report["end"]["sum_received"]["bits_per_second"]
    return bps / 8 / 1e9


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def measure_http(port: int, duration: float, close: bool, scheme: str = "http") -> dict[str, float]:
    """wrk over 64 connections: requests/s, p99 ms and error counts."""
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{HTTP_CONNECTIONS}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "2s"]  # fmt: skip
    if close:
        argv += ["-H", "Connection: close"]
    out = run_tool([*argv, f"{scheme}://{LOCALHOST}:{port}/"], timeout=duration + 20)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p99 and total):
        raise MeasureError(f"cannot read wrk's output: {out[-300:]!r}")
    errors = sum(map(int, re.findall(r"(?:connect|read|write|timeout) (\d+)", out)))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = errors + (int(non2xx.group(1)) if non2xx else 0)
    # wrk counts a read error for each connection closed by a "Connection: close" peer in
    # some versions; only refuse the number when errors dominate.
    if int(total.group(1)) == 0 or bad > int(total.group(1)):
        raise MeasureError(f"wrk: {total.group(1)} requests, {bad} errors: {out[-300:]!r}")
    return {"rps": float(rps.group(1)), "p99": _ms(p99.group(1)), "errors": float(bad)}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(sid: int) -> float:
    """CPU time (user + system) used so far by session `sid`.

    Exited children count too: a zombie's own times until it is reaped, its parent's
    cutime/cstime after (socat's children).
    """
    total = 0
    for pid in session_members(sid, zombies=True):
        if fields := _stat_fields(pid):
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK_TICKS


def cpus_busy(cpus: str) -> float:
    """Busy time of the CPUs in the list (everything but idle and iowait), seconds."""
    wanted = {f"cpu{c}" for c in cpus.split(",")} if cpus else {"cpu"}
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name in wanted:
            # user nice system idle iowait irq softirq steal: steal is time the host gave away
            total += sum(int(t) for i, t in enumerate(ticks[:8]) if i not in (3, 4))
    return total / CLOCK_TICKS


@contextlib.contextmanager
def cpu_share(proc: Proc | None, cpus: str, into: dict[str, float], key: str) -> Iterator[None]:
    """Record the forwarder's CPU use during the block as a share of one core (1.0 = a full core),
    and how busy its CPU(s) were in all (`key`_busy; with pinning, the difference is mostly
    other work on this shared machine taking the forwarder's core).

    Near 1.0 the forwarder is the bottleneck; well below with its core not busy, the load side is.
    """
    if proc is None:
        yield
        return
    c0, b0, t0 = cpu_seconds(proc.pid), cpus_busy(cpus), time.monotonic()
    yield
    elapsed = time.monotonic() - t0
    busy = cpus_busy(cpus)
    # socat's children exit when the load generator's connections close; a child reaped while
    # /proc is being read would be counted neither as itself nor in its parent's cutime.
    _wait_quiet(proc.pid)
    into[key] = round((cpu_seconds(proc.pid) - c0) / elapsed, 3)
    ncpus = len(cpus.split(",")) if cpus else (os.cpu_count() or 1)
    into[f"{key}_busy"] = round((busy - b0) / elapsed / ncpus, 3)


def _wait_quiet(sid: int, timeout: float = 2.0) -> None:
    """Until session `sid` has no zombies and kept its size for 50 ms."""
    deadline = time.monotonic() + timeout
    last = session_members(sid, zombies=True)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = session_members(sid, zombies=True)
        if len(now) == len(last) and len(now) == len(session_members(sid)):
            return
        last = now


def pss_kib(sid: int) -> int:
    """Proportional set size of every process in session `sid`, KiB."""
    total = 0
    for pid in session_members(sid):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        if m := re.search(r"^Pss:\s+(\d+) kB", text, re.M):
            total += int(m.group(1))
    return total


def _settled_pss(sid: int, timeout: float = 5.0) -> int:
    """Pss once two readings 0.3 s apart agree within 0.5%."""
    last = pss_kib(sid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = pss_kib(sid)
        if abs(now - last) <= 0.005 * max(now, 1):
            return now
        last = now
    return last


def measure_idle(proc: Proc, port: int, backend: IdleBackend, n: int) -> dict[str, float]:
    """KiB of forwarder Pss per idle connection, with one byte moved each way on each."""
    backend.drop_all()
    before = _settled_pss(proc.pid)
    clients: list[socket.socket] = []
    deadline = time.monotonic() + 30 + n / 100
    try:
        for i in range(n):
            # Keep the forwarder's accept queue short: overflowing it costs SYN retries, not memory.
            while i - len(backend.accepted) > 512:
                if time.monotonic() > deadline or not proc.alive():
                    raise MeasureError(f"forwarder accepted only {len(backend.accepted)} of {i} connections")
                time.sleep(0.005)
            s = socket.create_connection((LOCALHOST, port), timeout=10)
            s.sendall(b"x")
            clients.append(s)
        while len(backend.accepted) < n:
            if time.monotonic() > deadline or not proc.alive():
                why = f" (backend thread alive: {backend.alive()}, last accept error: {backend.error})"
                raise MeasureError(f"backend got {len(backend.accepted)} of {n} connections{why}")
            time.sleep(0.01)
        held = list(backend.accepted)
        for conn in held:
            conn.settimeout(10)
            conn.sendall(b"y")
        for conn in held:
            if conn.recv(1) != b"x":
                raise MeasureError("a byte was lost on the way to the backend")
        for s in clients:
            if s.recv(1) != b"y":
                raise MeasureError("a byte was lost on the way to the client")
        after = _settled_pss(proc.pid)
    except OSError as exc:
        raise MeasureError(f"idle connections: {exc}") from exc
    finally:
        for s in clients:
            s.close()
        backend.drop_all()
    return {"idle": (after - before) / n, "pss_before_kib": before, "pss_after_kib": after}


def measure_udp(port: int, duration: float, flows: int, proc: Proc | None, echo: Proc, rig: Rig, others: str, cpu: dict[str, float]) -> dict[str, float]:
    """tools/udp_load.py load through `port`: datagrams/s (both ways), round-trip p99, losses,
    and the CPU shares over the timed part alone: the forwarder's (into `cpu`, as cpu_share
    records it), the generator's own, the echo target's, and how busy the load's CPUs were.

    The flows are set up (a round trip each, one by one) before the timed part. The CPU times
    are read before the tool is told to go and after it says it stopped sending, and divided
    by the tool's own timed seconds: nothing else runs through the forwarder in between.
    """
    argv = [rig.python, str(HERE / "udp_load.py"), "load", str(port), "--flows", str(flows), "--size", str(UDP_SIZE),
            "--duration", f"{duration:g}", "--announce"]  # fmt: skip
    tool = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    assert tool.stdin is not None
    try:
        if _read_line(tool, 30.0) != "ready":
            raise MeasureError(f"udp_load did not set up its flows: {_tool_error(tool)}")
        fwd_cpus = rig.forwarder_cpus
        f0 = cpu_seconds(proc.pid) if proc is not None else 0.0
        b0, e0, l0 = cpus_busy(fwd_cpus), cpu_seconds(echo.pid), cpus_busy(others)
        tool.stdin.write("go\n")
        tool.stdin.flush()
        if _read_line(tool, duration + 20) != "stop":
            raise MeasureError(f"udp_load did not finish: {_tool_error(tool)}")
        b1, e1, l1 = cpus_busy(fwd_cpus), cpu_seconds(echo.pid), cpus_busy(others)
        f1 = cpu_seconds(proc.pid) if proc is not None else 0.0
        line = _read_line(tool, 20)
        try:
            report = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MeasureError(f"udp_load printed no JSON: {line[-200:]!r} {_tool_error(tool)}") from exc
    finally:
        if tool.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(tool.pid, signal.SIGKILL)
        tool.wait()
    seconds = report["seconds"]
    if not report["round_trips"]:
        raise MeasureError(f"udp_load: no round trip completed through {port} ({report['lost']} lost)")
    if proc is not None:
        cpu["udp_cpu"] = round((f1 - f0) / seconds, 3)
        cpu["udp_cpu_busy"] = round((b1 - b0) / seconds / _ncpus(fwd_cpus), 3)
    return {
        "udp": report["datagrams"] / seconds,
        "udp_p99": report["rtt_p99_ms"],
        "udp_p50": report["rtt_p50_ms"],
        "udp_lost": report["lost"],
        "udp_errors": report["errors"],
        "udp_load_cpu": round(report["cpu_s"] / seconds, 3),
        "udp_echo_cpu": round((e1 - e0) / seconds, 3),
        "udp_load_busy": round((l1 - l0) / seconds / _ncpus(others), 3),
    }


def _ncpus(cpus: str) -> int:
    return len(cpus.split(",")) if cpus else (os.cpu_count() or 1)


def _read_line(tool: subprocess.Popen[str], timeout: float) -> str:
    """The next line the tool prints, within `timeout` ("" when it ends or times out)."""
    assert tool.stdout is not None
    ready, _, _ = select.select([tool.stdout], [], [], timeout)
    return tool.stdout.readline().strip() if ready else ""


def _tool_error(tool: subprocess.Popen[str]) -> str:
    if tool.poll() is None:
        return "(still running)"
    assert tool.stderr is not None
    return f"exited {tool.returncode}: {tool.stderr.read().strip()[-300:]}"


def measure_udp_idle(proc: Proc, port: int, n: int) -> dict[str, float]:
    """KiB of forwarder Pss per idle UDP session: n flows, each from an address of its own (as
    the load's flows), makes one round trip and is left idle. One flow at a time: socat forks a
    process per new flow and must see them one by one."""
    before = _settled_pss(proc.pid)
    clients: list[socket.socket] = []
    deadline = time.monotonic() + 60 + n / 50
    try:
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            clients.append(s)
            s.settimeout(2)
            s.bind((client_address(i), 0))
            s.connect((LOCALHOST, port))
            for _ in range(3):
                s.send(b"x")
                try:
                    if s.recv(16) == b"x":
                        break
                except TimeoutError:
                    continue
            else:
                raise MeasureError(f"idle UDP sessions: no echo for flow {i + 1} of {n}")
            if time.monotonic() > deadline or not proc.alive():
                raise MeasureError(f"idle UDP sessions: {i + 1} of {n} made in time")
        after = _settled_pss(proc.pid)
    except OSError as exc:
        raise MeasureError(f"idle UDP sessions: {exc}") from exc
    finally:
        for s in clients:
            s.close()
    return {"udp_idle": (after - before) / n, "udp_pss_before_kib": before, "udp_pss_after_kib": after}


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Settings:
    duration: float
    runs: int
    idle: int
    omit: int
    rows: list[str]
    groups: list[str]
    udp_flows: int = UDP_FLOWS


class Results:
    """Per row and metric: every run's value, or the reason it is missing."""

    def __init__(self, rows: list[str]) -> None:
        self.values: dict[str, dict[str, list[float]]] = {r: {m: [] for m in METRICS} for r in rows}
        self.extra: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
        self.errors: dict[str, dict[str, str]] = {r: {} for r in rows}  # first reason per metric
        self.failures: list[dict[str, Any]] = []  # every failed measurement run

    def add(self, row: str, values: dict[str, float], run: int) -> None:
        for key, value in values.items():
            if key in METRICS:
                self.values[row][key].append(value)
        self.extra[row].append({"run": run, **values})

    def fail(self, row: str, metrics: list[str], reason: str, run: int | None = None) -> None:
        """`metrics` of `row` are missing: for good (run None: n/a) or in one run that failed."""
        for m in metrics:
            self.errors[row].setdefault(m, reason)
        if run is not None:
            self.failures.append({"row": row, "metrics": metrics, "run": run, "reason": reason})

    def failed_runs(self, row: str, metric: str, run: int | None = None) -> int:
        return sum(1 for f in self.failures if f["row"] == row and metric in f["metrics"] and run in (None, f["run"]))

    def median(self, row: str, metric: str) -> float | None:
        values = self.values[row][metric]
        return statistics.median(values) if values else None

    def per_cpu(self, row: str, metric: str) -> float | None:
        """Median over the runs of the metric divided by the forwarder's CPU share in that run."""
        share = PER_CPU[metric][1]
        values = [run[metric] / run[share] for run in self.extra[row] if run.get(share) and metric in run]
        return statistics.median(values) if values else None

    def contention(self) -> list[float]:
        """For each throughput measurement: the share of the forwarder's core that others used."""
        return [max(0.0, run[f"{share}_busy"] - run[share]) for runs in self.extra.values() for run in runs
                for _, share in PER_CPU.values() if f"{share}_busy" in run]  # fmt: skip

    def spread(self, row: str, metric: str) -> float | None:
        """(max - min) / median over the runs: the noise of that cell."""
        values = self.values[row][metric]
        med = self.median(row, metric)
        if len(values) < 2 or not med:
            return None
        return (max(values) - min(values)) / med


def run_group(
    group: str, row: str, run: int, procs: Processes, rig: Rig, cfg: Settings, results: Results, backends: Backends
) -> None:
    """One group of measurements (GROUPS) of one row, on a forwarder started for it alone."""
    metrics = GROUPS[group]
    if group in ("idle", "tls") and row == "direct":
        results.fail(row, metrics, "no forwarder")
        return
    target = backends.ports.get(group)
    if target is None:
        results.fail(row, metrics, backends.why.get(group, "no backend"))
        return
    if group == "udp" and row == "direct":
        results.fail(row, ["udp_idle"], "no forwarder")
        metrics = [m for m in metrics if m != "udp_idle"]

    def start() -> tuple[Proc | None, int]:
        """The row's forwarder, fresh, serving: (its process, the port it takes) (direct: None, the backend's)."""
        if row == "direct":
            return None, target
        udp = group == "udp"
        port = free_udp_port() if udp else free_port()
        commands = TLS_COMMANDS if group == "tls" else UDP_COMMANDS if udp else COMMANDS
        if row in rig.triofwd_revs:  # an older triofwd, run from its extracted tree
            proc = procs.start(row, commands["triofwd"](rig, port, target), forwarder=True, cwd=rig.triofwd_revs[row])
        elif row in commands:
            proc = procs.start(row, commands[row](rig, port, target), forwarder=True, cwd=ROOT)
        elif udp:
            raise Unavailable(f"does not forward UDP: {UDP_MISSING.get(row, 'not measured so here')}")
        else:
            raise Unavailable("does not terminate TLS (or not measured so here)")
        if udp:
            wait_udp_bound(proc, port)
        else:
            wait_listening(proc, port)
        if row in READY_LOG:
            wait_logged(proc, READY_LOG[row])
        return proc, port

    proc = None
    try:
        proc, port = start()
        t0 = time.monotonic()
        if group == "udp":
            values = {}
            if proc is not None:  # idle sessions on a forwarder that has served nothing yet; the load on another
                values.update(measure_udp_idle(proc, port, cfg.idle))
                procs.stop(proc)
                proc, port = start()
            assert backends.echo is not None
            cpu = {}
            values.update(measure_udp(port, cfg.duration, cfg.udp_flows, proc, backends.echo, rig, procs.pin.others, cpu))
            values.update(cpu)
            idle_note = f", {values['udp_idle']:.2f} KiB/idle session" if "udp_idle" in values else ""
            shown = (f"{values['udp']:,.0f} datagrams/s p99 {values['udp_p99']:.2f} ms{idle_note}" + _cpu_note(cpu)
                     + f" [generator {values['udp_load_cpu']:.0%}, echo {values['udp_echo_cpu']:.0%}, "
                     f"load core busy {values['udp_load_busy']:.0%}, lost {values['udp_lost']}]")  # fmt: skip
        elif group == "idle":
            assert backends.idle is not None and proc is not None
            values = measure_idle(proc, port, backends.idle, cfg.idle)
            shown = f"{values['idle']:.2f} KiB/conn"
        elif group == "bulk":
            cpu: dict[str, float] = {}
            with cpu_share(proc, rig.forwarder_cpus, cpu, "bulk1_cpu"):
                values = {"bulk1": measure_bulk(port, 1, cfg.duration, cfg.omit)}
            with cpu_share(proc, rig.forwarder_cpus, cpu, "bulk8_cpu"):
                values["bulk8"] = measure_bulk(port, PARALLEL_STREAMS, cfg.duration, cfg.omit)
            values.update(cpu)
            shown = f"{values['bulk1']:.2f} / {values['bulk8']:.2f} GB/s" + _cpu_note(cpu)
        elif group == "tls":
            cpu = {}
            with cpu_share(proc, rig.forwarder_cpus, cpu, "tls_cpu"):
                ka = measure_http(port, cfg.duration, close=False, scheme="https")
            values = {"tls": ka["rps"], "tls_p99": ka["p99"], "tls_errors": ka["errors"], **cpu}
            shown = f"{ka['rps']:.0f} req/s p99 {ka['p99']:.2f} ms" + _cpu_note(cpu)
        else:
            cpu = {}
            with cpu_share(proc, rig.forwarder_cpus, cpu, "rps_cpu"):
                ka = measure_http(port, cfg.duration, close=False)
            with cpu_share(proc, rig.forwarder_cpus, cpu, "cps_cpu"):
                cc = measure_http(port, cfg.duration, close=True)
            values = {"rps": ka["rps"], "p99": ka["p99"], "cps": cc["rps"], "cps_p99": cc["p99"],
                      "rps_errors": ka["errors"], "cps_errors": cc["errors"], **cpu}  # fmt: skip
            shown = f"{ka['rps']:.0f} req/s p99 {ka['p99']:.2f} ms, {cc['rps']:.0f} conn/s" + _cpu_note(cpu)
        if proc is not None and not proc.alive():
            raise MeasureError(f"{row} exited during the measurement: {proc.log_tail()}")
        results.add(row, values, run)
        log(f"run {run + 1} {row:<15} {group:<5} {shown}  ({time.monotonic() - t0:.1f}s)")
    except Unavailable as exc:
        results.fail(row, metrics, str(exc))
        log(f"run {run + 1} {row:<15} {group:<5} n/a: {exc}")
    except MeasureError as exc:
        results.fail(row, metrics, str(exc), run=run)
        log(f"run {run + 1} {row:<15} {group:<5} FAILED: {exc}")
    finally:
        if proc is not None:
            procs.stop(proc)
    if group == "bulk" and results.failed_runs(row, metrics[0], run):
        backends.restart_iperf()


def _cpu_note(cpu: dict[str, float]) -> str:
    """The forwarder's CPU share in each measurement, and how busy its core was in all."""
    shares = [f"{v:.0%} (core busy {cpu.get(k + '_busy', 0):.0%})" for k, v in cpu.items() if not k.endswith("_busy")]
    return f"  [forwarder CPU {' / '.join(shares)}]" if shares else ""


def raise_fd_limit(idle: int) -> int:
    """Soft RLIMIT_NOFILE to the hard limit; how many idle connections that allows (2 fds each here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    most = (hard - FD_RESERVE) // 2
    if idle > most:
        log(f"--idle {idle} needs {2 * idle + FD_RESERVE} fds, the hard limit is {hard}: using {most}")
        return most
    return idle


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for tool, argv in {"haproxy": ["haproxy", "-v"], "nginx": ["nginx", "-v"], "iperf3": ["iperf3", "-v"],
                       "wrk": ["wrk", "-v"], "socat": ["socat", "-V"]}.items():  # fmt: skip
        if _which(tool):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
                text = (out.stdout + out.stderr).strip().splitlines()
                versions[tool] = next((t for t in text if re.search(r"\d+\.\d+", t)), "")
    for module in ("trio", "uvloop"):
        with contextlib.suppress(ImportError, AttributeError):
            versions[module] = __import__(module).__version__
    return {
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "cpu": model,
        "python": platform.python_version(),
        **{f"{k}_version": v.strip() for k, v in versions.items()},
    }


def triofwd_source() -> str:
    """The commit measured, and whether triofwd/ differed from it (the tree is shared while work goes on)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "triofwd"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes in triofwd/" if dirty.stdout.strip() else "")


def _which(binary: str) -> bool:
    try:
        _need(binary)
    except Unavailable:
        return False
    return True


def _fmt(metric: str, value: float) -> str:
    if metric in ("bulk1", "bulk8"):
        return f"{value:.2f}"
    if metric in ("p99", "idle", "udp_p99", "udp_idle"):
        return f"{value:.2f}"
    return f"{value:,.0f}"


def table(results: Results, rows: list[str], metrics: list[str], *, spread: bool = False) -> str:
    head = ["forwarder", *(METRICS[m][0] for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"**{row}**" if row == "triofwd" else row]
        for m in metrics:
            value = results.median(row, m)
            if spread:
                s = results.spread(row, m)
                cells.append("" if s is None else f"{100 * s:.0f}%")
                continue
            if value is None:
                cells.append("n/a")
                continue
            base = results.median("triofwd", m) if "triofwd" in results.values else None
            ratio = f" ({value / base:.2f}x)" if base and row != "triofwd" else ""
            cells.append(_fmt(m, value) + ratio)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_cpu_table(results: Results, rows: list[str], metrics: list[str]) -> str:
    metrics = [m for m in metrics if m in PER_CPU]
    head = ["forwarder", *(PER_CPU[m][0] for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {m: results.per_cpu("triofwd", m) if "triofwd" in results.values else None for m in metrics}
    for row in rows:
        if row == "direct":
            continue
        cells = [f"**{row}**" if row == "triofwd" else row]
        for m in metrics:
            value = results.per_cpu(row, m)
            if value is None:
                cells.append("n/a")
                continue
            ratio = f" ({value / base[m]:.2f}x)" if base[m] and row != "triofwd" else ""
            cells.append(_fmt(m, value) + ratio)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def udp_load_table(results: Results, rows: list[str]) -> str:
    """Where the UDP rates' limit was: the forwarder's CPU share beside the load side's (the
    generator's own, the echo target's, and how busy their CPU was), medians over the runs."""
    head = ["forwarder", "forwarder CPU", "generator CPU", "echo target CPU", "load CPU busy", "datagrams lost"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        runs = [r for r in results.extra[row] if "udp_load_cpu" in r]
        if not runs:
            continue

        def med(key: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [r[key] for r in runs if key in r]
            return f"{statistics.median(values):.0%}" if values else "n/a"

        lost = sum(int(r["udp_lost"]) for r in runs)
        lines.append(f"| {row} | {med('udp_cpu')} | {med('udp_load_cpu')} | {med('udp_echo_cpu')} | {med('udp_load_busy')} | {lost} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def verdicts(results: Results, metrics: list[str]) -> list[str]:
    """Each goal on the `metrics` measured, with the ratio, wall-clock and per CPU-second, judged on its basis."""
    out: list[str] = []
    if "triofwd" not in results.values:
        return out
    revs = [r for r in results.values if r.startswith("triofwd@")]
    for metric, other, factor, basis, *judged_row in GOALS:
        if metric not in metrics:
            continue
        subject = judged_row[0] if judged_row else "triofwd"
        for row in revs if other == "triofwd@" else [other]:
            title = f"{METRICS[metric][0]}: {subject} {'<=' if metric == 'p99' else '>='} {factor:g}x {row} ({'per CPU-s' if basis == 'cpu' else 'wall-clock'})"
            if row not in results.values or subject not in results.values:
                if other != "triofwd@":
                    out.append(f"- {title}: not measured")
                continue
            wall = _ratio(results.median(subject, metric), results.median(row, metric))
            cpu = _ratio(results.per_cpu(subject, metric), results.per_cpu(row, metric)) if metric in PER_CPU else None
            judged = cpu if basis == "cpu" else wall
            if judged is None:
                out.append(f"- {title}: not measured")
                continue
            shown = f"wall {wall:.2f}x" if wall is not None else "wall n/a"
            if metric in PER_CPU:
                shown += f", per CPU-s {cpu:.2f}x" if cpu is not None else ", per CPU-s n/a"
            out.append(f"- {title}: {shown} -> {_judge(judged, factor, lower=metric == 'p99')}")
    idle = results.median("triofwd", "idle")
    if idle is not None:
        out.append(f"- KiB / idle conn: triofwd <= {IDLE_TARGET_KIB:g} KiB: {idle:.2f} -> {_judge(idle, IDLE_TARGET_KIB, lower=True)}")
    return out


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def _judge(value: float, goal: float, *, lower: bool = False) -> str:
    if (value <= goal) if lower else (value >= goal):
        return "met"
    if abs(value - goal) <= NOISE * goal:
        return f"NOT met (within {NOISE:.0%}: noise)"
    return "NOT met"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per measurement, 500 idle connections, 1 run")
    parser.add_argument("--only", help=f"comma-separated rows to run, of: {','.join(ROWS)}")
    parser.add_argument("--duration", type=float, help="seconds per throughput measurement (default 4)")
    parser.add_argument("--runs", type=int, help="runs per measurement; the median is reported (default 3)")
    parser.add_argument("--idle", type=int, help="idle connections, and idle UDP sessions, for the memory measurements (default 5000)")
    parser.add_argument("--triofwd-at", action="append", default=[], metavar="REV",
                        help="also measure triofwd as of git revision REV (a row 'triofwd@REV'; repeatable)")  # fmt: skip
    parser.add_argument("--udp-flows", type=int, default=UDP_FLOWS, help=f"UDP client flows, one datagram in flight each (default {UDP_FLOWS})")
    parser.add_argument("--measure", help=f"comma-separated groups to measure, of: {','.join(GROUPS)} (default all)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the forwarder and the load to separate CPUs")
    args = parser.parse_args(argv)

    rows = ROWS if not args.only else [r.strip() for r in args.only.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    tmp = Path(tempfile.mkdtemp(prefix="triofwd-bench-"))
    revs = dict(triofwd_at(rev, tmp) for rev in args.triofwd_at)
    at = rows.index("triofwd") + 1 if "triofwd" in rows else len(rows)
    rows = rows[:at] + list(revs) + rows[at:]
    groups = list(GROUPS) if not args.measure else [g.strip() for g in args.measure.split(",") if g.strip()]
    if unknown := [g for g in groups if g not in GROUPS]:
        parser.error(f"unknown groups {unknown}; choose from {','.join(GROUPS)}")
    cfg = Settings(
        duration=args.duration or (1.0 if args.quick else 4.0),
        runs=args.runs or (1 if args.quick else 3),
        idle=args.idle or (500 if args.quick else 5000),
        omit=0 if args.quick else 1,
        rows=rows,
        groups=groups,
        udp_flows=args.udp_flows,
    )
    cfg.idle = raise_fd_limit(cfg.idle)

    # A SIGTERM unwinds like Ctrl-C, so the finally below stops every process we started.
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (nohup, &)
    pin = Pinning.choose(not args.no_pin)
    pin.apply_to_self()
    procs = Processes(tmp, pin)
    rig = Rig(tmp=tmp, maxconn=cfg.idle + 1000, forwarder_cpus=pin.forwarder, triofwd_revs=revs)
    results = Results(rows)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable,
                             os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)]),
        "settings": dataclasses.asdict(cfg),
        "pinning": {"forwarder_cpus": pin.forwarder or "any", "load_and_backend_cpus": pin.others or "any"},
        "machine": machine(),
        "triofwd": triofwd_source(),
    }
    log(f"rows {','.join(rows)}; {cfg.runs} run(s) of {cfg.duration:g}s per measurement, {cfg.idle} idle connections; "
        f"forwarder on CPU {pin.forwarder or 'any'}, load and backends on CPU {pin.others or 'any'}; logs in {tmp}")  # fmt: skip
    interrupted = False
    backends: Backends | None = None
    try:
        backends = Backends(procs, rig, cfg.groups)
        meta["http_backend"] = backends.http_server
        for run in range(cfg.runs):
            order = rows[run % len(rows) :] + rows[: run % len(rows)]  # rotated: no row always first
            for row in order:
                for group in cfg.groups:
                    run_group(group, row, run, procs, rig, cfg, results, backends)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process started, then printing what was measured")
    finally:
        # Cleanup is bounded (STOP_GRACE per process); a second Ctrl-C must not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.close()
        if backends is not None:
            backends.close()
    meta["elapsed_s"] = round(time.monotonic() - started, 1)

    columns = [m for m in METRICS if any(m in GROUPS[g] for g in cfg.groups)]
    out = [table(results, rows, columns), "", "ratio = value / triofwd's value in the same column (p99 and KiB: lower is better)."]
    missing = [f"- {row}: {', '.join(METRICS[m][0] for m in ms)}: {reason}"
               for row in rows for reason in sorted(set(results.errors[row].values()))
               if (ms := [m for m, r in results.errors[row].items() if r == reason and results.median(row, m) is None])]  # fmt: skip
    if missing:
        out += ["", "n/a:", *missing]
    partial = [f"- {row}: {', '.join(METRICS[m][0] for m in GROUPS[g])}: {n} of {cfg.runs} runs failed (median of the rest)"
               for row in rows for g in cfg.groups
               if results.median(row, GROUPS[g][0]) is not None and (n := results.failed_runs(row, GROUPS[g][0]))]  # fmt: skip
    if partial:
        out += ["", "failed runs:", *partial]
    if any(results.per_cpu(r, m) is not None for r in rows for m in PER_CPU):
        out += ["", "per second of the forwarder's own CPU time (median over the runs of rate / CPU share):", "",
                per_cpu_table(results, rows, columns)]  # fmt: skip
    if udp := udp_load_table(results, rows):
        out += ["", f"UDP: CPU shares of one core during the load (medians; the forwarder on CPU {pin.forwarder or 'any'}, "
                f"the generator and the echo target on CPU {pin.others or 'any'}), and datagrams lost in all runs:", "", udp]  # fmt: skip
    if contention := results.contention():
        out += ["", "other work on the forwarder's core (its busy time minus the forwarder's share) during the "
                f"throughput measurements: median {statistics.median(contention):.0%}, max {max(contention):.0%}"]  # fmt: skip
    if cfg.runs > 1:
        out += ["", "spread over the runs, (max - min) / median:", "", table(results, rows, columns, spread=True)]
    if checks := verdicts(results, columns):
        out += ["", "goals:", *checks]
    print("\n".join(out), flush=True)

    document = {
        **meta,
        "interrupted": interrupted,
        "medians": {r: {m: results.median(r, m) for m in METRICS} for r in rows},
        "per_cpu_medians": {r: {m: results.per_cpu(r, m) for m in PER_CPU} for r in rows},
        "others_on_forwarder_core": results.contention(),
        "runs": {r: results.extra[r] for r in rows},
        "errors": results.errors,
        "failures": results.failures,
    }
    with contextlib.suppress(OSError):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        log(f"results written to {args.json}; took {meta['elapsed_s']:.0f}s")
    if results.failures or interrupted:
        log(f"logs of the processes kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
