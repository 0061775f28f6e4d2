"""The `triofwd` command: `serve` (the daemon), `check` (validate a route file: every
error it finds) and `schema` (the route file's JSON Schema, for editors).

Exit status: 0 after a clean stop or a good check; 1 for a route file that `check`
finds invalid; 2 for anything `serve` cannot start with (unreadable or invalid route
file, a port that cannot be bound), always as one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

import trio

from triofwd import __version__

from . import _systemd as systemd
from ._accesslog import AccessLogFile, LineSink
from ._addresses import format_address
from ._config import Settings, ShapeError, worker_count
from ._errors import ConfigError, ListenError
from ._log import setup_logging
from ._metrics_http import bind_metrics, serve_metrics_on, status_json
from ._offload import ruleset_text
from ._schema import schema_text
from ._server import Forwarder, serve
from ._supervisor import supervise
from ._table import compile_table, load_table
from ._upgrade import take_over
from ._worker import die_with, serve_worker, tag_logs, worker_spec
from .control import ControlServer, bind_control_socket, inspector, metrics_text

__all__ = ["main"]

log = logging.getLogger("triofwd")

EXIT_INVALID = 1  # check: the route file has errors
EXIT_CANNOT_START = 2  # serve: bad route file, busy port, bad option
# Cyclic GC thresholds of the daemon (gen 0, 1, 2); see _tune_gc.
GC_THRESHOLDS = (50_000, 20, 100)
# File descriptors kept besides two per connection: listeners, pipes for splice, logs, control.
FD_RESERVE = 64
# How often systemd's STATUS= line (the live connection count) is brought up to date.
STATUS_EVERY = 2.0
# After an upgrade (SIGUSR2) the control socket's file and the metrics port are the new
# generation's: what would remove or close them is kept here and never run, and the process
# ends with os._exit (a context manager made from a generator runs its cleanup when collected).
_HANDED_OVER: list[contextlib.ExitStack] = []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triofwd", description="A TCP forwarder on Trio.")
    parser.add_argument("--version", action="version", version=f"triofwd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the forwarder in the foreground")
    s.add_argument("routefile")
    s.add_argument("--control", metavar="PATH", help="control socket path (Unix socket, mode 0600)")
    s.add_argument("--access-log", metavar="PATH|-", help="JSON access log, one line per connection ('-': stdout)")
    s.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus text at /metrics, a status page at /")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="text", choices=["text", "json"], help="stderr log lines as text or JSON")
    sub.add_parser("inspect", help="see and steer a running daemon (triofwd inspect --help)", add_help=False)
    c = sub.add_parser("check", help="validate a route file")
    c.add_argument("routefile")
    c.add_argument("--show-nft", action="store_true", help="print the nftables ruleset offload routes would install (stdout: the ruleset alone)")
    sub.add_parser("schema", help="print the JSON Schema of the route file, for editors")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:  # its own commands and options: the inspector parses them
        return inspector.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.routefile, args.show_nft)
    if args.command == "schema":
        print(schema_text(), end="")
        return 0
    setup_logging(args.log_level, args.log_format)
    if (spec := worker_spec()) is not None:  # started by a supervisor (workers > 1)
        tag_logs(spec.number)
        die_with(spec.parent)
        _raise_fd_limit(0)  # up to the hard limit: its share of max_connections is not known yet
        _tune_gc()
        return trio.run(serve_worker, args, spec)
    try:
        # First, before anything can start a child process: the sockets are made
        # close-on-exec and LISTEN_* leave the environment.
        passed = systemd.PassedSockets(systemd.listen_fds())
        watchdog = systemd.watchdog_interval()
    except ValueError as exc:  # LISTEN_* or WATCHDOG_* malformed (systemd never writes them so)
        return _fail(str(exc))
    _tune_gc()
    try:
        code = trio.run(_serve, args, passed, watchdog)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
    if _HANDED_OVER:  # nothing of this process may remove what the new generation serves on
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def _check(path: str, show_nft: bool) -> int:
    """Validate a route file as `haproxy -c` does: every error it can find, each with its
    path, on stderr (exit 1). With --show-nft, stdout is the nftables ruleset alone (`ok` goes
    to stderr) so that `triofwd check FILE --show-nft | nft -c -f -` checks it."""
    try:
        table = load_table(path)
    except ConfigError as exc:
        for line in _every_error(exc):
            print(f"{path}: {line}", file=sys.stderr)
        return EXIT_INVALID
    if show_nft:
        print(ruleset_text(table), end="")
    print(f"ok: {len(table.routes)} routes", file=sys.stderr if show_nft else sys.stdout)
    return 0


def _every_error(exc: ConfigError) -> list[str]:
    """The errors of a route file: those of its shape, and those a compile finds in the sound
    rest of it (a file with a bad port still has its bad durations and CIDRs reported)."""
    if not isinstance(exc, ShapeError) or exc.sound is None:
        return exc.errors
    try:
        compile_table(exc.sound)
    except ConfigError as more:
        return exc.with_compile_errors(more.errors)
    return exc.errors


def _fail(message: str) -> int:
    print(f"triofwd: {message}", file=sys.stderr)
    return EXIT_CANNOT_START


def _tune_gc() -> None:
    """The daemon's start-up objects are permanent, and every new connection allocates a few
    hundred container objects: with the default gen-0 threshold (700) the cyclic collector ran
    every few connections: 12% of the daemon's time in one profile at 2k new connections/s
    (docs/profile.md)."""
    gc.freeze()  # what exists now (modules and their objects) is never scanned again
    gc.set_threshold(*GC_THRESHOLDS)


def _raise_fd_limit(max_connections: int) -> int:
    """Each connection holds two fds: raise RLIMIT_NOFILE so that `max_connections` fit.

    The soft limit goes up to the hard one, and past it where the process may (root with
    CAP_SYS_RESOURCE, within fs.nr_open). Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    # At least the hard limit: spliced connections waiting on a slow side hold a pipe (two fds
    # more), warm sockets and health checks hold their own. Past it where it must and may.
    needed = 2 * max_connections + FD_RESERVE
    for want in (needed if hard == resource.RLIM_INFINITY else max(needed, hard), hard):
        if want <= soft or want == resource.RLIM_INFINITY:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard if hard == resource.RLIM_INFINITY else max(want, hard)))
        except (ValueError, OSError):  # ValueError: not allowed to raise the hard limit
            continue
        return want
    return soft


def _warn_fd_limit(limit: int, max_connections: int, default: int) -> None:
    """One line when the open file limit cannot hold max_connections (0: no limit to check).

    A warning when the route file asks for more than fits. When max_connections is the
    default (10000) on a host whose hard limit holds fewer (20000 fds hold about 9968), it
    is information, not a fault: nobody asked for that many, and past what fits new
    connections wait in the listen backlog for a free fd.
    """
    needed = 2 * max_connections + FD_RESERVE
    if not max_connections or limit == resource.RLIM_INFINITY or limit >= needed:
        return
    fit = max(0, (limit - FD_RESERVE) // 2)
    raise_it = f"raise the hard limit (ulimit -Hn, LimitNOFILE=) to {needed}"
    if max_connections == default:
        log.info(
            "the open file limit (%d) holds about %d connections, fewer than max_connections = %d (the default); "
            "set max_connections to what you expect, or %s",
            limit, fit, max_connections, raise_it,
        )  # fmt: skip
    else:
        log.warning("the open file limit (%d) holds about %d connections, fewer than max_connections = %d; %s", limit, fit, max_connections, raise_it)


def _parse_host_port(text: str) -> tuple[str | None, int]:
    """--metrics HOST:PORT: "127.0.0.1:9100", "[::1]:9100", ":9100" (every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid --metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    return (host.strip("[]") or None), int(port)


async def _serve(args: argparse.Namespace, passed: systemd.PassedSockets, watchdog: float | None) -> int:
    try:
        table = load_table(args.routefile)
    except ConfigError as exc:
        return _fail(str(exc))
    config = table.config
    metrics_address = None
    if args.metrics:
        try:
            metrics_address = _parse_host_port(args.metrics)
        except ValueError as exc:
            return _fail(str(exc))
    fd_limit = _raise_fd_limit(config.settings.max_connections)
    access_log: LineSink | None = None
    log_file: AccessLogFile | None = None  # what SIGUSR1 reopens
    if args.access_log == "-":
        access_log = sys.stdout
    elif args.access_log:
        try:
            # Opened before anything is served, and kept as long as serve runs (reopened on SIGUSR1).
            access_log = log_file = AccessLogFile(args.access_log)
        except OSError as exc:
            return _fail(f"cannot open access log {args.access_log}: {exc.strerror or exc}")
    try:
        with (
            contextlib.ExitStack() as resources,
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals,
        ):
            # The control socket and the metrics port are bound before the forwarder's
            # ports, so that when `ready` is logged every listener is there.
            count = worker_count(config.settings.workers)
            try:
                handed = take_over()  # SIGUSR2 started this process: the running one's sockets, not bound again
                if handed is not None and count == 1:
                    return _fail("upgrade: the route file now says workers = 1; an upgrade needs workers > 1")
                if handed is not None and handed.control is not None:
                    control: trio.SocketListener | None = trio.SocketListener(trio.socket.from_stdlib_socket(handed.control))
                else:
                    control = resources.enter_context(bind_control_socket(args.control)) if args.control else None
                if handed is not None and handed.metrics:
                    metrics: list[trio.SocketListener] | None = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in handed.metrics]
                else:
                    metrics = await bind_metrics(*metrics_address) if metrics_address else None
            except ListenError as exc:
                return _fail(str(exc))
            for listener in metrics or ():
                resources.callback(listener.socket.close)
            if count > 1:
                try:
                    return await supervise(
                        args, table, count, control, metrics, signals, watchdog, handed, lambda: _HANDED_OVER.append(resources.pop_all()), passed
                    )
                except ListenError as exc:  # a port, or the offload rules: nothing has started
                    return _fail(str(exc))
            async with trio.open_nursery() as nursery:
                try:
                    fwd: Forwarder = await nursery.start(lambda task_status: serve(table, access_log=access_log, passed=passed, task_status=task_status))
                except (ListenError, ConfigError) as exc:
                    return _fail(str(exc))
                _warn_fd_limit(fd_limit, config.settings.max_connections, Settings().max_connections)  # once serving: start-up errors stay one line
                reload = _reloader(fwd, args.routefile)
                if control is not None:
                    nursery.start_soon(ControlServer(fwd, reload=reload).serve, [control])
                if metrics is not None:
                    nursery.start_soon(serve_metrics_on, metrics, lambda: metrics_text(fwd), lambda: status_json(fwd))
                for name, sock in passed.unclaimed:  # kept open: a reload may add its route
                    log.warning("systemd passed a socket no route listens on: %s (%s)", name, _sockname(sock))
                systemd.notify("READY=1")
                nursery.start_soon(_report_status, fwd)
                if watchdog is not None:  # in this nursery: it pings through the shutdown grace too
                    nursery.start_soon(systemd.watchdog, watchdog)
                nursery.start_soon(_on_signals, fwd, signals, reload, log_file)
                await fwd.wait_stopped()
                nursery.cancel_scope.cancel()
    finally:
        if log_file is not None:
            log_file.close()
    return 0


def _sockname(sock: socket.socket) -> str:
    try:
        address = sock.getsockname()
    except OSError as exc:
        return exc.strerror or str(exc)
    return format_address(address) if isinstance(address, tuple) else repr(address)


def _status(fwd: Forwarder) -> str:
    """systemd's STATUS= line, what `systemctl status` shows."""
    state = "stopping: " if fwd.stopping else "draining: " if fwd.draining else ""
    count = len(fwd.connections)
    return f"{state}{count} connection{'' if count == 1 else 's'} open"


async def _report_status(fwd: Forwarder) -> NoReturn:
    """Keep systemd's STATUS= line current: looked at every STATUS_EVERY seconds, sent when it changed."""
    sent = ""
    while True:
        if (status := _status(fwd)) != sent:
            systemd.notify(f"STATUS={status}")
            sent = status
        await trio.sleep(STATUS_EVERY)


def _reloader(fwd: Forwarder, path: str) -> Callable[[], Awaitable[dict[str, list[str]]]]:
    """Re-read the route file and apply it: what SIGHUP and the control `reload` run.

    One at a time: a SIGHUP during a control reload waits for it rather than racing it.
    Raises ConfigError or ListenError, and the old table stays.
    """
    lock = trio.Lock()

    async def reload() -> dict[str, list[str]]:
        async with lock:
            with systemd.reloading():  # RELOADING=1 now, READY=1 when applied or refused
                return await fwd.reload(load_table(path))

    return reload


async def _on_signals(fwd: Forwarder, signals: AsyncIterator[int], reload: Callable[[], Awaitable[object]], log_file: AccessLogFile | None) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            try:
                await reload()
            except (ConfigError, ListenError) as exc:
                log.error("reload failed, the old routes stay in force: %s", exc)
        elif signum == signal.SIGUSR1:
            _reopen(log_file)
        elif not fwd.stopping:
            log.info("%s: stopping gracefully", signal.Signals(signum).name)
            fwd.shutdown()
            systemd.notify("STOPPING=1", f"STATUS={_status(fwd)}")
        else:
            log.info("%s again: closing every connection now", signal.Signals(signum).name)
            fwd.shutdown(grace=0)


def _reopen(log_file: AccessLogFile | None) -> None:
    """SIGUSR1: open the access log anew at its path (logrotate has renamed the old one)."""
    if log_file is None:
        log.info("SIGUSR1: no access log file to reopen")
        return
    try:
        log_file.reopen()
    except OSError as exc:
        log.error("cannot reopen the access log %s, still writing to the old file: %s", log_file.path, exc.strerror or exc)
        return
    log.info("access log reopened: %s", log_file.path)
