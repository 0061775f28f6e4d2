"""Prototype: "one engine per forwarder" -- a TCP forwarder on trio whose data path is one task.

    python tools/forwarders/engine_prototype.py PORT TARGET_HOST TARGET_PORT [--bind 127.0.0.1] [options]

The design triofwd's data engine (triofwd/_engine.py) was built from, kept as a reference
forwarder: tools/bench.py measures it beside triofwd ("trio_engine_prototype"), so what the
design costs without triofwd's features is measured in the same run, not assumed. Prints
"ready PORT" when listening, like the other reference forwarders.

Structure
---------
- ONE engine task (Engine.run) owns a select.epoll with persistent, level-triggered
  registrations of every relayed socket. It waits on the epoll's own fd with
  trio.lowlevel.wait_readable(ep.fileno()) -- an ordinary trio task -- then takes a bounded
  batch with ep.poll(0, maxevents) and moves bytes for every ready socket: recv_into one
  shared 64 KiB buffer and send at once. Nothing awaits inside a batch.
- Backpressure: when the destination would block, the unsent bytes are parked on the
  source Side (copied out), the source loses EPOLLIN and the destination gains EPOLLOUT; on
  EPOLLOUT the parked bytes are sent, then the interests are restored. At most one chunk
  (64 KiB, or one 1 MiB pipe with --splice) is held per direction.
- EOF is passed on as shutdown(SHUT_WR) once what was parked has been delivered; when both
  directions are done, or on an error (ECONNRESET, EPIPE, EPOLLERR), the engine unregisters
  both fds at once and reschedules the connection's task.
- Each connection keeps its own trio task (started in the accept loop's nursery): it
  connects to the target with a raw non-blocking socket (connect_ex / EINPROGRESS +
  trio.lowlevel.wait_writable + SO_ERROR), then `with engine.attach(client, target) as
  relay: await relay.wait(idle)`. Leaving the block (end, cancel, exception) unregisters
  whatever is still registered and closes both sockets.
- Inactivity is lazy: the engine stamps relay.last_activity once per batch; the task's
  cancel scope has deadline last_activity + idle, and when it fires the task re-arms if
  there was traffic since.

No trio.SocketStream anywhere. No config, no logging: a measurement prototype.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import gc
import os
import resource
import select
import socket
import sys
from typing import ClassVar

import trio

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP

COPY_CHUNK = 65536
SPLICE_AT = 16384
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
MSG_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL  # per call: accepted sockets stay O_NONBLOCK-less
POOL_LIMIT = 16
NODELAY = "listener"
CONNECT_IN_ENGINE = False
RAW_ACCEPT = False


class Pipe:
    __slots__ = ("r", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PipePool:
    def __init__(self) -> None:
        self.free: list[Pipe] = []

    def take(self) -> Pipe | None:
        if self.free:
            return self.free.pop()
        try:
            return Pipe()
        except OSError:
            return None  # out of fds: copy instead

    def give(self, pipe: Pipe) -> None:
        if len(self.free) < POOL_LIMIT:
            self.free.append(pipe)
        else:
            pipe.close()


class Side:
    """One socket of a relay, and the direction that READS from it (this side -> peer)."""

    __slots__ = (
        "bulk",
        "connecting",
        "done",
        "eof",
        "fd",
        "interest",
        "left",
        "parked",
        "peer",
        "pipe",
        "reading",
        "registered",
        "relay",
        "sock",
    )

    def __init__(self, sock: socket.socket, relay: Relay) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.relay = relay
        self.peer: Side = None  # type: ignore[assignment]
        self.reading = True  # this direction still reads from sock
        self.eof = False  # EOF read from sock; passed on once `parked` is delivered
        self.done = False  # this direction finished: EOF passed on as the peer's SHUT_WR
        self.parked: memoryview | None = None  # bytes read from sock that the peer could not take yet
        self.pipe: Pipe | None = None  # ... or the same, still in a pipe (splice)
        self.left = 0
        self.bulk = False  # the last chunk was big: splice the next one
        self.interest = 0  # what is registered in the engine's epoll now
        self.registered = False
        self.connecting = False  # --connect engine: the target's connect is still in progress


class Relay:
    """Two sockets relayed by the engine; also the context manager of their attachment."""

    __slots__ = ("a", "b", "engine", "error", "finished", "last_activity", "nonblocking", "task")

    def __init__(self, engine: Engine, client: socket.socket, target: socket.socket, connecting: bool = False) -> None:
        self.engine = engine
        self.a = a = Side(client, self)
        self.b = b = Side(target, self)
        b.connecting = connecting
        a.peer, b.peer = b, a
        self.task = None
        self.finished = False
        self.error: OSError | None = None
        self.last_activity = trio.current_time()
        self.nonblocking = False

    def __enter__(self) -> Relay:
        self.engine._add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        engine = self.engine
        if not self.finished:  # cancelled or raised: the engine still watches it
            self.finished = True
            engine._remove(self)
        for side in (self.a, self.b):
            if side.pipe is not None:
                side.pipe.close()  # may hold bytes that belong to no one now
                side.pipe = None
            side.parked = None
        self.a.sock.close()
        self.b.sock.close()

    def _abort(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self, idle: float) -> str:
        """Until the relay ends ("done" / "error") or nothing moved for `idle` seconds ("idle")."""
        while not self.finished:
            with trio.CancelScope(deadline=self.last_activity + idle) as scope:
                self.task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort)
            if scope.cancelled_caught and not self.finished and trio.current_time() >= self.last_activity + idle:
                return "idle"
        return "error" if self.error is not None else "done"


class Engine:
    def __init__(self, *, maxevents: int = 256, splice: bool = False, spin: bool = False) -> None:
        self.ep = select.epoll()
        self.sides: dict[int, Side] = {}
        self.buf = memoryview(bytearray(COPY_CHUNK))
        self.maxevents = maxevents
        self.splice = splice
        self.spin = spin
        self.pool = PipePool()
        self.batches = 0
        self.events = 0
        self.rare = {"parked": 0, "hup_unregister": 0, "reregister": 0, "epollerr": 0, "errors": 0}

    def attach(self, client: socket.socket, target: socket.socket, connecting: bool = False) -> Relay:
        """connecting=True: the target's non-blocking connect is in progress; the engine
        completes it (EPOLLOUT: connected, EPOLLERR: failed -> the relay ends with the error)."""
        return Relay(self, client, target, connecting)

    # --- registration -------------------------------------------------------------------
    def _add(self, relay: Relay) -> None:
        for side in (relay.a, relay.b):
            want = EPOLLIN | EPOLLOUT if side.connecting else EPOLLIN
            self.ep.register(side.fd, want)
            side.interest = want
            side.registered = True
            self.sides[side.fd] = side

    def _remove(self, relay: Relay) -> None:
        """Forget both fds: must run before they are closed (a closed fd's number is reused,
        and an unregister after close would hit whoever got the number)."""
        for side in (relay.a, relay.b):
            if side.registered:
                side.registered = False
                self.ep.unregister(side.fd)
            if self.sides.get(side.fd) is side:
                del self.sides[side.fd]

    def _interest(self, side: Side) -> None:
        """Recompute what `side`'s fd waits for: EPOLLIN while its direction reads and holds
        nothing, EPOLLOUT while the other direction holds bytes for it."""
        want = 0
        if side.reading and side.parked is None and side.pipe is None:
            want = EPOLLIN
        peer = side.peer
        if peer.parked is not None or peer.pipe is not None or side.connecting:
            want |= EPOLLOUT
        if want != side.interest:
            side.interest = want
            if side.registered:
                # want == 0 stays registered: EPOLLERR/EPOLLHUP are still reported, so a reset
                # of a side that has nothing to read or write is seen at once.
                self.ep.modify(side.fd, want)
            elif want and not side.relay.finished:  # unregistered after a bare EPOLLHUP
                self.rare["reregister"] += 1
                self.ep.register(side.fd, want)
                side.registered = True

    def _finish(self, relay: Relay, error: OSError | None) -> None:
        if relay.finished:
            return
        relay.finished = True
        relay.error = error
        if error is not None:
            self.rare["errors"] += 1
        self._remove(relay)
        task = relay.task
        if task is not None:
            relay.task = None
            trio.lowlevel.reschedule(task)

    # --- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        epfd = self.ep.fileno()
        poll = self.ep.poll
        maxevents = self.maxevents
        sides = self.sides
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        current_time = trio.current_time
        spin = self.spin
        while True:
            await wait_readable(epfd)
            while True:
                events = poll(0, maxevents)
                if not events:
                    break
                self.batches += 1
                self.events += len(events)
                now = current_time()
                for fd, ev in events:
                    side = sides.get(fd)
                    if side is None:  # its relay ended earlier in this batch
                        continue
                    self._event(side, ev, now)
                if not spin and len(events) < maxevents:
                    break  # most likely drained: back to trio's wait (one epoll_ctl re-arm)
                await checkpoint()

    def _event(self, side: Side, ev: int, now: float) -> None:
        relay = side.relay
        if ev & EPOLLERR:
            self.rare["epollerr"] += 1
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._finish(relay, OSError(err or errno.ECONNRESET, os.strerror(err or errno.ECONNRESET)))
            return
        acted = False
        peer = side.peer
        if side.connecting:
            if not ev & (EPOLLOUT | EPOLLHUP):
                return
            side.connecting = False  # connected (a failure comes with EPOLLERR, handled above)
            acted = True
            self._interest(side)
            if peer.eof and not peer.done and peer.parked is None and peer.pipe is None:
                self._pass_eof(peer, side)  # the client's EOF came while connecting
                if relay.finished:
                    return
        if ev & (EPOLLOUT | EPOLLHUP) and (peer.parked is not None or peer.pipe is not None):
            acted = True
            self._flush(peer, side, now)  # the peer's direction (peer -> side) was waiting for side
            if relay.finished:
                return
        if ev & (EPOLLIN | EPOLLHUP) and side.reading and side.parked is None and side.pipe is None:
            acted = True
            if side.bulk:
                self._splice(side, peer, now)
            else:
                self._copy(side, peer, now)
        if not acted and ev & EPOLLHUP and side.registered:
            # Both halves of this socket are shut (its peer's FIN came, our SHUT_WR went) while
            # its own direction still waits to deliver parked bytes; EPOLLHUP is reported
            # whatever the interest, and level-triggered it would come back on every poll:
            # stop watching the fd; _interest() registers it again when there is work.
            self.rare["hup_unregister"] += 1
            side.registered = False
            side.interest = 0
            self.ep.unregister(side.fd)

    def _copy(self, src: Side, dst: Side, now: float) -> None:
        buf = self.buf
        try:
            n = src.sock.recv_into(buf, COPY_CHUNK, MSG_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(src.relay, exc)
            return
        if not n:
            self._eof(src, dst)
            return
        src.relay.last_activity = now
        try:
            sent = dst.sock.send(buf[:n], MSG_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._finish(src.relay, exc)
            return
        if sent < n:
            self.rare["parked"] += 1
            src.parked = memoryview(buf[sent:n].tobytes())
            self._interest(src)
            self._interest(dst)
        if n >= SPLICE_AT and self.splice:
            self._go_bulk(src)

    def _go_bulk(self, src: Side) -> None:
        relay = src.relay
        if not relay.nonblocking:  # splice(2) honours the sockets' O_NONBLOCK, not MSG_DONTWAIT
            relay.a.sock.setblocking(False)
            relay.b.sock.setblocking(False)
            relay.nonblocking = True
        src.bulk = True

    def _splice(self, src: Side, dst: Side, now: float) -> None:
        pipe = self.pool.take()
        if pipe is None:
            self._copy(src, dst, now)
            return
        try:
            n = os.splice(src.fd, pipe.w, PIPE_SIZE, flags=SPLICE_FLAGS)
        except BlockingIOError:
            self.pool.give(pipe)
            return
        except OSError as exc:
            self.pool.give(pipe)
            self._finish(src.relay, exc)
            return
        if not n:
            self.pool.give(pipe)
            self._eof(src, dst)
            return
        src.relay.last_activity = now
        left = n
        try:
            while left:
                left -= os.splice(pipe.r, dst.fd, left, flags=SPLICE_FLAGS)
        except BlockingIOError:
            pass
        except OSError as exc:
            pipe.close()
            self._finish(src.relay, exc)
            return
        if left:
            self.rare["parked"] += 1
            src.pipe, src.left = pipe, left
            self._interest(src)
            self._interest(dst)
        else:
            self.pool.give(pipe)
        src.bulk = n >= SPLICE_AT

    def _flush(self, src: Side, dst: Side, now: float) -> None:
        """Deliver what src's direction parked for dst; when all is out, restore interests."""
        try:
            if src.pipe is not None:
                while src.left:
                    src.left -= os.splice(src.pipe.r, dst.fd, src.left, flags=SPLICE_FLAGS)
                self.pool.give(src.pipe)
                src.pipe = None
            else:
                parked = src.parked
                sent = dst.sock.send(parked, MSG_FLAGS)
                if sent < len(parked):
                    src.parked = parked[sent:]
                    return
                src.parked = None
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(src.relay, exc)
            return
        src.relay.last_activity = now
        if src.eof:
            self._pass_eof(src, dst)
            if src.relay.finished:
                return
        self._interest(src)
        self._interest(dst)

    def _eof(self, src: Side, dst: Side) -> None:
        src.reading = False
        src.eof = True
        if dst.connecting:  # shutdown() of a connecting socket would abort the connect
            self._interest(src)
            return
        self._pass_eof(src, dst)  # nothing is parked: we only read when nothing is
        if not src.relay.finished:
            self._interest(src)

    def _pass_eof(self, src: Side, dst: Side) -> None:
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._finish(src.relay, exc)
            return
        src.done = True
        if dst.done:
            self._finish(src.relay, None)


# --- connections -----------------------------------------------------------------------------


class Stats:
    accepted = 0
    connect_failed = 0
    ended: ClassVar[dict[str, int]] = {"done": 0, "error": 0, "idle": 0}


async def handle(engine: Engine, client: socket.socket, target: tuple[str, int], idle: float, notify: bool) -> None:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    except OSError:
        client.close()
        return
    try:
        if NODELAY != "off":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(target)
        if err == errno.EINPROGRESS and CONNECT_IN_ENGINE:
            with engine.attach(client, sock, connecting=True) as relay:
                how = await relay.wait(idle)
            Stats.ended[how] += 1
            return
        if err == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if notify:  # the fd sits in trio's epoll (a fired EPOLLONESHOT entry) until closed
                trio.lowlevel.notify_closing(sock)
        if err:
            Stats.connect_failed += 1
            sock.close()
            client.close()
            return
    except BaseException:
        sock.close()
        client.close()
        raise
    with engine.attach(client, sock) as relay:
        how = await relay.wait(idle)
    Stats.ended[how] += 1


async def accept_loop(listener: socket.socket, engine: Engine, target: tuple[str, int], idle: float,
                      notify: bool, nursery: trio.Nursery, per_wakeup: int = 64) -> None:
    """Accept until the backlog is empty (at most per_wakeup at a time), then one wait."""
    accept = listener.accept
    if RAW_ACCEPT:  # socket.accept() converts family/type to enums on every call (and checks the default timeout)
        raw_accept, new_socket, AF_INET, SOCK_STREAM = listener._accept, socket.socket, socket.AF_INET, socket.SOCK_STREAM

        def accept() -> tuple[socket.socket, object]:
            fd, addr = raw_accept()
            return new_socket(AF_INET, SOCK_STREAM, 0, fd), addr
    start_soon = nursery.start_soon
    nodelay_each = NODELAY == "each"
    while True:
        for _ in range(per_wakeup):
            try:
                client, _addr = accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                break
            except OSError as exc:  # EMFILE, ECONNABORTED...
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await trio.sleep(0.01)
                else:
                    await trio.lowlevel.checkpoint()
                break
            Stats.accepted += 1
            if nodelay_each:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start_soon(handle, engine, client, target, idle, notify)
        else:
            await trio.lowlevel.checkpoint()


async def stop_on_signal(scope: trio.CancelScope) -> None:
    import signal
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def main(args: argparse.Namespace) -> None:
    engine = Engine(maxevents=args.batch, splice=args.splice, spin=args.spin)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if NODELAY == "listener":  # accepted sockets inherit TCP_NODELAY from the listener on Linux
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((args.bind, args.port))
    listener.listen(4096)
    target = (args.target_host, args.target_port)
    print("ready", listener.getsockname()[1], flush=True)
    try:
        async with trio.open_nursery() as nursery:
            if args.stats:
                nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            nursery.start_soon(engine.run)
            await accept_loop(listener, engine, target, args.idle, args.notify_closing, nursery)
    finally:
        trio.lowlevel.notify_closing(listener)
        listener.close()
        if args.stats:
            print(f"stats: accepted {Stats.accepted} ended {Stats.ended} connect_failed {Stats.connect_failed} "
                  f"batches {engine.batches} events {engine.events} rare {engine.rare}", file=sys.stderr, flush=True)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("target_host")
    p.add_argument("target_port", type=int)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--batch", type=int, default=256, help="maxevents per engine batch")
    p.add_argument("--splice", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--spin", action="store_true", help="after a batch: checkpoint and poll again before waiting")
    p.add_argument("--nodelay", choices=["listener", "each", "off"], default="listener",
                   help="TCP_NODELAY: set on the listener (inherited by accepted sockets) and the target "
                        "socket, on each accepted and target socket, or nowhere")
    p.add_argument("--notify-closing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--gc", choices=["tuned", "default"], default="tuned")
    p.add_argument("--idle", type=float, default=3600.0)
    p.add_argument("--connect", choices=["trio", "engine"], default="trio",
                   help="wait for the target's connect in the connection task (trio.lowlevel.wait_writable) "
                        "or let the engine complete it (EPOLLOUT in its epoll)")
    p.add_argument("--raw-accept", action="store_true", help="listener._accept() + socket(fileno=): no enum conversions")
    p.add_argument("--stats", action="store_true", help="print counters to stderr on SIGINT/SIGTERM")
    args = p.parse_args(argv)
    global NODELAY, CONNECT_IN_ENGINE, RAW_ACCEPT
    NODELAY = args.nodelay
    CONNECT_IN_ENGINE = args.connect == "engine"
    RAW_ACCEPT = args.raw_accept
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.gc == "tuned":  # as triofwd's daemon does
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
    try:
        trio.run(main, args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
