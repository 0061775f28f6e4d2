"""http_connect routes through the real serve(), on real sockets: curl --proxytunnel as the
client, and a raw client for what curl cannot send (other methods, early data, silence)."""

from __future__ import annotations

import base64
from typing import Any

import trio

import triofwd
from tests.conftest import (
    AccessLogCapture,
    backend,
    black_hole,
    config,
    connect,
    echo,
    forwarder,
    receive_all,
    receive_exactly,
    refused_address,
    route,
    split,
)
from tests.test_socks5 import BODY, curl, http_server
from triofwd._credentials import hash_password


def connect_route(port: int, **kw: Any) -> triofwd.Route:
    kw.setdefault("destinations", [f"127.0.0.1/32:{port}"])
    return route(action="http_connect", **kw)


async def status_of(fwd: triofwd.Forwarder, head: bytes) -> tuple[int, bytes]:
    """The status of the forwarder's answer to `head`, and all it sent before closing."""
    async with await connect(fwd) as stream:
        await stream.send_all(head)
        answer = await receive_all(stream)
    return int(answer.split(b" ", 2)[1]), answer


def connect_head(authority: str, credentials: str | None = None) -> bytes:
    auth = b"" if credentials is None else b"Proxy-Authorization: Basic %s\r\n" % base64.b64encode(credentials.encode())
    return b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (authority.encode(), authority.encode(), auth)


async def test_curl_proxytunnel_reaches_an_allowed_address() -> None:
    log = AccessLogCapture()
    async with backend(http_server) as target, forwarder(config(connect_route(split(target)[1])), access_log=log) as fwd:
        code, body, err = await curl("--proxytunnel", "-x", f"http://{fwd.addresses['r'][0]}", f"http://{target}/")
        [record] = await log.wait(1)
    assert (code, body) == (0, BODY), err
    assert (record["reason"], record["destination"], record["target"]) == ("normal", target, target)
    assert not fwd.connections


async def test_curl_proxytunnel_with_a_name_and_users() -> None:
    log = AccessLogCapture()
    async with backend(http_server) as target:
        port = split(target)[1]
        users = [triofwd.User(name="alice", password="s3cret"), triofwd.User(name="bob", password=hash_password("hunter2"))]
        cfg = config(connect_route(port, destinations=[f"localhost:{port}", f"127.0.0.1/32:{port}"], users=users))
        async with forwarder(cfg, access_log=log) as fwd:
            proxy = fwd.addresses["r"][0]
            url = f"http://localhost:{port}/"
            ok_plain = await curl("--proxytunnel", "-x", f"http://alice:s3cret@{proxy}", url)
            ok_hashed = await curl("--proxytunnel", "-x", f"http://{proxy}", "--proxy-user", "bob:hunter2", url)
            wrong = await curl("--proxytunnel", "-x", f"http://alice:nope@{proxy}", url)
            anonymous = await curl("--proxytunnel", "-x", f"http://{proxy}", url)
            records = sorted(await log.wait(4), key=lambda r: r["id"])
    assert ok_plain[:2] == (0, BODY), ok_plain
    assert ok_hashed[:2] == (0, BODY), ok_hashed
    for failed in (wrong, anonymous):
        assert failed[0] != 0 and "CONNECT tunnel failed, response 407" in failed[2], failed
    assert [r["reason"] for r in records] == ["normal", "normal", "auth_failed", "auth_failed"]
    assert records[0]["destination"] == f"localhost:{port}" and records[0]["target"] == target


async def test_curl_is_answered_403_for_a_destination_that_is_not_listed() -> None:
    log = AccessLogCapture()
    async with backend(http_server) as target, backend(http_server) as other:
        async with forwarder(config(connect_route(split(target)[1])), access_log=log) as fwd:
            code, body, err = await curl("--proxytunnel", "-x", f"http://{fwd.addresses['r'][0]}", f"http://{other}/")
            [record] = await log.wait(1)
    assert code != 0 and body == b"" and "CONNECT tunnel failed, response 403" in err, err
    assert (record["reason"], record["destination"], record["target"]) == ("destination_denied", other, None)


async def test_statuses_and_reasons() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target:
        port = split(target)[1]
        with refused_address() as refused, black_hole() as hole:
            # localhost:7 is allowed by name, but not the loopback address it resolves to.
            allowed = [f"127.0.0.1/32:{port},{split(refused)[1]},{split(hole)[1]}", "localhost:7", "*.invalid:*"]
            async with forwarder(config(connect_route(port, destinations=allowed, connect_timeout="300ms")), access_log=log) as fwd:
                with trio.fail_after(10):
                    results = {
                        "not listed": await status_of(fwd, connect_head("192.0.2.1:443")),
                        "rebinding": await status_of(fwd, connect_head("localhost:7")),
                        "unresolvable": await status_of(fwd, connect_head("nothing.invalid:443")),
                        "refused": await status_of(fwd, connect_head(refused)),
                        "silent target": await status_of(fwd, connect_head(hole)),
                        "not CONNECT": await status_of(fwd, b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"),
                        "not HTTP": await status_of(fwd, b"\x16\x03\x01\x00\x05hello\r\n\r\n"),
                    }
                    records = sorted(await log.wait(len(results)), key=lambda r: r["id"])
    assert {what: status for what, (status, _) in results.items()} == {
        "not listed": 403,
        "rebinding": 403,
        "unresolvable": 502,
        "refused": 502,
        "silent target": 504,
        "not CONNECT": 405,
        "not HTTP": 400,
    }
    assert all(b"Connection: close" in answer for _, answer in results.values())
    reasons = [r["reason"] for r in records]
    assert reasons == ["destination_denied", "destination_denied", "dns_error", "connect_refused", "connect_timeout", "rejected", "rejected"]


async def test_a_silent_client_ends_with_initial_data_timeout() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(connect_route(split(target)[1], initial_data_timeout="200ms")), access_log=log) as fwd:
        with trio.fail_after(5):
            async with await connect(fwd) as silent:
                assert await receive_all(silent) == b""
            async with await connect(fwd) as partial:
                await partial.send_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")  # and never the rest
                assert await receive_all(partial) == b""
            records = await log.wait(2)
    assert [r["reason"] for r in records] == ["initial_data_timeout"] * 2
    assert all(r["duration_ms"] >= 200 for r in records)


async def test_bytes_sent_with_the_request_reach_the_target_first() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(connect_route(split(target)[1])), access_log=log) as fwd:
        with trio.fail_after(5):
            async with await connect(fwd) as stream:
                await stream.send_all(connect_head(target) + b"early ")
                established = b"HTTP/1.1 200 Connection established\r\n\r\n"
                assert await receive_exactly(stream, len(established)) == established
                await stream.send_all(b"and late")
                await stream.send_eof()
                assert await receive_all(stream) == b"early and late"
            [record] = await log.wait(1)
    assert (record["reason"], record["bytes_in"], record["bytes_out"]) == ("normal", 14, 14)
