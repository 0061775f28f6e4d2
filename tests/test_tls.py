"""SNI routing, the TLS bridge and PROXY protocol, with real TLS and certificates made in the test."""

from __future__ import annotations

import contextlib
import functools
import pathlib
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable

import pytest
import trio
import trio.testing
import trustme

import triofwd
from tests.conftest import (
    AccessLogCapture,
    backend,
    config,
    echo,
    forwarder,
    free_port,
    receive_all,
    receive_exactly,
    refused_address,
    route,
    run_triofwd,
    split,
)
from triofwd._proxy_protocol import parse_proxy_header


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, tmp: pathlib.Path, name: str) -> triofwd.TLS:
    issued = ca.issue_cert(name)
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    return triofwd.TLS(cert=str(cert), key=str(key))


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def tls_connect(address: str, ctx: ssl.SSLContext, name: str) -> trio.SSLStream:
    stream = await trio.open_tcp_stream(*split(address))
    secure = trio.SSLStream(stream, ctx, server_hostname=name, https_compatible=True)
    await secure.do_handshake()
    return secure


@contextlib.asynccontextmanager
async def tls_backend(ca: trustme.CA, name: str, reply: bytes) -> AsyncIterator[str]:
    """A TLS server for `name`: answers `reply` + the first bytes it got, then closes."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)

    async def handler(stream: trio.SocketStream) -> None:
        secure = trio.SSLStream(stream, ctx, server_side=True, https_compatible=True)
        with contextlib.suppress(trio.BrokenResourceError):
            data = await secure.receive_some()
            await secure.send_all(reply + data)
            await secure.aclose()

    async with backend(handler) as address:
        yield address


class Recorder:
    """A plaintext backend that records everything it receives until EOF; answers `reply` once it got `after`."""

    def __init__(self, reply: bytes, after: bytes) -> None:
        self.reply = reply
        self.after = after
        self.received: list[bytes] = []
        self.done = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        data = bytearray()
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                async for chunk in stream:
                    data += chunk
                    if data.endswith(self.after):
                        await stream.send_all(self.reply)
        self.received.append(bytes(data))
        self.done.set()


async def test_two_sni_names_on_one_port_reach_two_targets_untouched(ca: trustme.CA) -> None:
    port = free_port()
    log = AccessLogCapture()
    async with tls_backend(ca, "a.example", b"A:") as a, tls_backend(ca, "b.example", b"B:") as b:
        cfg = config(
            route("ra", ports=[port], domains=["a.example"], targets=[a]),
            route("rb", ports=[port], domains=["*.example"], targets=[b]),  # a.example is taken by ra first (file order)
        )
        async with forwarder(cfg, access_log=log) as fwd:
            address = fwd.addresses["ra"][0]
            assert fwd.addresses["rb"] == [address]
            for name, expected in (("a.example", b"A:hi"), ("b.example", b"B:hi")):
                with trio.fail_after(5):
                    secure = await tls_connect(address, client_context(ca), name)  # the target's certificate: end to end
                    await secure.send_all(b"hi")
                    assert await receive_all(secure) == expected
                    await secure.aclose()  # passthrough: the connection is open until the client closes too
            records = await log.wait(2)
    assert [(r["route"], r["reason"]) for r in records] == [("ra", "normal"), ("rb", "normal")]


async def test_wrong_sni_plain_http_and_silence_on_an_sni_port(ca: trustme.CA) -> None:
    port = free_port()
    log = AccessLogCapture()
    async with tls_backend(ca, "a.example", b"A:") as a:
        cfg = config(route("ra", ports=[port], domains=["a.example"], targets=[a]), initial_data_timeout="300ms")
        async with forwarder(cfg, access_log=log) as fwd:
            address = fwd.addresses["ra"][0]
            with pytest.raises(trio.BrokenResourceError):
                await tls_connect(address, client_context(ca), "c.example")
            plain = await trio.open_tcp_stream(*split(address))
            await plain.send_all(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            assert await receive_all(plain) == b""
            silent = await trio.open_tcp_stream(*split(address))
            with trio.fail_after(3):
                assert await receive_all(silent) == b""
            records = await log.wait(3)
    assert [r["reason"] for r in records] == ["no_route", "no_route", "initial_data_timeout"]


async def test_a_route_without_domains_is_the_fallback_for_other_names_and_plain_bytes(ca: trustme.CA) -> None:
    port = free_port()
    log = AccessLogCapture()
    async with tls_backend(ca, "a.example", b"A:") as a, backend(echo) as plain:
        cfg = config(route("ra", ports=[port], domains=["a.example"], targets=[a]), route("rest", ports=[port], targets=[plain]))
        async with forwarder(cfg, access_log=log) as fwd:
            client = await trio.open_tcp_stream(*split(fwd.addresses["rest"][0]))
            await client.send_all(b"not tls at all")
            assert await receive_exactly(client, 14) == b"not tls at all"
            [conn] = fwd.connections.values()
            assert conn.route == "rest"


async def test_terminate_delivers_plaintext_and_the_real_client_in_a_proxy_header(ca: trustme.CA, tmp_path: pathlib.Path) -> None:
    target = Recorder(reply=b"hello over tls\n", after=b"plaintext line\n")
    log = AccessLogCapture()
    tls = write_cert(ca, tmp_path, "secure.example")
    tls.mode = "terminate"
    async with backend(target) as address:
        cfg = config(route(action="bridge", domains=["secure.example"], targets=[address], proxy_protocol="v1", tls=tls))
        async with forwarder(cfg, access_log=log) as fwd:
            with trio.fail_after(5):
                secure = await tls_connect(fwd.addresses["r"][0], client_context(ca), "secure.example")
                await secure.send_all(b"plaintext line\n")
                assert await receive_exactly(secure, 15) == b"hello over tls\n"
                client_port = secure.transport_stream.socket.getsockname()[1]
                await secure.aclose()  # close_notify: the target gets its EOF
                await target.done.wait()
                [record] = await log.wait(1)
    header, used = parse_proxy_header(target.received[0])
    assert header.source == ("127.0.0.1", client_port)
    assert target.received[0][used:] == b"plaintext line\n"
    assert (record["reason"], record["bytes_in"], record["bytes_out"]) == ("normal", 15, 15)


async def test_reencrypt_verifies_the_target(ca: trustme.CA, tmp_path: pathlib.Path) -> None:
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    log = AccessLogCapture()
    async with tls_backend(ca, "target.example", b"T:") as target:
        def cfg(target_sni: str) -> triofwd.Config:
            tls = write_cert(ca, tmp_path, "front.example")
            tls.mode, tls.target_ca, tls.target_sni = "reencrypt", str(tmp_path / "ca.pem"), target_sni
            return config(route(action="bridge", targets=[target], tls=tls))

        async with forwarder(cfg("target.example"), access_log=log) as fwd:
            with trio.fail_after(5):
                secure = await tls_connect(fwd.addresses["r"][0], client_context(ca), "front.example")
                await secure.send_all(b"x")
                assert await receive_all(secure) == b"T:x"
            await fwd.reload(cfg("wrong.example"))  # the target's certificate does not carry this name
            raw = await trio.open_tcp_stream(*split(fwd.addresses["r"][0]))
            secure = trio.SSLStream(raw, client_context(ca), server_hostname="front.example")
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                await secure.do_handshake()  # the forwarder gives up before answering the client
            records = await log.wait(2)
    assert [r["reason"] for r in records] == ["normal", "tls_error"]


async def test_a_failed_client_handshake_is_tls_error(ca: trustme.CA, tmp_path: pathlib.Path) -> None:
    tls = write_cert(ca, tmp_path, "secure.example")
    tls.mode = "terminate"
    log = AccessLogCapture()
    async with backend(echo) as address, forwarder(config(route(action="bridge", targets=[address], tls=tls)), access_log=log) as fwd:
        untrusting = ssl.create_default_context()  # does not trust the test CA

        def python_ssl_client() -> None:  # it sends its "unknown CA" alert, as real clients do
            with socket.create_connection(split(fwd.addresses["r"][0]), timeout=5) as raw:
                with pytest.raises(ssl.SSLCertVerificationError):
                    untrusting.wrap_socket(raw, server_hostname="secure.example")

        await trio.to_thread.run_sync(python_ssl_client)
        [record] = await log.wait(1)
    assert record["reason"] == "tls_error"


async def test_bridge_to_an_external_terminator_carries_the_real_client(ca: trustme.CA, tmp_path: pathlib.Path) -> None:
    """Front triofwd (bridge_to) -> terminating triofwd (accept_proxy_protocol) -> target (PROXY v1)."""
    target = Recorder(reply=b"ok\n", after=b"two hops\n")
    tls = write_cert(ca, tmp_path, "secure.example")
    tls.mode = "terminate"
    front_log, back_log = AccessLogCapture(), AccessLogCapture()
    async with backend(target) as address:
        back = config(route("term", action="bridge", accept_proxy_protocol=True, proxy_protocol="v1", targets=[address], tls=tls),
                      trusted_proxies=["127.0.0.0/8"])  # fmt: skip
        async with forwarder(back, access_log=back_log) as terminator:
            front = config(route("front", action="bridge", bridge_to=terminator.addresses["term"][0]))
            async with forwarder(front, access_log=front_log) as fwd:
                with trio.fail_after(5):
                    source = ("127.0.0.5", 0)
                    raw = await trio.open_tcp_stream(*split(fwd.addresses["front"][0]), local_address=source[0])
                    client_port = raw.socket.getsockname()[1]
                    secure = trio.SSLStream(raw, client_context(ca), server_hostname="secure.example", https_compatible=True)
                    await secure.send_all(b"through two hops\n")
                    assert await receive_exactly(secure, 3) == b"ok\n"
                    await secure.aclose()
                    await target.done.wait()
                    [front_record] = await front_log.wait(1)
                    [back_record] = await back_log.wait(1)
    header, used = parse_proxy_header(target.received[0])
    assert header.source == ("127.0.0.5", client_port)
    assert target.received[0][used:] == b"through two hops\n"
    assert back_record["client"] == f"127.0.0.5:{client_port}"
    assert (front_record["reason"], back_record["reason"]) == ("normal", "normal")


async def test_an_unreachable_external_terminator_is_bridge_error() -> None:
    with refused_address() as unused:
        log = AccessLogCapture()
        cfg = config(route(action="bridge", bridge_to=unused, connect_retries=0))
        async with forwarder(cfg, access_log=log) as fwd:
            raw = await trio.open_tcp_stream(*split(fwd.addresses["r"][0]))
            secure = trio.SSLStream(raw, ssl.create_default_context(), server_hostname="x.example")
            with pytest.raises(trio.BrokenResourceError):
                await secure.do_handshake()
            [record] = await log.wait(1)
    assert record["reason"] == "bridge_error"


async def test_proxy_header_accepted_from_trusted_and_refused_from_others() -> None:
    log = AccessLogCapture()
    async with backend(echo) as address:
        cfg = config(route(accept_proxy_protocol=True, targets=[address]), trusted_proxies=["127.0.0.2/32"])
        async with forwarder(cfg, access_log=log) as fwd:
            host, port = split(fwd.addresses["r"][0])
            trusted = await trio.open_tcp_stream(host, port, local_address="127.0.0.2")
            await trusted.send_all(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 443\r\nhello")
            assert await receive_exactly(trusted, 5) == b"hello"
            [conn] = fwd.connections.values()
            assert conn.client == "198.51.100.7:40000"
            await trusted.aclose()
            untrusted = await trio.open_tcp_stream(host, port, local_address="127.0.0.3")
            await untrusted.send_all(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 443\r\n")
            assert await receive_all(untrusted) == b""
            direct = await trio.open_tcp_stream(host, port, local_address="127.0.0.4")
            await direct.send_all(b"plain client")
            assert await receive_exactly(direct, 12) == b"plain client"
            await direct.aclose()
            broken = await trio.open_tcp_stream(host, port, local_address="127.0.0.2")
            await broken.send_all(b"PROXY TCP9 nonsense\r\n")
            assert await receive_all(broken) == b""
            records = await log.wait(4)
    by_client = {r["client"].rsplit(":", 1)[0]: r["reason"] for r in records}
    assert by_client == {"198.51.100.7": "normal", "127.0.0.3": "rejected", "127.0.0.4": "normal", "127.0.0.2": "rejected"}


async def test_tls_eof_from_the_target_ends_the_connection_promptly(ca: trustme.CA, tmp_path: pathlib.Path) -> None:
    """trio's SSLStream has no half-close: the target's EOF ends the connection, and the client sees close_notify."""

    async def says_bye(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"bye")
            await stream.send_eof()
            await trio.sleep_forever()  # keeps its read side open: no full close from here

    tls = write_cert(ca, tmp_path, "secure.example")
    tls.mode = "terminate"
    log = AccessLogCapture()
    async with backend(says_bye) as address, forwarder(config(route(action="bridge", targets=[address], tls=tls)), access_log=log) as fwd:
        with trio.fail_after(3):
            secure = await tls_connect(fwd.addresses["r"][0], client_context(ca), "secure.example")
            secure_strict = secure  # https_compatible only forgives a missing close_notify; we check we got one
            assert await receive_all(secure_strict) == b"bye"
            [record] = await log.wait(1)
    assert record["reason"] == "normal"


async def test_routes_examples_for_each_mode_pass_check() -> None:
    for name in ("sni.toml", "bridge.toml", "proxy-protocol.yaml", "health.toml"):
        result = await trio.to_thread.run_sync(functools.partial(run_triofwd, "check", f"routes/{name}"))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok: ")


async def test_the_certificate_is_chosen_by_sni_from_the_matching_route(ca: trustme.CA, tmp_path: pathlib.Path) -> None:
    port = free_port()
    async with backend(echo) as address:
        routes = []
        for name in ("a.example", "b.example"):
            tls = write_cert(ca, tmp_path, name)
            tls.mode = "terminate"
            routes.append(route(name.split(".")[0], ports=[port], domains=[name], action="bridge", targets=[address], tls=tls))
        async with forwarder(config(*routes)) as fwd:
            for name in ("a.example", "b.example"):
                secure = await tls_connect(fwd.addresses["a"][0], client_context(ca), name)  # verifies the name
                cert = secure.getpeercert()
                assert ("DNS", name) in cert["subjectAltName"]
                await secure.aclose()


async def test_min_version_is_enforced(ca: trustme.CA, tmp_path: pathlib.Path) -> None:
    tls = write_cert(ca, tmp_path, "secure.example")
    tls.mode, tls.min_version = "terminate", "1.3"
    log = AccessLogCapture()
    async with backend(echo) as address, forwarder(config(route(action="bridge", targets=[address], tls=tls)), access_log=log) as fwd:
        old = client_context(ca)
        old.maximum_version = ssl.TLSVersion.TLSv1_2

        def python_ssl_client() -> None:
            with socket.create_connection(split(fwd.addresses["r"][0]), timeout=5) as raw:
                with pytest.raises(ssl.SSLError):
                    old.wrap_socket(raw, server_hostname="secure.example")

        await trio.to_thread.run_sync(python_ssl_client)
        [record] = await log.wait(1)
        modern = await tls_connect(fwd.addresses["r"][0], client_context(ca), "secure.example")
        assert modern.version() == "TLSv1.3"
        await modern.aclose()
    assert record["reason"] == "tls_error"


async def test_reencrypt_passes_alpn_through_to_the_target(ca: trustme.CA, tmp_path: pathlib.Path) -> None:
    target_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("target.example").configure_cert(target_ctx)
    target_ctx.set_alpn_protocols(["h2"])  # the target speaks only h2
    chosen: list[str | None] = []

    async def handler(stream: trio.SocketStream) -> None:
        secure = trio.SSLStream(stream, target_ctx, server_side=True, https_compatible=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await secure.do_handshake()
            chosen.append(secure.selected_alpn_protocol())
            await secure.aclose()

    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    tls = write_cert(ca, tmp_path, "front.example")
    tls.mode, tls.target_ca, tls.target_sni = "reencrypt", str(tmp_path / "ca.pem"), "target.example"
    async with backend(handler) as address, forwarder(config(route(action="bridge", targets=[address], tls=tls))) as fwd:
        ctx = client_context(ca)
        ctx.set_alpn_protocols(["http/1.1", "h2"])
        secure = await tls_connect(fwd.addresses["r"][0], ctx, "front.example")
        client_got = secure.selected_alpn_protocol()
        await secure.aclose()
    assert chosen == ["h2"] and client_got == "h2"


async def test_certificates_are_read_again_on_reload(tmp_path: pathlib.Path) -> None:
    first_ca, second_ca = trustme.CA(), trustme.CA()
    tls = write_cert(first_ca, tmp_path, "secure.example")
    tls.mode = "terminate"
    async with backend(echo) as address:
        cfg = config(route(action="bridge", targets=[address], tls=tls))
        async with forwarder(cfg) as fwd:
            (await tls_connect(fwd.addresses["r"][0], client_context(first_ca), "secure.example")).transport_stream.socket.close()
            write_cert(second_ca, tmp_path, "secure.example")  # renewed in place, same paths
            await fwd.reload(cfg)
            secure = await tls_connect(fwd.addresses["r"][0], client_context(second_ca), "secure.example")
            await secure.aclose()


async def test_passthrough_delivers_the_clienthello_byte_for_byte() -> None:
    from triofwd.testing import build_client_hello

    hello = build_client_hello("a.example", alpn=("h2",), split_records=3)  # several records, as some clients send
    target = Recorder(reply=b"", after=b"\x00never")
    port = free_port()
    async with backend(target) as address, forwarder(config(route("ra", ports=[port], domains=["a.example"], targets=[address]))) as fwd:
        with trio.fail_after(5):
            client = await trio.open_tcp_stream(*split(fwd.addresses["ra"][0]))
            for i in range(0, len(hello), 7):  # and split over many small writes
                await client.send_all(hello[i : i + 7])
            await client.send_eof()
            await target.done.wait()
            await client.aclose()
    assert target.received == [hello]


@pytest.mark.parametrize("mode", ["terminate", "reencrypt"])
async def test_a_refused_tls_client_hears_the_alert(ca: trustme.CA, tmp_path: pathlib.Path, mode: str) -> None:
    """openssl s_client offering only TLS 1.1 to a route with min_version 1.2 is told why:
    the protocol_version alert (70), as nginx sends it, not an unexpected EOF."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command line tool")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    tls = write_cert(ca, tmp_path, "secure.example")
    tls.mode, tls.min_version = mode, "1.2"
    if mode == "reencrypt":
        tls.target_ca = str(tmp_path / "ca.pem")
    log = AccessLogCapture()
    async with tls_backend(ca, "secure.example", b"") as address, forwarder(config(route(action="bridge", targets=[address], tls=tls)), access_log=log) as fwd:
        host, port = split(fwd.addresses["r"][0])
        argv = ["openssl", "s_client", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-connect", f"{host}:{port}", "-servername", "secure.example"]
        with trio.fail_after(10):
            done = await trio.run_process(argv, stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False)
            [record] = await log.wait(1)
    assert done.returncode != 0
    assert b"alert protocol version" in done.stderr and b"alert number 70" in done.stderr, done.stderr
    assert record["reason"] == "tls_error"


async def test_reencrypt_tells_a_target_it_does_not_trust_why(ca: trustme.CA, tmp_path: pathlib.Path) -> None:
    """A target whose certificate the route's target_ca does not vouch for gets the alert
    (unknown_ca), then the connection ends tls_error."""
    stranger = trustme.CA()
    target_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stranger.issue_cert("target.example").configure_cert(target_ctx)
    seen: list[BaseException] = []

    async def handler(stream: trio.SocketStream) -> None:
        secure = trio.SSLStream(stream, target_ctx, server_side=True)
        try:
            await secure.do_handshake()
        except trio.BrokenResourceError as exc:
            seen.append(exc.__cause__ or exc)
        await stream.aclose()

    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    tls = write_cert(ca, tmp_path, "front.example")
    tls.mode, tls.target_ca, tls.target_sni = "reencrypt", str(tmp_path / "ca.pem"), "target.example"
    log = AccessLogCapture()
    async with backend(handler) as address, forwarder(config(route(action="bridge", targets=[address], tls=tls)), access_log=log) as fwd:
        with trio.fail_after(10):
            with pytest.raises(trio.BrokenResourceError):
                await tls_connect(fwd.addresses["r"][0], client_context(ca), "front.example")
            [record] = await log.wait(1)
    assert record["reason"] == "tls_error"
    assert len(seen) == 1 and "unknown ca" in str(seen[0]).lower(), seen


async def test_unsent_output_holds_the_alert_after_a_failed_handshake(ca: trustme.CA) -> None:
    """trio leaves the alert of a failed handshake in SSLStream's outgoing BIO; unsent_output
    reads it from there. If trio changes that, this fails (and refused clients would hear nothing)."""
    from triofwd._tls import unsent_output

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("x.example").configure_cert(server_ctx)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx = client_context(ca)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, client_ctx, server_hostname="x.example")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _fails(client.do_handshake()))
            with pytest.raises(trio.BrokenResourceError):
                await server.do_handshake()
            nursery.cancel_scope.cancel()
    alert = unsent_output(server)
    assert alert[:1] == b"\x15" and alert[-1:] == b"\x46", alert  # a TLS alert record: protocol_version (70)


async def _fails(handshake: Awaitable[None]) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        await handshake
