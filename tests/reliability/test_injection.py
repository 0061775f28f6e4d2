"""Fault injection at every await of a connection's path: nothing a connection raises can
stop the forwarder.

An instrument (trio.abc.Instrument) watches the tasks of one connection: its own task and
every task started under it (the relay's pump, the extended-keepalive watcher). Each time
one of them is resumed after waiting — every await that reached trio's scheduler, with a
value or with an exception (a timer's wakeup is a cancellation inside trio.sleep) — is a
step; a dry run counts them. Then, for each step in turn, a fresh connection is made and,
at that step, the await raises instead of returning:

- an unexpected exception (RuntimeError), or a BaseException that is neither an Exception
  nor KeyboardInterrupt: that connection ends `internal_error`, logged once with its
  traceback, and the forwarder serves the next connection;
- KeyboardInterrupt: the connection ends `shutdown`, the interrupt stops the forwarder (as
  Ctrl-C must), and everything it held is released;
- a cancellation from outside (the embedding nursery is cancelled at that step): the
  connection ends `shutdown` and serve() returns cleanly.

Steps happen in a different order from run to run only where the kernel's timing differs;
a step number past the end of a run injects nothing, and that run must end `normal`. Each
path shows where its injections landed (file:function), and must have reached the parts it
exercises. The synchronous parts (limits, route matching, recording the end) have no await:
each is made to raise once instead. After every path: the table is empty and the fds are
back where they were.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import pathlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import outcome
import pytest
import trio
import trustme

import triofwd
from tests.conftest import AccessLogCapture, backend, echo, open_fds, receive_all, split
from triofwd import _connection
from triofwd._endings import leaves
from triofwd._proxy_protocol import encode_v2
from triofwd.testing import build_client_hello

RUN_CONNECTION = _connection.run_connection.__code__
PACKAGE = str(pathlib.Path(triofwd.__file__).resolve().parent)
STEP_TIMEOUT = 10.0


class Injected(RuntimeError):
    """What the injector raises: an exception no code in the forwarder expects."""


class InjectedBase(BaseException):
    """A BaseException that is neither an Exception nor KeyboardInterrupt (SystemExit's kind)."""


class Injector(trio.abc.Instrument):
    """Counts the resumptions of one connection's tasks and, at the chosen one, makes it raise."""

    def __init__(self) -> None:
        self.reset(0, None)

    def reset(self, target: int, act: Callable[[Any], None] | None) -> None:
        self.target = target  # inject at this step (0: only count)
        self.act = act
        self.tasks: set[Any] = set()
        self.started: set[Any] = set()
        self.steps = 0
        self.fired_at: int | None = None
        self.after = 0
        self.watching = True

    def task_spawned(self, task: Any) -> None:
        if self.watching and not self.tasks and getattr(task.coro, "cr_code", None) is RUN_CONNECTION:
            self.tasks.add(task)  # the next connection is the one watched
        elif task.parent_nursery is not None and task.parent_nursery.parent_task in self.tasks:
            self.tasks.add(task)

    def before_task_step(self, task: Any) -> None:
        if task not in self.tasks or in_nursery_exit(task):
            return
        if self.fired_at is not None:
            self.after += 1  # the connection ran on after the step it was hit at
            return
        if task not in self.started:  # its first step starts it: nothing awaited yet
            self.started.add(task)
            return
        if not isinstance(task._next_send, (outcome.Value, outcome.Error)):
            return
        self.steps += 1
        if self.steps == self.target and self.act is not None:
            self.fired_at = self.steps
            self.act(task)


def landed_in(exc: BaseException) -> str:
    """Where an injected exception was raised: the innermost frame of the forwarder's own code
    in its traceback, "module:function"."""
    leaf = next(leaf for leaf in leaves(exc) if isinstance(leaf, (Injected, InjectedBase)))
    found, last, tb = None, "?", leaf.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        last = f"{pathlib.Path(code.co_filename).stem}:{code.co_name}"
        if code.co_filename.startswith(PACKAGE):
            found = last
        tb = tb.tb_next
    # None: caught into a group before it passed through any frame of ours (a nursery's exit).
    return found or f"(trio) {last}"


def in_nursery_exit(task: Any) -> bool:
    """The task waits in a nursery's exit for its children: trio resumes that wait only when
    they are done, and keeps its own bookkeeping around it, so no fault can arise there.
    (trio's own state says so: the innermost nursery of the task no longer runs its body.)"""
    nurseries = task._child_nurseries
    return bool(nurseries) and not nurseries[-1]._nested_child_running


def raising(make: Callable[[], BaseException]) -> Callable[[Any], None]:
    def act(task: Any) -> None:
        task._next_send = outcome.Error(make())

    return act


# -- the paths ------------------------------------------------------------------------------


@dataclasses.dataclass
class Path:
    name: str
    route: triofwd.Route
    client: Callable[[tuple[str, int]], Awaitable[None]]
    must_reach: tuple[str, ...]  # functions the injections must have landed in
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    expect: str = "normal"  # how the connection ends when nothing is injected


async def _tolerant(work: Awaitable[None]) -> None:
    """A client of a connection that may end at any point: whatever it sees is fine here."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await work


def plain_client(prefix: bytes = b"", payload: bytes = b"hello") -> Callable[[tuple[str, int]], Awaitable[None]]:
    async def client(address: tuple[str, int]) -> None:
        async with await trio.open_tcp_stream(*address) as stream:
            await stream.send_all(prefix + payload)
            got = b""
            while len(got) < len(payload):
                chunk = await stream.receive_some()
                if not chunk:
                    break
                got += chunk
            await stream.send_eof()
            await receive_all(stream)

    return client


def tls_client(ctx: ssl.SSLContext, name: str) -> Callable[[tuple[str, int]], Awaitable[None]]:
    async def client(address: tuple[str, int]) -> None:
        stream = await trio.open_tcp_stream(*address)
        secure = trio.SSLStream(stream, ctx, server_hostname=name, https_compatible=True)
        async with secure:
            await secure.do_handshake()
            await secure.send_all(b"hello")
            await secure.receive_some()

    return client


def idle_client(idle: float) -> Callable[[tuple[str, int]], Awaitable[None]]:
    async def client(address: tuple[str, int]) -> None:
        async with await trio.open_tcp_stream(*address) as stream:
            await stream.send_all(b"hello")
            await stream.receive_some()
            await trio.sleep(idle)  # the extended-keepalive watcher warns, then the grace ends it
            await receive_all(stream)

    return client


async def echo_handler(stream: Any, info: Any) -> None:
    async for data in stream:
        await stream.send_all(data)
    await stream.send_eof()


@contextlib.asynccontextmanager
async def tls_echo(ca: trustme.CA, name: str) -> AsyncIterator[str]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)

    async def handler(stream: trio.SocketStream) -> None:
        secure = trio.SSLStream(stream, ctx, server_side=True, https_compatible=True)
        with contextlib.suppress(trio.BrokenResourceError):
            async for data in secure:
                await secure.send_all(data)

    async with backend(handler) as address:
        yield address


def paths(target: str, tls_target: str, certs: pathlib.Path, ca: trustme.CA) -> list[Path]:
    tls = triofwd.TLS(mode="terminate", cert=str(certs / "front.pem"), key=str(certs / "front.key"))
    reencrypt = triofwd.TLS(mode="reencrypt", cert=tls.cert, key=tls.key, target_ca=str(certs / "ca.pem"), target_sni="target.example")
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    header = encode_v2(("198.51.100.7", 4321), ("127.0.0.1", 1))

    def r(name: str, **kw: Any) -> triofwd.Route:
        return triofwd.Route(name=name, ports=[0], bind="127.0.0.1", **kw)

    return [
        Path(
            "forward: PROXY header in and out, limits",
            r("fwd", targets=[target], accept_proxy_protocol=True, proxy_protocol="v2", max_connections_per_ip=10, connection_rate_per_ip="1000/s"),
            plain_client(header),
            ("_rawsock:receive_some", "_engine:_connected", "_engine:send"),
            {"trusted_proxies": ["127.0.0.0/8"]},
        ),
        Path("forward on SNI", r("sni", targets=[target], domains=["front.example"]), plain_client(build_client_hello("front.example")), ("_rawsock:receive_some", "_engine:_connected", "_engine:send")),
        Path("bridge terminate", r("term", action="bridge", targets=[target], tls=tls), tls_client(client_ctx, "front.example"), ("_tls:handshake", "_engine:_connected", "_pump:pump", "_idle:wait", "_pump:aclose")),
        Path("bridge reencrypt", r("reenc", action="bridge", targets=[tls_target], tls=reencrypt), tls_client(client_ctx, "front.example"), ("_tls:handshake", "_engine:_connected", "_pump:pump", "_idle:wait")),
        Path("handler", r("hdl", action="handler", handler=echo_handler), plain_client(), ("_pump:receive_some", "_pump:send_all", "_pump:send_eof", "_idle:wait")),
        Path(
            "forward, keepalive extended",
            r("ext", targets=[target], keepalive="extended", keepalive_multiplier=1, inactivity_timeout="50ms"),
            idle_client(0.3),
            ("_engine:_connected", "_engine:send"),
            expect="inactivity_timeout",
        ),
    ]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, pathlib.Path]:
    folder = tmp_path_factory.mktemp("inject-certs")
    ca = trustme.CA()
    front = ca.issue_cert("front.example")
    front.private_key_and_cert_chain_pem.write_to_path(str(folder / "front.pem"))
    (folder / "front.key").write_bytes(front.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return ca, folder


@contextlib.asynccontextmanager
async def serving(path: Path, log: AccessLogCapture) -> AsyncIterator[tuple[triofwd.Forwarder, trio.Nursery]]:
    config = triofwd.Config(settings=triofwd.Settings(**path.settings), routes=[path.route])
    async with trio.open_nursery() as nursery:
        fwd = await nursery.start(lambda task_status: triofwd.serve(config, access_log=log, task_status=task_status))
        yield fwd, nursery
        nursery.cancel_scope.cancel()


async def one_connection(fwd: triofwd.Forwarder, path: Path, log: AccessLogCapture) -> dict[str, Any]:
    """Run the path's client once; the access-log line of that connection."""
    before = len(log.lines)
    address = split(fwd.addresses[path.route.name][0])
    with trio.fail_after(STEP_TIMEOUT):
        await _tolerant(path.client(address))
        records = await log.wait(before + 1)
    assert len(records) == before + 1, records[before:]
    return records[before]


def errors_for(caplog: pytest.LogCaptureFixture, conn_id: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.getMessage() == f"connection {conn_id}: internal error"]


@pytest.fixture
async def injector() -> Any:
    instrument = Injector()
    trio.lowlevel.add_instrument(instrument)
    yield instrument
    trio.lowlevel.remove_instrument(instrument)


@pytest.mark.parametrize("kind", ["exception", "base_exception"])
async def test_an_exception_at_every_await_ends_only_that_connection(
    injector: Injector, certificates: tuple[trustme.CA, pathlib.Path], caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    ca, certs = certificates
    make = (lambda: Injected("injected")) if kind == "exception" else (lambda: InjectedBase("injected"))
    report = []
    async with backend(echo) as target, tls_echo(ca, "target.example") as tls_target:
        for path in paths(target, tls_target, certs, ca):
            caplog.clear()  # connection ids start again at 1 in each forwarder
            log = AccessLogCapture()
            fds = open_fds()
            landed: collections.Counter[str] = collections.Counter()
            async with serving(path, log) as (fwd, _):
                injector.reset(0, None)
                dry = await one_connection(fwd, path, log)
                assert dry["reason"] == path.expect, dry
                steps = injector.steps
                assert steps > 0
                for step in range(1, steps + 1):
                    injector.reset(step, raising(make))
                    with caplog.at_level(logging.ERROR, logger="triofwd"):
                        line = await one_connection(fwd, path, log)
                    if injector.fired_at is None:  # this run had fewer steps
                        assert line["reason"] == path.expect, (step, line)
                        continue
                    assert line["reason"] == "internal_error", (path.name, step, line)
                    found = errors_for(caplog, line["id"])
                    assert len(found) == 1, (path.name, step, [(r.getMessage(), r.exc_info) for r in found])
                    [error] = found  # logged once, with its traceback
                    assert error.exc_info is not None and error.exc_info[1] is not None
                    landed[landed_in(error.exc_info[1])] += 1
                    injector.reset(0, None)
                    after = await one_connection(fwd, path, log)  # the forwarder serves the next one
                    assert after["reason"] == path.expect, (path.name, step, after)
                assert not fwd.connections
            report.append(f"{path.name}: {steps} steps, landed in {dict(landed)}")
            missing = [f for f in path.must_reach if f not in landed]
            assert not missing, f"{path.name}: no injection reached {missing}; landed in {dict(landed)}"
            await wait_fds(fds)
    print("\n".join(report))


@pytest.mark.parametrize("kind", ["cancelled_from_outside", "keyboard_interrupt"])
async def test_a_cancellation_or_interrupt_at_every_await_stops_the_forwarder_cleanly(
    injector: Injector, certificates: tuple[trustme.CA, pathlib.Path], kind: str
) -> None:
    ca, certs = certificates
    async with backend(echo) as target, tls_echo(ca, "target.example") as tls_target:
        for path in paths(target, tls_target, certs, ca):
            fds = open_fds()
            log = AccessLogCapture()
            async with serving(path, log) as (fwd, _):
                injector.reset(0, None)
                await one_connection(fwd, path, log)
                steps = injector.steps
            for step in range(1, steps + 1):
                log = AccessLogCapture()
                interrupted = False
                # The client runs outside the forwarder's nursery: only the forwarder is cancelled.
                async with trio.open_nursery() as clients:
                    client_done = trio.Event()
                    try:
                        async with serving(path, log) as (fwd, nursery):
                            act = (lambda task, scope=nursery.cancel_scope: scope.cancel()) if kind == "cancelled_from_outside" else raising(KeyboardInterrupt)
                            injector.reset(step, act)
                            address = split(fwd.addresses[path.route.name][0])

                            async def client(address: tuple[str, int] = address, done: trio.Event = client_done, path: Path = path) -> None:
                                with trio.fail_after(STEP_TIMEOUT):
                                    await _tolerant(path.client(address))
                                done.set()

                            clients.start_soon(client)
                            await client_done.wait()  # or, where the injection stops the forwarder, cancelled
                    except BaseExceptionGroup as group:
                        interrupted = group.subgroup(KeyboardInterrupt) is not None
                        _, rest = group.split((KeyboardInterrupt, trio.Cancelled))
                        assert rest is None, rest
                if injector.fired_at is None:
                    continue
                assert interrupted == (kind == "keyboard_interrupt"), (path.name, step)
                [line] = log.records
                # A cancellation is delivered at the connection's next checkpoint: hit at its
                # last step (its relay over, little or nothing left to await), it may end as
                # it would have anyway.
                allowed = {"shutdown", path.expect} if kind == "cancelled_from_outside" and injector.after == 0 else {"shutdown"}
                assert line["reason"] in allowed, (path.name, step, line)
                await wait_fds(fds)


@pytest.mark.parametrize(
    ("where", "expect"),
    [
        ("triofwd._limits.Gate.take_capacity", "internal_error"),
        ("triofwd._limits.Gate.take_client", "internal_error"),
        ("triofwd._limits.Gate.take_both", "internal_error"),
        ("triofwd._table.RouteTable.match", "internal_error"),
        ("triofwd._accesslog.AccessLog.write", "normal"),
        ("triofwd._stats.Stats.record", "normal"),
    ],
)
async def test_the_parts_without_an_await_raise_once_each(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str, expect: str) -> None:
    """Limits, routing and recording the end have no await to inject at: each raises once
    instead. The connection ends with one reason (recording raising: logged, and the
    connection is still counted as ended), and the next one is served."""
    module_name, cls_name, attr = where.rsplit(".", 2)
    cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
    original = getattr(cls, attr)
    calls = {"n": 0}

    def once(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Injected(f"{attr} injected")
        return original(*args, **kw)

    monkeypatch.setattr(cls, attr, once)
    log = AccessLogCapture()
    async with backend(echo) as target:
        route = triofwd.Route(name="r", ports=[0], bind="127.0.0.1", targets=[target], max_connections_per_ip=5)
        path = Path("sync", route, plain_client(), ())
        fds = open_fds()
        async with serving(path, log) as (fwd, _):
            with caplog.at_level(logging.ERROR, logger="triofwd"):
                address = split(fwd.addresses["r"][0])
                with trio.fail_after(STEP_TIMEOUT):
                    await _tolerant(path.client(address))
                    while calls["n"] == 0 or fwd.connections:
                        await trio.sleep(0.01)
                after = await one_connection(fwd, path, log)
            assert after["reason"] == "normal"
            stats = fwd.stats()
            assert stats["active"] == 0
        await wait_fds(fds)
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info and f"{attr} injected" in repr(r.exc_info[1])]
    assert len(failed) == 1, [r.getMessage() for r in caplog.records]
    records = log.records
    if attr in ("write",):
        assert len(records) == 1  # the line that could not be written is lost, and said so
    else:
        assert [r["reason"] for r in records] == [expect, "normal"]


async def wait_fds(before: int) -> None:
    """This process's fds back to `before` (a peer's socket may close a moment after the forwarder's)."""
    with trio.move_on_after(5):
        while open_fds() > before:
            await trio.sleep(0.01)
    assert open_fds() <= before, (open_fds(), before)
