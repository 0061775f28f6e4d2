"""The `triofwd` command: `serve` (the daemon) and `check` (validate a route file).

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
from typing import IO

import trio

from ._errors import ConfigError, ListenError
from ._log import setup_logging
from ._metrics_http import bind_metrics, serve_metrics_on
from ._offload import ruleset_text
from ._server import Forwarder, serve
from ._table import load_table
from .control import ControlServer, bind_control_socket, inspector, metrics_text

__all__ = ["main"]

log = logging.getLogger("triofwd")

EXIT_INVALID = 1  # check: the route file has errors
EXIT_CANNOT_START = 2  # serve: bad route file, busy port, bad option
# Cyclic GC thresholds of the daemon (gen 0, 1, 2); see _tune_gc.
GC_THRESHOLDS = (50_000, 20, 100)
# File descriptors kept besides two per connection: listeners, pipes for splice, logs, control.
FD_RESERVE = 64


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triofwd", description="A TCP forwarder on Trio.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the forwarder in the foreground")
    s.add_argument("routefile")
    s.add_argument("--control", metavar="PATH", help="control socket path (Unix socket, mode 0600)")
    s.add_argument("--access-log", metavar="PATH|-", help="JSON access log, one line per connection ('-': stdout)")
    s.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus text at /metrics")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="text", choices=["text", "json"], help="stderr log lines as text or JSON")
    sub.add_parser("inspect", help="see and steer a running daemon (triofwd inspect --help)", add_help=False)
    c = sub.add_parser("check", help="validate a route file")
    c.add_argument("routefile")
    c.add_argument("--show-nft", action="store_true", help="print the nftables ruleset offload routes would install")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:  # its own commands and options: the inspector parses them
        return inspector.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.routefile, args.show_nft)
    setup_logging(args.log_level, args.log_format)
    _tune_gc()
    try:
        return trio.run(_serve, args)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130


def _check(path: str, show_nft: bool) -> int:
    try:
        table = load_table(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{path}: {line}", file=sys.stderr)
        return EXIT_INVALID
    if show_nft:
        print(ruleset_text(table), end="")
    print(f"ok: {len(table.routes)} routes")
    return 0


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


def _warn_fd_limit(limit: int, max_connections: int) -> None:
    """One warning when the open file limit cannot hold max_connections (0: no limit to check)."""
    needed = 2 * max_connections + FD_RESERVE
    if max_connections and limit != resource.RLIM_INFINITY and limit < needed:
        log.warning(
            "the open file limit (%d) holds about %d connections, fewer than max_connections = %d; "
            "raise the hard limit (ulimit -Hn, LimitNOFILE=) to %d",
            limit, max(0, (limit - FD_RESERVE) // 2), max_connections, needed,
        )  # fmt: skip


def _notify_systemd(state: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET ('@' = abstract)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", path, exc)


def _parse_host_port(text: str) -> tuple[str | None, int]:
    """--metrics HOST:PORT: "127.0.0.1:9100", "[::1]:9100", ":9100" (every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid --metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    return (host.strip("[]") or None), int(port)


async def _serve(args: argparse.Namespace) -> int:
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
    access_log: IO[str] | None = None
    if args.access_log == "-":
        access_log = sys.stdout
    elif args.access_log:
        try:
            # Opened once, before anything is served, and kept as long as serve runs.
            access_log = open(args.access_log, "a", encoding="utf-8")  # noqa: SIM115, ASYNC230
        except OSError as exc:
            return _fail(f"cannot open access log {args.access_log}: {exc.strerror or exc}")
    try:
        with contextlib.ExitStack() as resources, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            # The control socket and the metrics port are bound before the forwarder's
            # ports, so that when `ready` is logged every listener is there.
            try:
                control = resources.enter_context(bind_control_socket(args.control)) if args.control else None
                metrics = await bind_metrics(*metrics_address) if metrics_address else None
            except ListenError as exc:
                return _fail(str(exc))
            for listener in metrics or ():
                resources.callback(listener.socket.close)
            async with trio.open_nursery() as nursery:
                try:
                    fwd: Forwarder = await nursery.start(lambda task_status: serve(table, access_log=access_log, task_status=task_status))
                except (ListenError, ConfigError) as exc:
                    return _fail(str(exc))
                _warn_fd_limit(fd_limit, config.settings.max_connections)  # once serving: start-up errors stay one line
                reload = _reloader(fwd, args.routefile)
                if control is not None:
                    nursery.start_soon(ControlServer(fwd, reload=reload).serve, [control])
                if metrics is not None:
                    nursery.start_soon(serve_metrics_on, metrics, lambda: metrics_text(fwd))
                _notify_systemd("READY=1")
                nursery.start_soon(_on_signals, fwd, signals, reload)
                await fwd.wait_stopped()
                nursery.cancel_scope.cancel()
    finally:
        if access_log is not None and access_log is not sys.stdout:
            access_log.close()
    return 0


def _reloader(fwd: Forwarder, path: str) -> Callable[[], Awaitable[dict[str, list[str]]]]:
    """Re-read the route file and apply it: what SIGHUP and the control `reload` run.

    One at a time: a SIGHUP during a control reload waits for it rather than racing it.
    Raises ConfigError or ListenError, and the old table stays.
    """
    lock = trio.Lock()

    async def reload() -> dict[str, list[str]]:
        async with lock:
            return await fwd.reload(load_table(path))

    return reload


async def _on_signals(fwd: Forwarder, signals: AsyncIterator[int], reload: Callable[[], Awaitable[object]]) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            try:
                await reload()
            except (ConfigError, ListenError) as exc:
                log.error("reload failed, the old routes stay in force: %s", exc)
        elif not fwd.stopping:
            log.info("%s: stopping gracefully", signal.Signals(signum).name)
            _notify_systemd("STOPPING=1")
            fwd.shutdown()
        else:
            log.info("%s again: closing every connection now", signal.Signals(signum).name)
            fwd.shutdown(grace=0)
