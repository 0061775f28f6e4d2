"""The daemon process itself under stress: out of file descriptors, a reload storm,
SIGTERM with thousands of connections open, handlers that raise.

Each test is one scenario of harness.py (see its docstring for the checks run after it);
the SIGTERM one checks what can be checked of a process that has exited.
"""

from __future__ import annotations

import pathlib
import signal
import textwrap
import time

import trio

from tests.conftest import backend, echo, fd_kinds, limit_fds, receive_all, receive_exactly, rst_close
from tests.reliability.harness import route_file, write_atomically

GIVE_UP = 60  # no scenario here may take longer, whatever happens


async def roundtrip(client: trio.SocketStream, payload: bytes = b"ping") -> bool:
    """True if `payload` comes back through the daemon; False if it closed the connection."""
    try:
        await client.send_all(payload)
        return await receive_exactly(client, len(payload)) == payload
    except trio.BrokenResourceError:
        return False


async def close_cleanly(client: trio.SocketStream) -> None:
    """EOF to the echo target, its EOF back: the connection ends `normal`."""
    async with client:
        await client.send_eof()
        assert await receive_all(client) == b""


async def test_out_of_file_descriptors_then_recovered(scenario) -> None:
    """With RLIMIT_NOFILE at 128, connections are held until accept() fails with EMFILE
    and more queue up: one warning for the burst, no spinning, and once fds are free the
    queued connections are served (or, when accepted with no fd left for the target,
    closed with `capacity`) and new ones are served again."""
    limit, extra = 128, 30
    async with backend(echo) as target:
        async with scenario(route_file({}, {"name": "echo", "targets": [target]}), preexec_fn=limit_fds(limit)) as s:
            with trio.fail_after(GIVE_UP):
                spare = limit - sum(fd_kinds(s.pid).values())
                # Two fds per connection, and a few spare for the splice pipe one chunk borrows.
                held = [await s.open("echo", expect="normal") for _ in range(spare // 2 - 3)]
                for client in held:
                    assert await roundtrip(client)  # about every fd is taken now
                queued = [await s.open("echo", expect={"normal", "capacity"}) for _ in range(extra)]
                await trio.to_thread.run_sync(s.daemon.wait_log, "accept on")
                for client in held:
                    await close_cleanly(client)
                outcomes = [await roundtrip(client) for client in queued]
                for client in queued:
                    await client.aclose()
                late = await s.open("echo", expect="normal")
                assert await roundtrip(late)
                await late.aclose()
                await trio.to_thread.run_sync(s.daemon.wait_log, "accept on", 2)
            warnings = [e["msg"] for e in s.daemon.logs() if e["msg"].startswith("accept on")]
            assert len(warnings) == 2 and "Too many open files" in warnings[0] and "works again" in warnings[1], warnings
            records = await s.settle()
            assert [r["reason"] for r in records].count("capacity") == outcomes.count(False)
            s.faults = extra


async def test_sighup_every_100ms_during_traffic(scenario) -> None:
    """Reloads every 100 ms for 3 s, alternating a route file that moves the route to
    another target and adds then removes a second route (a listener opened and closed
    each time), while clients keep connecting and one connection stays open throughout:
    no connection fails, and no listener or socket is left behind."""
    async with backend(echo) as one, backend(echo) as two:
        files = [
            route_file({}, {"name": "echo", "targets": [one]}, {"name": "extra", "action": "reject"}),
            route_file({}, {"name": "echo", "targets": [two]}),
        ]
        async with scenario(files[0]) as s:
            stop = trio.Event()
            made = 0

            async def storm() -> None:
                for i in range(30):
                    write_atomically(s.daemon.routefile, files[(i + 1) % 2])
                    s.daemon.signal(signal.SIGHUP)
                    await trio.sleep(0.1)
                stop.set()

            async def traffic() -> None:
                nonlocal made
                while not stop.is_set():
                    client = await s.open("echo", expect="normal")
                    made += 1
                    assert await roundtrip(client)
                    await close_cleanly(client)

            with trio.fail_after(GIVE_UP):
                steady = await s.open("echo", expect="normal")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(storm)
                    for _ in range(4):
                        nursery.start_soon(traffic)
                    while not stop.is_set():
                        assert await roundtrip(steady, b"steady")
                await close_cleanly(steady)
                write_atomically(s.daemon.routefile, files[0])
                await s.request("reload")  # the table (and its listeners) of the baseline again
            reloads = [e for e in s.daemon.logs() if e["msg"].startswith("reloaded")]
            assert len(reloads) >= 10, f"only {len(reloads)} of 30 SIGHUPs reloaded"
            assert made > 0
            s.faults = 30


async def test_sigterm_with_thousands_of_connections_open(scenario) -> None:
    """SIGTERM with 3,000 connections open: listeners close at once, connections that
    finish within shutdown_grace end `normal`, the rest are closed at the grace's end
    (`shutdown`), and the process exits 0 — not before the grace, not long after."""
    count, finishing, grace = 3000, 1000, 2.0
    async with backend(echo) as target:
        async with scenario(route_file({"shutdown_grace": f"{grace:g}s"}, {"name": "echo", "targets": [target]}), check=False) as s:
            clients: dict[int, trio.SocketStream] = {}

            async def one(i: int) -> None:
                client = clients[i] = await s.open("echo", expect="normal" if i < finishing else "shutdown")
                assert await roundtrip(client)

            with trio.fail_after(GIVE_UP):
                await s.many(count, one, concurrency=128)
                assert (await s.request("stats"))["active"] == count
                start = time.monotonic()
                s.daemon.signal(signal.SIGTERM)
                await trio.to_thread.run_sync(s.daemon.wait_log, "shutting down")
                async with trio.open_nursery() as nursery:
                    for i, client in clients.items():
                        if i < finishing:
                            nursery.start_soon(close_cleanly, client)
                        else:  # closed by the daemon when the grace runs out
                            nursery.start_soon(receive_all, client)
                status = await trio.to_thread.run_sync(s.daemon.wait, 15)
                elapsed = time.monotonic() - start
                for client in clients.values():
                    await client.aclose()
        assert status == 0
        assert grace * 0.9 <= elapsed < grace + 5, elapsed
        summary = s.check_records()
        assert summary.reasons == {"normal": finishing, "shutdown": count - finishing}
        s.faults = 1
        print(summary.line("test_sigterm_with_thousands_of_connections_open"))


HANDLERS = '''
import trio

async def raises_at_once(stream, info):
    raise ZeroDivisionError("handler bug")

async def raises_after_answering(stream, info):
    await stream.send_all(await stream.receive_some())
    raise RuntimeError("handler bug after answering")

async def raises_in_its_nursery(stream, info):
    async def fail():
        raise KeyError("handler bug in a child task")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail)
        await trio.sleep_forever()

async def returns_without_closing(stream, info):
    await stream.send_all(await stream.receive_some())
'''


async def test_handler_routes_whose_handler_raises(scenario, tmp_path: pathlib.Path) -> None:
    """Handlers that raise, at once, after answering or in a child task: internal_error,
    one logged error each, and the daemon goes on serving every route."""
    count = 120
    (tmp_path / "rel_handlers.py").write_text(textwrap.dedent(HANDLERS))
    names = ["raises_at_once", "raises_after_answering", "raises_in_its_nursery", "returns_without_closing"]
    async with backend(echo) as target:
        routes = [{"name": n, "action": "handler", "handler": f"rel_handlers:{n}"} for n in names]
        async with scenario(route_file({}, *routes, {"name": "echo", "targets": [target]}), errors_allowed=True, paths=[tmp_path]) as s:

            async def one(i: int) -> None:
                name = names[i % len(names)]
                client = await s.open(name, expect="normal" if name == "returns_without_closing" else "internal_error")
                async with client:
                    try:
                        await client.send_all(b"hi")
                    except trio.BrokenResourceError:
                        return
                    assert await receive_all(client) in (b"hi", b"")

            with trio.fail_after(GIVE_UP):
                await s.many(count, one)
                client = await s.open("echo", expect="normal")
                assert await roundtrip(client)
                await close_cleanly(client)
            await s.settle()
            errors = [e for e in s.daemon.logs() if e.get("level") == "error"]
            assert len(errors) == count * 3 // 4
            assert all(e["msg"].startswith("connection ") and "internal error" in e["msg"] for e in errors)
            s.faults = count * 3 // 4


ECHO_HANDLER = '''
async def echo(stream, info):
    async for data in stream:
        await stream.send_all(data)
'''


async def test_extended_keepalive_routes_whose_clients_reset(scenario, tmp_path: pathlib.Path) -> None:
    """keepalive = "extended" on a forward and a handler route, clients that send a few
    bytes and reset: each ends `client_reset` (the relay's nested nurseries once made the
    daemon exit with status 1 and log the reset as `normal`), and the daemon serves on."""
    count = 60
    (tmp_path / "rel_echo_handler.py").write_text(ECHO_HANDLER)
    async with backend(echo) as target:
        text = route_file(
            {"keepalive": "extended"},
            {"name": "ext", "targets": [target]},
            {"name": "ext_handler", "action": "handler", "handler": "rel_echo_handler:echo"},
        )
        async with scenario(text, paths=[tmp_path]) as s:

            async def one(i: int) -> None:
                client = await s.open("ext" if i % 2 else "ext_handler", expect="client_reset")
                assert await roundtrip(client, b"a few bytes")
                rst_close(client)

            with trio.fail_after(GIVE_UP):
                await s.many(count, one)
                for name in ("ext", "ext_handler"):
                    client = await s.open(name, expect="normal")
                    assert await roundtrip(client)
                    await close_cleanly(client)
            assert s.daemon.proc.poll() is None
            s.faults = count
