"""The control socket over a real Unix socket: the file, who may connect, every command, bad input."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trio

import triofwd
from tests.conftest import backend, config, connect, echo, forwarder, receive_all, receive_exactly, roundtrip, route, split, threaded_echo, wait_for
from triofwd._errors import ControlConnectionError
from triofwd.control import ControlServer, bind_control_socket
from triofwd.control.messages import MAX_REQUEST_BYTES
from triofwd.control.server import WS_MAX_MESSAGE_BYTES


@contextlib.asynccontextmanager
async def controlled(cfg: triofwd.Config, path: pathlib.Path, **kw: Any) -> AsyncIterator[tuple[triofwd.Forwarder, str]]:
    """An embedded forwarder with its control socket at `path`."""
    async with forwarder(cfg) as fwd, trio.open_nursery() as nursery:
        address = await nursery.start(functools.partial(triofwd.serve_control, fwd, path, **kw))
        yield fwd, address
        nursery.cancel_scope.cancel()


async def forwarded(stream: trio.SocketStream, payload: bytes = b"ping") -> bool:
    await stream.send_all(payload)
    return await receive_exactly(stream, len(payload)) == payload


async def request_until(client: Any, predicate: Callable[[Any], bool], cmd: str, **args: Any) -> Any:
    """Ask again until the answer satisfies `predicate` (counters move on the forwarder's schedule)."""
    with trio.fail_after(5):
        while not predicate(result := await client.request(cmd, **args)):
            await trio.sleep(0.01)
    return result


# -- the socket file ------------------------------------------------------------------------


async def test_socket_is_0600_from_the_start_and_removed_on_exit(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.sock"
    umask = os.umask(0o022)
    try:
        with trio.fail_after(5):
            async with controlled(config(route(action="reject")), path) as (_, address):
                st = os.lstat(path)
                assert address == str(path)
                assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
                assert os.umask(0o022) == 0o022  # the process umask was never touched
                assert os.listdir(tmp_path) == ["c.sock"]  # the private bind directory is gone
                async with triofwd.open_control(path) as client:
                    assert await client.request("connections") == []
    finally:
        os.umask(umask)
    assert not path.exists()


async def test_a_stale_socket_is_replaced(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX) as crashed:  # bound, then gone without unlinking
        crashed.bind(str(path))
    with trio.fail_after(5):
        async with controlled(config(route(action="reject")), path) as (_, address):
            async with triofwd.open_control(address) as client:
                assert await client.request("stats")


async def test_a_live_socket_or_another_file_is_never_replaced(tmp_path: pathlib.Path) -> None:
    live, other = tmp_path / "live.sock", tmp_path / "file"
    other.write_text("keep me")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(live))
        server.listen()
        with pytest.raises(triofwd.ListenError, match="another process is serving it"):
            with bind_control_socket(live):
                pass
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(live))  # still the other process's socket
    with pytest.raises(triofwd.ListenError, match="a file that is not a socket is in the way"):
        with bind_control_socket(other):
            pass
    assert other.read_text() == "keep me"
    with pytest.raises(triofwd.ListenError, match="No such file or directory"):
        with bind_control_socket(tmp_path / "missing" / "c.sock"):
            pass


async def test_exit_leaves_a_socket_that_replaced_ours_alone(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX) as successor:
        with bind_control_socket(path):
            path.unlink()
            successor.bind(str(path))  # e.g. an operator started another daemon meanwhile
        assert path.exists()


# -- who may connect --------------------------------------------------------------------------

NOBODY = 65534
HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def first_line_as(uid: int, path: str) -> str:
    """Connect as `uid`, ask for a WebSocket, and return the first line of the answer.

    The kernel checks the socket file's mode, and records SO_PEERCRED, with the effective
    uid at connect(2): switching it for the connect alone is another user as far as
    the daemon can tell, and needs no interpreter that the other user may execute.
    """
    sock = socket.socket(socket.AF_UNIX)
    os.seteuid(uid)
    try:
        sock.connect(path)
    except PermissionError:
        sock.close()
        return "EACCES"
    finally:
        os.seteuid(0)
    answer = b""
    async with trio.SocketStream(trio.socket.from_stdlib_socket(sock)) as stream:
        await stream.send_all(HANDSHAKE)
        # A refused peer gets its answer, then a reset (its request went unread).
        with contextlib.suppress(trio.BrokenResourceError):
            while b"\r\n" not in answer and (data := await stream.receive_some()):
                answer += data
    return answer.split(b"\r\n")[0].decode() or "EOF"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
async def test_a_peer_of_another_uid_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    shared = pathlib.Path(tempfile.mkdtemp(prefix="tfw"))
    shared.chmod(0o755)  # so that only the socket's own mode keeps the other uid out
    path = shared / "c.sock"
    try:
        with trio.fail_after(10):
            async with backend(echo) as target, controlled(config(route(targets=[target])), path) as (fwd, address):
                assert await first_line_as(NOBODY, address) == "EACCES"  # mode 0600: the kernel turns it away
                path.chmod(0o666)  # a mode opened up by mistake: SO_PEERCRED still refuses
                assert await first_line_as(NOBODY, address) == "HTTP/1.1 403 Forbidden"
                assert f"refused a client of uid {NOBODY}" in caplog.text
                assert (await first_line_as(0, address)).startswith("HTTP/1.1 101 ")  # root is let in
                async with await connect(fwd) as client, triofwd.open_control(address) as control:
                    assert await forwarded(client)
                    assert len(await control.request("connections")) == 1
    finally:
        shutil.rmtree(shared)


# -- commands --------------------------------------------------------------------------------


async def test_a_live_connection_is_listed_and_its_bytes_grow(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(10):
        async with backend(echo) as target, controlled(config(route(targets=[target])), tmp_path / "c.sock") as (fwd, path):
            async with await connect(fwd) as client, triofwd.open_control(path) as control:
                assert await forwarded(client, b"x" * 100)
                [row] = await request_until(control, lambda rows: rows and rows[0]["bytes_out"] == 100, "connections")
                assert row["route"] == "r" and row["target"] == target and row["state"] == "established"
                assert row["client"] == "127.0.0.1:%d" % client.socket.getsockname()[1]
                assert set(row) >= {"id", "route", "client", "target", "state", "age_s", "idle_s", "bytes_in", "bytes_out"}
                assert await forwarded(client, b"y" * 1000)
                [row] = await request_until(control, lambda rows: rows[0]["bytes_out"] == 1100, "connections")
                assert row["bytes_in"] == 1100
                assert await control.request("connection", id=row["id"]) == {**row, "age_s": pytest.approx(row["age_s"], abs=1), "idle_s": pytest.approx(row["idle_s"], abs=1)}


async def test_kill_closes_the_client_at_once_and_counts_killed(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(10):
        async with backend(echo) as target, controlled(config(route(targets=[target])), tmp_path / "c.sock") as (fwd, path):
            async with await connect(fwd) as victim, await connect(fwd) as bystander, triofwd.open_control(path) as control:
                assert await forwarded(victim) and await forwarded(bystander)
                victim_id = next(c.id for c in fwd.connections.values() if c.client.endswith(":%d" % victim.socket.getsockname()[1]))
                row = await control.request("kill", id=victim_id)
                assert row["id"] == victim_id and row["reason"] == "killed"
                with trio.fail_after(1):  # "at once": no timeout of any kind is involved
                    assert await receive_all(victim) == b""
                stats = await request_until(control, lambda s: s["active"] == 1, "stats")
                assert stats["terminations"] == {"killed": 1}
                assert stats["routes"]["r"]["terminations"] == {"killed": 1}
                assert await forwarded(bystander)
                with pytest.raises(triofwd.ControlError, match=f"no connection {victim_id}"):
                    await control.request("kill", id=victim_id)
                with pytest.raises(triofwd.ControlError, match=f"no connection {victim_id}"):
                    await control.request("connection", id=victim_id)


async def test_connections_filters(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(10):
        async with backend(echo) as target, controlled(config(route("a", targets=[target]), route("b", targets=[target])), tmp_path / "c.sock") as (fwd, path):
            async with await connect(fwd, "a") as a, await connect(fwd, "b") as b, triofwd.open_control(path) as control:
                assert await forwarded(a) and await forwarded(b)
                await request_until(control, lambda rows: len(rows) == 2 and all(r["route"] for r in rows), "connections")
                port = a.socket.getsockname()[1]
                assert [r["route"] for r in await control.request("connections", route="b")] == ["b"]
                assert await control.request("connections", route="nope") == []
                assert [r["route"] for r in await control.request("connections", client=f"127.0.0.1:{port}")] == ["a"]
                assert len(await control.request("connections", client="127.0.0.1")) == 2
                assert len(await control.request("connections", client="127.0.0.0/8")) == 2
                assert await control.request("connections", client="10.0.0.0/8") == []
                assert [r["route"] for r in await control.request("connections", route="a", client="127.0.0.1")] == ["a"]
                with pytest.raises(triofwd.ControlError, match="bad client filter '300.0.0.0/8'"):
                    await control.request("connections", client="300.0.0.0/8")


# A request over MAX_REQUEST_BYTES that is well-formed JSON: answered under its id.
LARGE = '{"id": 17, "cmd": "connections", "args": {"route": "%s"}}' % ("r" * MAX_REQUEST_BYTES)


async def test_bad_requests_get_error_replies_and_nothing_else_changes(tmp_path: pathlib.Path) -> None:
    bad: list[tuple[str | bytes, Any, str]] = [
        ("not json", None, "invalid request: JSON is malformed"),
        (b"\xff\xfe binary", None, "invalid request: JSON is malformed"),
        ("[1, 2]", None, "invalid request: Expected `object`, got `array`"),
        ('{"id": 3}', 3, "invalid request: Object missing required field `cmd`"),
        ('{"id": 4, "cmd": 7}', 4, "invalid request: Expected `str`, got `int` - at `$.cmd`"),
        # The id is echoed whenever it can be read, so the client can match the error.
        ('{"id": "5", "cmd": "stats"}', "5", "invalid request: Expected `int | null`, got `str` - at `$.id`"),
        ('{"id": "req-a", "cmd": 7}', "req-a", "invalid request: Expected `int | null`, got `str` - at `$.id`"),
        ('{"cmd": "stats", "id": 2.5}', 2.5, "invalid request: Expected `int | null`, got `float` - at `$.id`"),
        ('{"id": 14, "cmd": "sta', 14, "invalid request: Input data was truncated"),  # cut short: the id leads, so it is read
        ('{"id": "x\\"y", "cmd": 1', 'x"y', "invalid request: Expected `int | null`, got `str` - at `$.id`"),
        ('{"id": 18 "cmd": "stats"}', None, "invalid request: JSON is malformed"),  # no comma after it: not guessed at
        ('{"cmd": "stats", "id": 15', None, "invalid request: Input data was truncated"),  # not leading: not guessed at
        ('{"id": true, "cmd": "stats"}', None, "invalid request: Expected `int | null`, got `bool` - at `$.id`"),
        ('{"id": [16], "cmd": "stats"}', None, "invalid request: Expected `int | null`, got `array` - at `$.id`"),
        ('{"id": 6, "cmd": "stats", "extra": 1}', 6, "invalid request: Object contains unknown field `extra`"),
        ('{"id": 7, "cmd": "shutdown"}', 7, "unknown command 'shutdown'; commands: connections, connection, kill"),
        ('{"id": 8, "cmd": "kill", "args": {"id": "1"}}', 8, "bad arguments for kill: Expected `int`, got `str` - at `$.id`"),
        ('{"id": 9, "cmd": "kill", "args": {}}', 9, "bad arguments for kill: Object missing required field `id`"),
        ('{"id": 10, "cmd": "kill", "args": {"id": 0}}', 10, "bad arguments for kill: Expected `int` >= 1 - at `$.id`"),
        ('{"id": 11, "cmd": "stats", "args": {"verbose": true}}', 11, "bad arguments for stats: Object contains unknown field `verbose`"),
        ('{"id": 12, "cmd": "stats", "args": []}', 12, "bad arguments for stats: Expected `object`, got `array`"),
        ('{"id": 13, "cmd": "connections", "args": {"route": 5}}', 13, "bad arguments for connections: Expected `str | null`, got `int` - at `$.route`"),
        ("x" * (MAX_REQUEST_BYTES + 1), None, f"request too large: {MAX_REQUEST_BYTES + 1} bytes (limit {MAX_REQUEST_BYTES})"),
        (LARGE, 17, f"request too large: {len(LARGE)} bytes (limit {MAX_REQUEST_BYTES})"),
    ]
    with trio.fail_after(10):
        async with backend(echo) as target, controlled(config(route(targets=[target])), tmp_path / "c.sock") as (fwd, path):
            async with await connect(fwd) as client, triofwd.open_control(path) as control:
                assert await forwarded(client)
                for message, reply_id, error in bad:
                    await control.send_raw(message)
                    reply = await control.receive()
                    assert reply["ok"] is False and reply["id"] == reply_id and reply["error"].startswith(error), (message, reply)
                    assert "result" not in reply
                # the same connection still answers, and forwarding never noticed
                assert len(await control.request("connections")) == 1
                assert await forwarded(client)


async def test_a_message_over_the_hard_limit_closes_only_that_client(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(10):
        async with backend(echo) as target, controlled(config(route(targets=[target])), tmp_path / "c.sock") as (fwd, path):
            async with await connect(fwd) as client:
                async with triofwd.open_control(path) as control:
                    await control.send_raw("x" * (WS_MAX_MESSAGE_BYTES + 1))
                    with pytest.raises(ControlConnectionError, match="1009 Exceeded maximum message size"):
                        await control.receive()
                async with triofwd.open_control(path) as control:
                    assert len(await control.request("connections")) == 1
                assert await forwarded(client)


async def test_a_failing_command_is_an_error_reply(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    with trio.fail_after(5):
        async with controlled(config(route(action="reject")), tmp_path / "c.sock") as (fwd, path):
            async with triofwd.open_control(path) as control:
                monkeypatch.setattr(fwd, "stats", broken)
                with pytest.raises(triofwd.ControlError, match="internal error: RuntimeError: boom"):
                    await control.request("stats")
                assert await control.request("connections") == []
    assert "command stats failed" in caplog.text


async def test_many_requests_in_flight_are_answered_in_order(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(5):
        async with controlled(config(route(action="reject")), tmp_path / "c.sock") as (_, path):
            async with triofwd.open_control(path) as control:
                ids = [await control.send("stats") for _ in range(50)]
                replies = [await control.receive() for _ in ids]
    assert [r["id"] for r in replies] == ids and all(r["ok"] for r in replies)


async def test_routes_lists_the_table_with_listeners_and_active_counts(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(5):
        async with backend(echo) as target, controlled(config(route("web", targets=[target]), route("closed", action="reject")), tmp_path / "c.sock") as (fwd, path):
            async with await connect(fwd, "web") as client, triofwd.open_control(path) as control:
                assert await forwarded(client)
                web, closed = await control.request("routes")
                listening = fwd.addresses["web"]
    assert listening and web == {
        "name": "web", "action": "forward", "protocol": "tcp", "bind": "127.0.0.1", "ports": [0], "targets": [target], "balance": "round-robin",
        "priority": 0, "listening": listening, "active": 1, "target_state": [{
            "target": target, "active": 1, "warm": 0, "up": True, "circuit": "closed", "usable": True, "consecutive_failures": 0,
            "failures_total": 0, "circuit_opens_total": 0, "backoff_s": 0.0, "retry_in_s": 0.0, "checks_passed": 0,
            "checks_failed": 0, "last_check": "",
        }],
    }  # fmt: skip
    assert closed["name"] == "closed" and closed["action"] == "reject" and closed["active"] == 0 and closed["targets"] == []
    assert closed["target_state"] == []


async def test_watch_sees_open_then_close_in_order_beside_other_requests(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(10):
        async with backend(echo) as target, controlled(config(route(targets=[target])), tmp_path / "c.sock") as (fwd, path):
            async with triofwd.open_control(path) as watcher:
                assert await watcher.request("watch") == {"watching": True}  # subscribed from here on
                with pytest.raises(triofwd.ControlError, match="already watching"):
                    await watcher.request("watch")
                async with await connect(fwd) as first:
                    assert await forwarded(first, b"hello")
                    await first.send_eof()
                    assert await receive_all(first) == b""
                async with await connect(fwd) as second:
                    await second.send_eof()
                    assert await receive_all(second) == b""
                stats = await watcher.request("stats")  # answered in the middle of the stream
                events = [await watcher.receive() for _ in range(4)]
    assert stats["total"] == 2
    assert [(e["event"], e["id"]) for e in events] == [("open", 1), ("close", 1), ("open", 2), ("close", 2)]
    close = events[1]
    assert close["route"] == "r" and close["reason"] == "normal" and close["bytes_in"] == 5 and close["bytes_out"] == 5
    assert close["target"] == target and events[0]["client"] == close["client"]


class _LaggingForwarder:
    """What Forwarder.watch does to a watcher that fell behind: the stream ends early."""

    @contextlib.contextmanager
    def watch(self, buffer: int) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](2)
        send.send_nowait({"event": "open", "id": 1})
        send.send_nowait({"event": "close", "id": 1})
        send.close()  # dropped
        with receive:
            yield receive


async def test_a_dropped_watcher_is_told_after_the_events_it_got(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            with bind_control_socket(tmp_path / "c.sock") as listener:
                nursery.start_soon(ControlServer(_LaggingForwarder()).serve, [listener])  # type: ignore[arg-type]
                async with triofwd.open_control(tmp_path / "c.sock") as client:
                    request_id = await client.send("watch")
                    messages = [await client.receive() for _ in range(4)]
                    assert await client.request("watch") == {"watching": True}  # the connection stays usable
                nursery.cancel_scope.cancel()
    assert messages == [
        {"id": request_id, "ok": True, "result": {"watching": True}},
        {"event": "open", "id": 1},
        {"event": "close", "id": 1},
        {"id": request_id, "ok": False, "error": "watch dropped: too slow"},
    ]


async def test_drain_closes_the_listeners_and_open_connections_go_on(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(10):
        async with backend(echo) as target, controlled(config(route(targets=[target])), tmp_path / "c.sock") as (fwd, path):
            address = split(fwd.addresses["r"][0])
            async with await connect(fwd) as client, triofwd.open_control(path) as control:
                assert await forwarded(client)
                assert await control.request("drain") == {"draining": True, "active": 1}
                await request_until(control, lambda routes: routes[0]["listening"] == [], "routes")
                with pytest.raises(OSError):
                    await trio.open_tcp_stream(*address)
                assert await forwarded(client)
                stats = await control.request("stats")
                assert stats["draining"] is True and stats["active"] == 1


ROUTES_BEFORE = """
[[routes]]
name = "a"
ports = [0]
bind = "127.0.0.1"
targets = ["127.0.0.1:1"]

[[routes]]
name = "b"
ports = [0]
bind = "127.0.0.1"
action = "reject"
"""
ROUTES_AFTER = ROUTES_BEFORE.replace("127.0.0.1:1", "127.0.0.1:2").replace('name = "b"', 'name = "c"')


async def test_reload_reports_what_changed_and_a_bad_file_keeps_the_old_table(tmp_path: pathlib.Path) -> None:
    routefile = tmp_path / "routes.toml"
    routefile.write_text(ROUTES_BEFORE)
    async with trio.open_nursery() as outer:
        fwd = await outer.start(triofwd.serve, triofwd.load_config(routefile))

        async def reload() -> dict[str, list[str]]:
            return await fwd.reload(triofwd.load_config(routefile))

        with trio.fail_after(5):
            path = await outer.start(functools.partial(triofwd.serve_control, fwd, tmp_path / "c.sock", reload=reload))
            async with triofwd.open_control(path) as control:
                routefile.write_text(ROUTES_AFTER)
                assert await control.request("reload") == {"added": ["c"], "removed": ["b"], "changed": ["a"]}
                assert await control.request("reload") == {"added": [], "removed": [], "changed": []}
                routefile.write_text(ROUTES_AFTER.replace("ports = [0]", "ports = [99999]", 1))
                with pytest.raises(triofwd.ControlError) as bad:
                    await control.request("reload")
                lines = str(bad.value).splitlines()
                assert lines[0] == "reload failed, the old routes stay in force:"
                assert lines[1] == f"{routefile}: Expected `int` <= 65535 - at `$.routes[0].ports[0]`"
                assert [r["name"] for r in await control.request("routes")] == ["a", "c"]
        outer.cancel_scope.cancel()


async def test_reload_without_a_route_file_is_an_error(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(5):
        async with controlled(config(route(action="reject")), tmp_path / "c.sock") as (_, path):
            async with triofwd.open_control(path) as control:
                with pytest.raises(triofwd.ControlError, match="reload is not available"):
                    await control.request("reload")


# -- the real daemon ----------------------------------------------------------------------------


def control(path: str | pathlib.Path, cmd: str, **args: Any) -> Any:
    """One request to a daemon's control socket, from synchronous test code."""

    async def ask() -> Any:
        with trio.fail_after(5):
            async with triofwd.open_control(path) as client:
                return await client.request(cmd, **args)

    return trio.run(ask)


DAEMON_ROUTES = """
[[routes]]
name = "echo"
ports = [0]
bind = "127.0.0.1"
targets = ["{target}"]
"""


def test_the_daemon_control_socket_kills_and_reloads(daemon: Callable[..., Any], tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.sock"
    with threaded_echo() as target:
        d = daemon(DAEMON_ROUTES.format(target=target), "--control", str(path))
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600  # bound before `ready`
        with roundtrip(d.address("echo")) as client:
            [row] = control(path, "connections")
            assert row["route"] == "echo" and row["bytes_in"] == 4
            assert control(path, "kill", id=row["id"])["reason"] == "killed"
            assert client.recv(1) == b""
        wait_for_sync(lambda: [r["reason"] for r in d.access_records()] == ["killed"])
        d.routefile.write_text(DAEMON_ROUTES.format(target=target) + DAEMON_ROUTES.format(target=target).replace('"echo"', '"more"'))
        assert control(path, "reload") == {"added": ["more"], "removed": [], "changed": []}
        assert {r["name"] for r in control(path, "routes")} == {"echo", "more"}
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert not path.exists()


def test_the_daemon_replaces_a_stale_socket_but_not_a_live_one(daemon: Callable[..., Any], tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.sock"
    routes = '[[routes]]\nname = "r"\nports = [0]\nbind = "127.0.0.1"\naction = "reject"\n'
    first = daemon(routes, "--control", str(path))
    second = daemon(routes, "--control", str(path), ready=False)
    assert second.wait() == 2
    assert second.stderr_path.read_text() == f"triofwd: cannot create control socket {path}: another process is serving it\n"
    first.signal(signal.SIGKILL)
    first.wait()
    assert path.exists()  # left behind by the crash
    third = daemon(routes, "--control", str(path))
    assert third.wait_log("replacing stale control socket")
    assert control(path, "stats")["total"] == 0


def wait_for_sync(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll another process's output (a file has no event to await)."""
    trio.run(functools.partial(wait_for, predicate, timeout))
