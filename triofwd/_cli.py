"""The `triofwd` command: `serve` (the daemon) and `check` (validate a route file).

Exit status: 0 after a clean stop or a good check; 1 for a route file that `check`
finds invalid; 2 for anything `serve` cannot start with (unreadable or invalid route
file, a port that cannot be bound), always as one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import sys
from typing import IO

import trio

from ._config import ConfigError, load_config
from ._log import setup_logging
from ._server import Forwarder, ListenError, serve

__all__ = ["main"]

log = logging.getLogger("triofwd")

EXIT_INVALID = 1  # check: the route file has errors
EXIT_CANNOT_START = 2  # serve: bad route file, busy port, bad option


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
    c = sub.add_parser("check", help="validate a route file")
    c.add_argument("routefile")
    c.add_argument("--show-nft", action="store_true", help="print the nftables ruleset offload routes would install")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.routefile, args.show_nft)
    setup_logging(args.log_level, args.log_format)
    try:
        return trio.run(_serve, args)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130


def _check(path: str, show_nft: bool) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{path}: {line}", file=sys.stderr)
        return EXIT_INVALID
    if show_nft:
        print("# no offload routes: triofwd would install no nftables rules")
    print(f"ok: {len(config.routes)} routes")
    return 0


def _fail(message: str) -> int:
    print(f"triofwd: {message}", file=sys.stderr)
    return EXIT_CANNOT_START


def _raise_fd_limit() -> None:
    """Each connection holds two fds: raise the soft RLIMIT_NOFILE to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)


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


async def _serve(args: argparse.Namespace) -> int:
    for option in ("control", "metrics"):
        if getattr(args, option):
            return _fail(f"--{option} is not supported yet")
    try:
        config = load_config(args.routefile)
    except ConfigError as exc:
        return _fail(str(exc))
    _raise_fd_limit()
    access_log: IO[str] | None = None
    if args.access_log == "-":
        access_log = sys.stdout
    elif args.access_log:
        try:
            access_log = open(args.access_log, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as serve
        except OSError as exc:
            return _fail(f"cannot open access log {args.access_log}: {exc.strerror or exc}")
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    fwd: Forwarder = await nursery.start(lambda task_status: serve(config, access_log=access_log, task_status=task_status))
                except (ListenError, ConfigError) as exc:
                    return _fail(str(exc))
                _notify_systemd("READY=1")
                nursery.start_soon(_on_signals, fwd, signals, args.routefile)
                await fwd.wait_stopped()
                nursery.cancel_scope.cancel()
    finally:
        if access_log is not None and access_log is not sys.stdout:
            access_log.close()
    return 0


async def _on_signals(fwd: Forwarder, signals: trio.abc.ReceiveChannel[int], path: str) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            try:
                await fwd.reload(load_config(path))
            except (ConfigError, ListenError) as exc:
                log.error("reload failed, the old routes stay in force: %s", exc)
        elif not fwd.stopping:
            log.info("%s: stopping gracefully", signal.Signals(signum).name)
            _notify_systemd("STOPPING=1")
            fwd.shutdown()
        else:
            log.info("%s again: closing every connection now", signal.Signals(signum).name)
            fwd.shutdown(grace=0)
