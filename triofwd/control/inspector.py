"""The inspector: see and steer a running daemon through its control socket.

    triofwd inspect [-s PATH] COMMAND [--json]      (also triofwd-inspect, python tools/inspect.py)

    connections [--route NAME] [--client IP|IP:PORT|CIDR]   the live connections
    connection ID                                           one of them
    kill ID                                                 end it (reason `killed`)
    stats                                                   totals, per route, endings by reason
    routes                                                  the route table and its listeners
    reload                                                  re-read the route file (as SIGHUP)
    drain                                                   stop accepting; open connections go on
    metrics                                                 the Prometheus text
    watch                                                   open/close events as they happen
    top [--interval S]                                      live table sorted by throughput; q quits

Tables for people by default; --json prints the daemon's JSON (watch: one object per
line). The socket is -s PATH, else $TRIOFWD_CONTROL, else /run/triofwd/control.sock when
run as root, else $XDG_RUNTIME_DIR/triofwd.sock.

Exit status: 0 done; 1 the daemon answered with an error; 2 the control socket could not
be used (missing, refused, not a triofwd).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import termios
import tty
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

import trio

from .._errors import ControlConnectionError, ControlError
from .client import ControlClient, open_control
from .socketfile import default_control_path

EXIT_ERROR = 1  # the daemon said no
EXIT_UNREACHABLE = 2  # no daemon to ask
TOP_INTERVAL = 1.0

# ANSI/xterm sequences for `top`: the alternate screen keeps the user's scrollback as it was.
ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
CURSOR_OFF, CURSOR_ON = "\x1b[?25l", "\x1b[?25h"
HOME_CLEAR = "\x1b[H\x1b[2J"


# -- formatting (pure) ------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """95 -> "1m35s"; the two largest units only."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[str] = ()) -> list[str]:
    """Aligned columns; the columns named in `right` (numbers) are right-aligned."""
    cells = [[str(h) for h in headers], *([("-" if c is None else str(c)) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    flush_right = {i for i, h in enumerate(headers) if h in set(right)}
    return ["  ".join((cell.rjust(w) if i in flush_right else cell.ljust(w)) for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in cells]


def _connection_cells(row: Mapping[str, Any], *middle: Any) -> list[Any]:
    """A connection's cells: who, where to, `middle` (its state, where shown), age, idle, bytes."""
    r = row
    return [
        r["id"],
        r["route"],
        r["client"],
        _where_to(r),
        *middle,
        human_duration(r["age_s"]),
        human_duration(r["idle_s"]),
        human_bytes(r["bytes_in"]),
        human_bytes(r["bytes_out"]),
    ]


def _where_to(row: Mapping[str, Any]) -> Any:
    """The target; for a socks5 / http_connect route, the destination the client asked for,
    with the address connected to in brackets."""
    destination, target = row.get("destination"), row.get("target")
    if not destination:
        return target
    return f"{destination} ({target})" if target and target != destination else destination


def format_connections(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return ["no connections"]
    return table(
        ["ID", "ROUTE", "CLIENT", "TARGET", "STATE", "AGE", "IDLE", "IN", "OUT"],
        (_connection_cells(r, r["state"]) for r in rows),
        right=["ID", "AGE", "IDLE", "IN", "OUT"],
    )


def format_connection(row: Mapping[str, Any]) -> list[str]:
    width = max(len(k) for k in row)
    return [f"{key.ljust(width)}  {'-' if value is None else value}" for key, value in row.items()]


def _endings(terminations: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(terminations.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def format_stats(stats: Mapping[str, Any]) -> list[str]:
    head = (
        f"active {stats['active']}  total {stats['total']}  accept errors {stats['accept_errors']}  "
        f"in {human_bytes(stats['bytes_in'])}  out {human_bytes(stats['bytes_out'])}" + ("  DRAINING" if stats.get("draining") else "")
    )
    rows = [
        [name, r["active"], r["total"], human_bytes(r["bytes_in"]), human_bytes(r["bytes_out"]), _endings(r["terminations"])]
        for name, r in stats["routes"].items()
    ]
    lines = [head]
    if rows:
        lines += ["", *table(["ROUTE", "ACTIVE", "TOTAL", "IN", "OUT", "ENDED"], rows, right=["ACTIVE", "TOTAL", "IN", "OUT"])]
    kernel = [[name, r["offload"]["packets"], human_bytes(r["offload"]["bytes"])] for name, r in stats["routes"].items() if "offload" in r]
    if kernel:
        lines += ["", *table(["OFFLOAD ROUTE", "PACKETS", "BYTES"], kernel, right=["PACKETS", "BYTES"])]
    return lines


def format_routes(routes: Sequence[Mapping[str, Any]]) -> list[str]:
    if not routes:
        return ["no routes"]
    lines = table(
        ["NAME", "ACTION", "LISTENING", "TARGETS", "ACTIVE"],
        (
            [
                r["name"],
                r["action"],
                ",".join(r["listening"]) or f"- ({r['bind']} {','.join(map(str, r['ports']))})",
                ",".join(r["targets"]) or "-",
                r["active"],
            ]
            for r in routes
        ),
        right=["ACTIVE"],
    )
    targets = [
        [r["name"], t["target"], "up" if t["up"] else "DOWN", _circuit(t), t["active"], t["warm"], t["failures_total"], t["last_check"] or "-"]
        for r in routes
        for t in r.get("target_state", ())
    ]
    if targets:
        head = ["ROUTE", "TARGET", "HEALTH", "CIRCUIT", "ACTIVE", "WARM", "FAILURES", "LAST CHECK"]
        lines += ["", *table(head, targets, right=["ACTIVE", "WARM", "FAILURES"])]
    return lines


def _circuit(target: Mapping[str, Any]) -> str:
    if target["circuit"] == "open":
        return f"OPEN (retry in {target['retry_in_s']:.1f}s)"
    return str(target["circuit"])


def format_reload(change: Mapping[str, Sequence[str]]) -> list[str]:
    if not any(change.values()):
        return ["reloaded: no changes"]
    return ["reloaded: " + "; ".join(f"{key} {', '.join(names) or '-'}" for key, names in change.items())]


def format_event(event: Mapping[str, Any], now: datetime.datetime | None = None) -> str:
    clock = (now or datetime.datetime.now()).strftime("%H:%M:%S")
    where = f"#{event['id']} {event.get('route') or '-'} {event['client']} -> {_where_to(event) or '-'}"
    if event["event"] == "open":
        return f"{clock} open  {where}"
    return (
        f"{clock} close {where} {event.get('reason') or '-'} after {human_duration(event['age_s'])}, "
        f"in {human_bytes(event['bytes_in'])} out {human_bytes(event['bytes_out'])}"
    )


def top_frame(
    rows: Sequence[Mapping[str, Any]],
    previous: Mapping[int, int],
    elapsed: float | None,
    size: tuple[int, int],
    interval: float,
) -> tuple[list[str], dict[int, int]]:
    """One screen of `top`, and the byte totals to compute the next frame's rates from.

    A connection's rate is the bytes it moved (both directions) since the last frame over
    the time since then; on the first frame, and for a connection too new to have been
    seen, the bytes of its life over its age or over the interval, whichever is shorter.
    """
    columns, lines = size
    totals = {r["id"]: r["bytes_in"] + r["bytes_out"] for r in rows}
    rated = []
    for r in rows:
        total = totals[r["id"]]
        if elapsed is not None and r["id"] in previous:
            rate = (total - previous[r["id"]]) / elapsed if elapsed > 0 else 0.0
        else:
            span = r["age_s"] if elapsed is None else min(r["age_s"], elapsed)
            rate = total / span if span > 0 else 0.0
        rated.append((rate, total, r))
    rated.sort(key=lambda item: (-item[0], -item[1], item[2]["id"]))
    head = f"triofwd top  {len(rows)} connections  {human_bytes(sum(rate for rate, _, _ in rated))}/s  (every {interval:g}s, q quits)"
    body = table(
        ["ID", "ROUTE", "CLIENT", "TARGET", "AGE", "IDLE", "IN", "OUT", "RATE"],
        ([*_connection_cells(r), human_bytes(rate) + "/s"] for rate, _, r in rated),
        right=["ID", "AGE", "IDLE", "IN", "OUT", "RATE"],
    )
    screen = [head, "", *body][: max(lines - 1, 3)]
    return [line[:columns] for line in screen], totals


# -- commands ---------------------------------------------------------------------------


def _print_lines(lines: Iterable[str], out: TextIO) -> None:
    for line in lines:
        print(line, file=out)


async def run_command(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """Run one inspector command over an open control connection."""
    if args.command == "watch":
        return await _watch(client, args.json, out)
    if args.command == "top":
        return await _top(client, args.interval, out)
    request: dict[str, Any] = {}
    if args.command == "connections":
        request = {k: v for k, v in (("route", args.route), ("client", args.client)) if v is not None}
    elif args.command in ("connection", "kill"):
        request = {"id": args.id}
    result = await client.request(args.command, **request)
    if args.json:
        print(json.dumps(result, indent=2) if not isinstance(result, str) else json.dumps(result), file=out)
    elif args.command == "metrics":
        out.write(result)
    elif args.command == "kill":
        print(f"killed connection {result['id']} (route {result['route'] or '-'}, client {result['client']})", file=out)
    elif args.command == "drain":
        print(f"draining: listeners closed, {result['active']} connections still open", file=out)
    else:
        formatters: dict[str, Callable[[Any], list[str]]] = {
            "connections": format_connections,
            "connection": format_connection,
            "stats": format_stats,
            "routes": format_routes,
            "reload": format_reload,
        }
        _print_lines(formatters[args.command](result), out)
    return 0


async def _watch(client: ControlClient, as_json: bool, out: TextIO) -> int:
    async for event in client.watch():
        print(json.dumps(event) if as_json else format_event(event), file=out, flush=True)
    return 0


async def _top(client: ControlClient, interval: float, out: TextIO) -> int:
    fd = sys.stdin.fileno()
    if not (os.isatty(fd) and out.isatty()):
        print("inspect: top needs a terminal; for scripts use: connections --json", file=sys.stderr)
        return EXIT_UNREACHABLE
    saved = termios.tcgetattr(fd)
    try:
        # cbreak: keys arrive one at a time and unechoed; Ctrl-C still raises SIGINT.
        tty.setcbreak(fd)
        out.write(ALT_SCREEN_ON + CURSOR_OFF)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_quit_on_q, fd, nursery.cancel_scope)
            previous: dict[int, int] = {}
            last: float | None = None
            while not nursery.cancel_scope.cancel_called:  # q cancels it
                rows = await client.request("connections")
                now = trio.current_time()
                size = shutil.get_terminal_size()
                frame, previous = top_frame(rows, previous, None if last is None else now - last, (size.columns, size.lines), interval)
                last = now
                out.write(HOME_CLEAR + "\n".join(frame))
                out.flush()
                await trio.sleep(interval)
    finally:
        out.write(CURSOR_ON + ALT_SCREEN_OFF)
        out.flush()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return 0


async def _quit_on_q(fd: int, scope: trio.CancelScope) -> None:
    # A dup, so closing the stream leaves stdin open; FdStream restores its blocking mode.
    async with trio.lowlevel.FdStream(os.dup(fd)) as keys:
        while True:
            data = await keys.receive_some(64)
            if not data or b"q" in data.lower():
                scope.cancel()
                return


# -- entry point ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-s", "--socket", default=argparse.SUPPRESS, metavar="PATH", help="control socket (default: see below)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the daemon's JSON")
    p = argparse.ArgumentParser(
        prog="triofwd inspect",
        description="See and steer a running triofwd through its control socket.",
        epilog=f"Socket: -s PATH, else $TRIOFWD_CONTROL, else /run/triofwd/control.sock as root, "
        f"else $XDG_RUNTIME_DIR/triofwd.sock (here: {default_control_path()}).",
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("connections", parents=[common], help="the live connections")
    c.add_argument("--route", help="only this route")
    c.add_argument("--client", help="only this client: IP, IP:PORT or CIDR")
    for name, text in (("connection", "one connection"), ("kill", "end a connection (reason `killed`)")):
        sub.add_parser(name, parents=[common], help=text).add_argument("id", type=int, metavar="ID")
    for name, text in (
        ("stats", "totals, per route, endings by reason"),
        ("routes", "the route table and its listeners"),
        ("reload", "re-read the route file (as SIGHUP)"),
        ("drain", "stop accepting; open connections go on"),
        ("metrics", "the Prometheus text"),
        ("watch", "open/close events as they happen"),
    ):
        sub.add_parser(name, parents=[common], help=text)
    t = sub.add_parser("top", parents=[common], help="live table sorted by throughput (q quits)")
    t.add_argument("--interval", type=float, default=TOP_INTERVAL, metavar="S", help=f"seconds between refreshes (default {TOP_INTERVAL:g})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.socket = getattr(args, "socket", None) or default_control_path()
    args.json = getattr(args, "json", False)
    if args.command == "top" and args.json:
        print("inspect: top has no --json; use: connections --json", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        return trio.run(_main, args)
    except KeyboardInterrupt:
        # Ctrl-C is how watch and top end; elsewhere it is an interruption.
        return 0 if args.command in ("watch", "top") else 130


async def _main(args: argparse.Namespace) -> int:
    try:
        async with open_control(args.socket) as client:
            return await run_command(client, args, sys.stdout)
    except ControlError as exc:
        print(f"inspect: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ControlConnectionError as exc:
        print(f"inspect: {args.socket}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except OSError as exc:
        print(f"inspect: cannot connect to {args.socket}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
