"""TLS for bridge routes: SSL contexts built when the table is compiled, handshakes mapped to reasons.

Certificates are read when a route table is compiled (start, `check`, every reload), so a
reload picks up renewed certificates and a missing file is a config error with its path.

ALPN: with `reencrypt` the client's offered protocols are passed to the target and the
client is answered with the target's choice, so the two ends agree. With `terminate` the
target speaks plaintext and cannot negotiate, so no protocol is selected and the client
falls back to its default (HTTP/1.1 for browsers), rather than being promised h2 by a
terminator that cannot know the target speaks it.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from ._errors import ConnectionEnded
from ._reasons import Reason

if TYPE_CHECKING:
    from ._config import TLS

__all__ = ["RouteTLS", "handshake", "unsent_output"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# How long a peer whose handshake failed is given to take the alert that says why.
ALERT_TIMEOUT = 1.0
# Contexts per distinct ALPN list are cached; clients offer few distinct lists, but the
# cache is bounded so that a client inventing lists cannot grow it without limit.
MAX_CACHED_CONTEXTS = 32


class RouteTLS:
    """One route's TLS settings and contexts."""

    def __init__(self, spec: TLS) -> None:
        self.spec = spec
        self.mode = spec.mode
        self._server: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._client: dict[tuple[str, ...], ssl.SSLContext] = {}
        if self.mode in ("terminate", "reencrypt"):
            self._server[()] = self._new_server_context(())
        if self.mode == "reencrypt":
            self._client[()] = self._new_client_context(())

    def _new_server_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = _VERSIONS[self.spec.min_version]
        ctx.load_cert_chain(self.spec.cert, self.spec.key)  # OSError / SSLError: reported by the compiler
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    def _new_client_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.spec.target_ca or None)
        ctx.minimum_version = _VERSIONS[self.spec.min_version]
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    def _cached(self, cache: dict[tuple[str, ...], ssl.SSLContext], alpn: tuple[str, ...], make: Callable[[tuple[str, ...]], ssl.SSLContext]) -> ssl.SSLContext:
        ctx = cache.get(alpn)
        if ctx is None:
            if len(cache) >= MAX_CACHED_CONTEXTS:
                cache.pop(next(k for k in cache if k))  # drop the oldest, keep the plain one
            ctx = cache[alpn] = make(alpn)
        return ctx

    def server_context(self, alpn: str | None = None) -> ssl.SSLContext:
        """Our side toward the client, answering ALPN with `alpn` if given."""
        return self._cached(self._server, (alpn,) if alpn else (), self._new_server_context)

    def client_context(self, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """Our side toward a reencrypt target, offering the client's ALPN list."""
        return self._cached(self._client, alpn, self._new_client_context)

    def target_name(self, sni: str | None, host: str) -> str:
        """The name the target's certificate must carry: target_sni, else the client's SNI, else the host."""
        return self.spec.target_sni or sni or host


@contextlib.contextmanager
def _handshake_errors(reset: Reason) -> Iterator[None]:
    try:
        yield
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ssl.SSLError) and not isinstance(exc.__cause__, ssl.SSLEOFError):
            raise ConnectionEnded(Reason.TLS_ERROR, str(exc.__cause__)) from exc
        raise ConnectionEnded(reset, str(exc.__cause__ or exc)) from exc


async def handshake(stream: trio.SSLStream[Any], *, peer_is_client: bool) -> None:
    """Complete a handshake; a TLS failure ends the connection with tls_error, a reset with the peer's reset.

    A peer refused by the TLS library (no shared version, a bad certificate) is first sent
    the alert the library produced, as nginx and HAProxy do: it learns why (for example
    `protocol_version`, alert 70) instead of seeing the connection just end.
    """
    try:
        with _handshake_errors(Reason.CLIENT_RESET if peer_is_client else Reason.TARGET_RESET):
            await stream.do_handshake()
    except ConnectionEnded as ended:
        if ended.reason is Reason.TLS_ERROR:
            await _send_alert(stream)
        raise


def unsent_output(stream: trio.SSLStream[Any]) -> bytes:
    """What the TLS library wrote that trio has not sent: after a failed handshake, the alert.

    trio's SSLStream raises as soon as the library fails, leaving the alert in its outgoing
    memory BIO (`_outgoing`, an ssl.MemoryBIO); tests/test_tls.py fails if that changes.
    """
    outgoing = getattr(stream, "_outgoing", None)
    return outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""


async def _send_alert(stream: trio.SSLStream[Any]) -> None:
    alert = unsent_output(stream)
    if alert:
        with trio.move_on_after(ALERT_TIMEOUT):
            try:
                await stream.transport_stream.send_all(alert)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the peer is gone: nobody left to tell
