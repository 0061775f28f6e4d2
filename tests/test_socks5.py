"""socks5 routes through the real serve(), on real sockets: curl as the client where it can
say what is tested, a raw SOCKS5 client where the reply code itself is the point."""

from __future__ import annotations

import errno
import functools
import gc
import socket
import struct
import subprocess
import sys
from typing import Any

import pytest
import trio

import triofwd
from tests.conftest import (
    REPO,
    AccessLogCapture,
    backend,
    black_hole,
    config,
    connect,
    echo,
    forwarder,
    open_fds,
    receive_all,
    receive_exactly,
    refused_address,
    route,
    rst_close,
    run_triofwd,
    split,
    wait_for,
)
from triofwd._credentials import compile_users, hash_password
from triofwd._dynamic import Request
from triofwd._errors import ConnectionEnded
from triofwd._reasons import Reason

CURL_TIMEOUT = 10
BODY = b"hello through the tunnel"


async def http_server(stream: trio.SocketStream) -> None:
    """Reads one request head, answers it and closes: a normal end for the connection."""
    async with stream:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                return
            head += data
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY))
        await receive_all(stream)  # until curl closes: nothing left unread, no reset


async def curl(*args: str) -> tuple[int, bytes, str]:
    with trio.fail_after(CURL_TIMEOUT + 5):
        done = await trio.run_process(["curl", "-sS", "--max-time", str(CURL_TIMEOUT), *args], capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout, done.stderr.decode()


def socks5_route(port: int, **kw: Any) -> triofwd.Route:
    kw.setdefault("destinations", [f"127.0.0.1/32:{port}"])
    return route(action="socks5", **kw)


# -- a raw client: the reply codes themselves ---------------------------------------------


async def handshake(fwd: triofwd.Forwarder, *, credentials: tuple[bytes, bytes] | None = None) -> trio.SocketStream:
    """Connected, greeted and (if given credentials) authenticated."""
    stream = await connect(fwd)
    method = 0x02 if credentials else 0x00
    await stream.send_all(bytes([5, 1, method]))
    assert await receive_exactly(stream, 2) == bytes([5, method])
    if credentials:
        user, password = credentials
        await stream.send_all(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        assert await receive_exactly(stream, 2) == b"\x01\x00"
    return stream


def request(host: str, port: int, command: int = 1) -> bytes:
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        address = bytes([1]) + packed
    except OSError:
        address = bytes([3, len(host)]) + host.encode()
    return bytes([5, command, 0]) + address + struct.pack("!H", port)


async def reply_of(stream: trio.SocketStream) -> int:
    """The REP code of a reply (IPv4 bound address), and the connection closed after a failure."""
    reply = await receive_exactly(stream, 10)
    assert reply[:2] == b"\x05" + reply[1:2] and reply[3] == 1, reply
    return reply[1]


async def ask(fwd: triofwd.Forwarder, host: str, port: int, **kw: Any) -> int:
    async with await handshake(fwd, **kw) as stream:
        await stream.send_all(request(host, port))
        rep = await reply_of(stream)
        if rep != 0:
            assert await receive_all(stream) == b""  # then closed
        return rep


# -- curl ---------------------------------------------------------------------------------


async def test_curl_socks5_reaches_an_allowed_address_and_the_log_says_where() -> None:
    log = AccessLogCapture()
    async with backend(http_server) as target, forwarder(config(socks5_route(split(target)[1])), access_log=log) as fwd:
        code, body, err = await curl("--socks5", fwd.addresses["r"][0], f"http://{target}/")
        [record] = await log.wait(1)
    assert (code, body) == (0, BODY), err
    assert record["reason"] == "normal"
    assert record["destination"] == target and record["target"] == target
    assert record["bytes_out"] > len(BODY) and record["bytes_in"] > 0
    assert not fwd.connections


async def test_curl_socks5_hostname_is_resolved_by_the_forwarder_and_checked_twice() -> None:
    log = AccessLogCapture()
    async with backend(http_server) as target:
        port = split(target)[1]
        # The name is allowed, and so is the loopback address it resolves to (a name alone
        # does not vouch for loopback).
        cfg = config(socks5_route(port, destinations=[f"localhost:{port}", f"127.0.0.1/32:{port}"]))
        async with forwarder(cfg, access_log=log) as fwd:
            code, body, err = await curl("--socks5-hostname", fwd.addresses["r"][0], f"http://localhost:{port}/")
            [record] = await log.wait(1)
    assert (code, body) == (0, BODY), err
    assert (record["reason"], record["destination"], record["target"]) == ("normal", f"localhost:{port}", target)


@pytest.mark.parametrize("flag", ["--socks5", "--socks5-hostname"])
async def test_curl_with_proxy_user_authenticates(flag: str) -> None:
    log = AccessLogCapture()
    async with backend(http_server) as target:
        port = split(target)[1]
        users = [triofwd.User(name="alice", password="s3cret"), triofwd.User(name="bob", password=hash_password("hunter2"))]
        cfg = config(socks5_route(port, destinations=[f"localhost:{port}", f"127.0.0.1/32:{port}"], users=users))
        async with forwarder(cfg, access_log=log) as fwd:
            proxy = fwd.addresses["r"][0]
            ok_plain = await curl(flag, proxy, "--proxy-user", "alice:s3cret", f"http://localhost:{port}/")
            ok_hashed = await curl(flag, proxy, "--proxy-user", "bob:hunter2", f"http://localhost:{port}/")
            wrong = await curl(flag, proxy, "--proxy-user", "alice:wrong", f"http://localhost:{port}/")
            unknown = await curl(flag, proxy, "--proxy-user", "mallory:s3cret", f"http://localhost:{port}/")
            anonymous = await curl(flag, proxy, f"http://localhost:{port}/")
            records = await log.wait(5)
    assert ok_plain[:2] == (0, BODY), ok_plain
    assert ok_hashed[:2] == (0, BODY), ok_hashed
    for failed in (wrong, unknown):
        assert failed[0] != 0 and "User was rejected by the SOCKS5 server (1 1)" in failed[2], failed
    # Without --proxy-user curl offers only "no authentication": no acceptable method.
    assert anonymous[0] != 0 and "No authentication method was acceptable" in anonymous[2], anonymous
    assert [r["reason"] for r in sorted(records, key=lambda r: r["id"])] == ["normal", "normal", "auth_failed", "auth_failed", "auth_failed"]


async def test_curl_is_refused_a_destination_that_is_not_listed() -> None:
    log = AccessLogCapture()
    async with backend(http_server) as target, backend(http_server) as other:
        async with forwarder(config(socks5_route(split(target)[1])), access_log=log) as fwd:
            code, body, err = await curl("--socks5", fwd.addresses["r"][0], f"http://{other}/")
            [record] = await log.wait(1)
    assert code != 0 and body == b"" and "SOCKS5 connection to 127.0.0.1. (2)" in err, err  # REP 0x02: not allowed
    assert (record["reason"], record["destination"], record["target"]) == ("destination_denied", other, None)


# -- reply codes and reasons --------------------------------------------------------------


async def test_reply_codes_and_reasons() -> None:
    """Each failure: the RFC 1928 reply code to the client, the contract's word in the log."""
    log = AccessLogCapture()
    async with backend(echo) as target:
        port = split(target)[1]
        with refused_address() as refused, black_hole() as hole:
            allowed = [f"127.0.0.1/32:{port},{split(refused)[1]},{split(hole)[1]}", f"localhost:{port}", "*.invalid:*"]
            cfg = config(socks5_route(port, destinations=allowed, connect_timeout="300ms"))
            async with forwarder(cfg, access_log=log) as fwd:
                with trio.fail_after(10):
                    results = {
                        "public address, not listed": await ask(fwd, "192.0.2.1", 80),
                        "listed address, other port": await ask(fwd, "127.0.0.1", port + 1 if port < 65535 else port - 1),
                        "name not listed": await ask(fwd, "example.com", 443),
                        "unresolvable name": await ask(fwd, "nothing.invalid", 80),
                        "refused port": await ask(fwd, "127.0.0.1", split(refused)[1]),
                        "silent target": await ask(fwd, "127.0.0.1", split(hole)[1]),
                    }
                    records = await log.wait(len(results))
    assert results == {
        "public address, not listed": 0x02,
        "listed address, other port": 0x02,
        "name not listed": 0x02,
        "unresolvable name": 0x04,
        "refused port": 0x05,
        "silent target": 0x06,
    }
    reasons = [r["reason"] for r in sorted(records, key=lambda r: r["id"])]
    assert reasons == ["destination_denied"] * 3 + ["dns_error", "connect_refused", "connect_timeout"]
    assert [r["destination"] for r in sorted(records, key=lambda r: r["id"])][2:4] == ["example.com:443", "nothing.invalid:80"]
    # The same words in stats and metrics.
    assert fwd.stats()["routes"]["r"]["terminations"] == {"connect_refused": 1, "connect_timeout": 1, "destination_denied": 3, "dns_error": 1}
    metrics = triofwd.metrics_text(fwd)
    assert 'triofwd_terminations_total{route="r",reason="destination_denied"} 3' in metrics
    assert 'triofwd_terminations_total{route="r",reason="auth_failed"} 0' in metrics


async def test_a_name_that_resolves_to_a_denied_address_is_denied() -> None:
    """DNS rebinding: the name is on the list, the loopback address it resolves to is not."""
    log = AccessLogCapture()
    async with backend(echo) as target:
        port = split(target)[1]
        async with forwarder(config(socks5_route(port, destinations=[f"localhost:{port}"])), access_log=log) as fwd:
            with trio.fail_after(5):
                rep = await ask(fwd, "localhost", port)
                [record] = await log.wait(1)
    assert rep == 0x02
    assert (record["reason"], record["destination"], record["target"]) == ("destination_denied", f"localhost:{port}", None)


async def test_an_ipv6_destination() -> None:
    log = AccessLogCapture()
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="::1"))
        port = listener.socket.getsockname()[1]
        async with forwarder(config(socks5_route(port, destinations=[f"[::1]:{port}"])), access_log=log) as fwd:
            with trio.fail_after(5):
                async with await handshake(fwd) as stream:
                    await stream.send_all(b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!H", port))
                    reply = await receive_exactly(stream, 22)  # the bound address is IPv6 too
                    assert reply[:4] == b"\x05\x00\x00\x04"
                    await stream.send_all(b"ping")
                    assert await receive_exactly(stream, 4) == b"ping"
                [record] = await log.wait(1)
        nursery.cancel_scope.cancel()
    assert (record["reason"], record["destination"], record["target"]) == ("normal", f"[::1]:{port}", f"[::1]:{port}")


async def test_bind_and_udp_associate_are_not_supported() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(socks5_route(split(target)[1])), access_log=log) as fwd:
        with trio.fail_after(5):
            for command in (2, 3):
                async with await handshake(fwd) as stream:
                    await stream.send_all(request("127.0.0.1", split(target)[1], command))
                    assert await reply_of(stream) == 0x07
            async with await handshake(fwd) as stream:
                await stream.send_all(b"\x05\x01\x00\x09\x00\x00")  # address type 9
                assert await reply_of(stream) == 0x08
            records = await log.wait(3)
    assert [r["reason"] for r in records] == ["rejected"] * 3


async def test_a_silent_client_ends_with_initial_data_timeout() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(socks5_route(split(target)[1], initial_data_timeout="200ms")), access_log=log) as fwd:
        with trio.fail_after(5):
            async with await connect(fwd) as silent:
                assert await receive_all(silent) == b""  # closed, with nothing to say
            async with await connect(fwd) as slow:
                await slow.send_all(b"\x05\x01\x00")
                assert await receive_exactly(slow, 2) == b"\x05\x00"  # greeted, then never asks
                assert await receive_all(slow) == b""
            records = await log.wait(2)
    assert [r["reason"] for r in records] == ["initial_data_timeout"] * 2
    assert all(r["duration_ms"] >= 200 for r in records)


async def test_relayed_like_forward_with_early_data_half_close_and_proxy_header() -> None:
    """After the reply the connection is the forward path's: bytes the client sent with its
    request go first, half-close is passed on, the PROXY header names the real client."""
    seen: list[bytes] = []

    async def header_then_echo(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n" not in data:
                data += await stream.receive_some(4096)
            header, _, rest = data.partition(b"\r\n")
            seen.append(header)
            await stream.send_all(rest + await receive_all(stream))
            await stream.send_eof()

    log = AccessLogCapture()
    async with backend(header_then_echo) as target, forwarder(config(socks5_route(split(target)[1], proxy_protocol="v1")), access_log=log) as fwd:
        with trio.fail_after(5):
            stream = await handshake(fwd)
            await stream.send_all(request(*split(target)) + b"early ")  # before any reply
            assert await reply_of(stream) == 0
            await stream.send_all(b"and late")
            await stream.send_eof()
            assert await receive_all(stream) == b"early and late"
            client = "%s %d" % stream.socket.getsockname()[:2]
            listening = split(fwd.addresses["r"][0])[1]
            await stream.aclose()
            [record] = await log.wait(1)
    host, port = client.split()
    assert seen == [f"PROXY TCP4 {host} 127.0.0.1 {port} {listening}".encode()]
    assert (record["reason"], record["bytes_in"], record["bytes_out"]) == ("normal", 14, 14)  # the tunnel's bytes, not the handshake's


async def test_the_inspector_shows_the_destination_and_kill_ends_it() -> None:
    log = AccessLogCapture()
    async with backend(echo) as target, forwarder(config(socks5_route(split(target)[1])), access_log=log) as fwd:
        with trio.fail_after(5):
            stream = await handshake(fwd)
            await stream.send_all(request(*split(target)))
            assert await reply_of(stream) == 0
            await stream.send_all(b"ping")
            assert await receive_exactly(stream, 4) == b"ping"
            [conn] = fwd.connections.values()
            row = conn.describe()
            assert (row["state"], row["destination"], row["target"]) == ("established", target, target)
            conn.kill()
            assert await receive_all(stream) == b""
            [record] = await log.wait(1)
    assert record["reason"] == "killed"


async def test_a_client_that_resets_mid_handshake_leaks_nothing() -> None:
    """Resets at every step of the handshake (and a hashed password being checked): each
    ends client_reset; the table empties and the fds come back to where they were."""
    stages = [b"", b"\x05", b"\x05\x02\x00\x02", b"\x05\x01\x02\x01\x05alice", b"\x05\x01\x02\x01\x05alice\x06s3cret"]
    log = AccessLogCapture()
    async with backend(echo) as target:
        port = split(target)[1]
        users = [triofwd.User(name="alice", password=hash_password("s3cret"))]
        async with forwarder(config(socks5_route(port, users=users)), access_log=log) as fwd:
            with trio.fail_after(30):
                # Warm up what is made once (the thread that checks passwords, the engine's pipes).
                async with await handshake(fwd, credentials=(b"alice", b"s3cret")) as stream:
                    await stream.send_all(request(*split(target)))
                    assert await reply_of(stream) == 0
                await log.wait(1)
                gc.collect()
                baseline = open_fds()
                rounds = 20
                for _ in range(rounds):
                    for stage in stages:
                        stream = await connect(fwd)
                        if stage:
                            await stream.send_all(stage)
                        rst_close(stream)
                records = await log.wait(1 + rounds * len(stages))
                await wait_for(lambda: not fwd.connections)
                gc.collect()
                assert open_fds() == baseline
    reasons = [r["reason"] for r in records[1:]]
    assert set(reasons) == {"client_reset"}, reasons


# -- the example route file, and hashes made for it --------------------------------------------


def test_the_example_route_file_passes_check() -> None:
    result = run_triofwd("check", "routes/dynamic.toml")
    assert (result.returncode, result.stdout) == (0, "ok: 2 routes\n"), result.stderr


def test_hash_password_makes_a_hash_the_route_file_takes() -> None:
    made = subprocess.run([sys.executable, "tools/hash_password.py"], input="correct horse", capture_output=True, text=True, timeout=20, cwd=REPO, check=True)
    users = compile_users([("alice", made.stdout.strip())])
    assert made.stdout.startswith("scrypt$") and users.verify("alice", "correct horse") and not users.verify("alice", "correct")


# -- pure: what the client is told ----------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "cause", "socks", "http"),
    [
        (Reason.DESTINATION_DENIED, None, 0x02, 403),
        (Reason.CONNECT_REFUSED, OSError(errno.ECONNREFUSED, "refused"), 0x05, 502),
        (Reason.TARGET_UNREACHABLE, OSError(errno.ENETUNREACH, "network is unreachable"), 0x03, 502),
        (Reason.TARGET_UNREACHABLE, OSError(errno.EHOSTUNREACH, "no route to host"), 0x04, 502),
        (Reason.TARGET_UNREACHABLE, None, 0x04, 502),
        (Reason.CONNECT_TIMEOUT, None, 0x06, 504),
        (Reason.DNS_ERROR, None, 0x04, 502),
        (Reason.CAPACITY, None, 0x01, 502),
    ],
)
def test_what_a_failed_request_is_answered(reason: Reason, cause: OSError | None, socks: int, http: int) -> None:
    ended = ConnectionEnded(reason)
    ended.__cause__ = cause
    with socket.socket() as sock:
        assert Request("socks5", sock, "example.com", 443, b"").refusal(ended)[:2] == bytes([5, socks])
        assert Request("http_connect", sock, "example.com", 443, b"").refusal(ended).startswith(b"HTTP/1.1 %d " % http)
