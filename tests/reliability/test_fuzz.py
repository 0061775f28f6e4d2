"""Bounded fuzzing (hypothesis) of everything that parses outside input: route files, the
first bytes of a connection (ClientHello, PROXY header) as they arrive in pieces, and
control messages — plus a few bad messages against a live daemon's control socket.

The pure parsers already have their property tests (tests/test_clienthello.py,
tests/test_proxy_protocol.py); here they are driven through the I/O loops that feed
them. Unbounded runs of the same targets: `make fuzz` (fuzz/).
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import re
import tempfile
from typing import Any

import msgspec
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import triofwd
from tests.conftest import config, forwarder, route
from tests.reliability.harness import route_file
from tests.test_clienthello import valid_hellos
from tests.test_proxy_protocol import valid_headers
from triofwd._clienthello import ClientHelloError, parse_client_hello
from triofwd._config import TLS, Route, Settings
from triofwd._config import HealthCheck as HealthCheckSpec
from triofwd._errors import ConnectionEnded
from triofwd._firstbytes import FirstBytes, read_client_hello, read_proxy_header
from triofwd._proxy_protocol import parse_proxy_header
from triofwd.control import ControlServer
from triofwd.control.messages import Reply, WatchRequest
from triofwd.control.server import HANDSHAKE_TIMEOUT

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- route files ------------------------------------------------------------------------

# Values a route file's keys might plausibly (or implausibly) hold.
STRINGS = [
    "", "0", "0s", "250ms", "30s", "5m", "4h", "7d", "-1s", "1.5s", "99999999999999999999d", "1e3s", "5x",
    "300/min", "10/s", "0/s", "1/0s", "x/min", "standard", "immortal", "extended", "forward", "bridge", "offload",
    "reject", "handler", "round-robin", "least-connections", "random", "first", "passthrough", "terminate",
    "reencrypt", "v1", "v2", "1.2", "1.3", "internal", "127.0.0.1", "0.0.0.0", "::", "::1", "256.0.0.1",
    "10.0.0.0/8", "10.0.0.1/33", "fd00::/8", "127.0.0.1:80", "[::1]:22", "db.internal:5432", "host:0", "host:99999",
    "host", ":80", "[nope]:1", "8000-8010", "10-1", "1-70000", "example.com", "*.example.com", "a..b", "*",
    "route-1", "a" * 70, "é", "\x00", "\n", "/nonexistent/cert.pem", "certs/x.pem",
]  # fmt: skip
# Handlers are imported by name: only these names, so a fuzzer never imports whatever it spells.
HANDLERS = ["", "nope", "json:loads", "json:nope", "os.path:join", "triofwd:serve", "a:b:c", ":x", "x:", "no_such_module_xyz:f"]

scalars = st.one_of(
    st.sampled_from(STRINGS),
    st.text(max_size=12),
    st.integers(-5, 70000),
    st.sampled_from([2**63, -(2**63) - 1, 2**70]),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
)


def struct_dicts(struct: type[msgspec.Struct], nested: dict[str, st.SearchStrategy[Any]] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts keyed by (mostly) the struct's own field names, holding odd values."""
    names = [f.name for f in msgspec.structs.fields(struct)]
    nested = nested or {}

    def value(name: str) -> st.SearchStrategy[Any]:
        if name == "handler":
            return st.sampled_from(HANDLERS)
        plain = st.one_of(scalars, st.lists(scalars, max_size=3))
        return st.one_of(nested[name], plain) if name in nested else plain

    keys = st.one_of(st.sampled_from(names), st.sampled_from(["unknown", "Name", ""]))
    return st.lists(keys, max_size=8, unique=True).flatmap(lambda ks: st.fixed_dictionaries({k: value(k) for k in ks}))


route_dicts = struct_dicts(Route, {"tls": struct_dicts(TLS), "health_check": struct_dicts(HealthCheckSpec)})
config_dicts = st.fixed_dictionaries({}, optional={"settings": struct_dicts(Settings), "routes": st.lists(route_dicts, max_size=3)})


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)  # strings and integers: JSON's forms are TOML's


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def to_toml(data: dict[str, Any]) -> str:
    lines = []
    if "settings" in data:
        lines += ["[settings]", *(f"{toml_key(k)} = {toml_value(v)}" for k, v in data["settings"].items())]
    for r in data.get("routes", []):
        lines += ["[[routes]]", *(f"{toml_key(k)} = {toml_value(v)}" for k, v in r.items())]
    return "\n".join(lines) + "\n"


def encode_route_file(data: dict[str, Any], suffix: str) -> bytes:
    if suffix == ".toml":
        return to_toml(data).encode()
    finite = json.loads(json.dumps(data, default=str).replace("NaN", "null").replace("Infinity", "1e999"))
    return msgspec.yaml.encode(finite) if suffix == ".yaml" else json.dumps(finite).encode()


def loads_or_config_error(text: bytes, suffix: str) -> triofwd.Config | None:
    """What the daemon does with a route file: load it, or a ConfigError. Nothing else may escape."""
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / f"routes{suffix}"
        path.write_bytes(text)
        try:
            return triofwd.load_config(path)
        except triofwd.ConfigError as exc:
            assert exc.errors and all(isinstance(line, str) and line for line in exc.errors)
            return None


@BOUNDED
@given(config_dicts, st.sampled_from([".toml", ".yaml", ".json"]))
def test_route_files_of_odd_values_load_or_raise_config_error(data: dict[str, Any], suffix: str) -> None:
    config = loads_or_config_error(encode_route_file(data, suffix), suffix)
    if config is not None:
        assert isinstance(config, triofwd.Config)


@BOUNDED
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode), st.sampled_from([".toml", ".yaml", ".yml", ".json", ".txt"]))
def test_arbitrary_bytes_as_a_route_file_load_or_raise_config_error(text: bytes, suffix: str) -> None:
    loads_or_config_error(text, suffix)


@BOUNDED
@given(config_dicts, st.data())
def test_mutated_route_files_load_or_raise_config_error(data: dict[str, Any], draw: st.DataObject) -> None:
    text = bytearray(to_toml(data).encode())
    for _ in range(draw.draw(st.integers(1, 4))):
        if text:
            text[draw.draw(st.integers(0, len(text) - 1))] = draw.draw(st.sampled_from(b'[]{}="\',.\n#\\ 0a'))
    loads_or_config_error(bytes(text), ".toml")


def test_the_reliability_route_files_themselves_load() -> None:
    text = route_file({"connect_timeout": "1s"}, {"name": "a", "targets": ["127.0.0.1:1"], "domains": ["x.example"]})
    assert loads_or_config_error(text.encode(), ".toml") is not None


# -- first bytes, as they arrive --------------------------------------------------------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


async def fed(chunks: list[bytes], eof: bool) -> trio.testing.MemoryReceiveStream:
    """A receive stream that gives `chunks` one read at a time, then EOF (or waits forever)."""
    stream = trio.testing.MemoryReceiveStream()
    queue = list(chunks)

    async def more() -> None:
        if queue:
            stream.put_data(queue.pop(0))
        elif eof:
            stream.put_eof()

    stream.receive_some_hook = more
    return stream


async def read_first(reader: Any, chunks: list[bytes], eof: bool, **kw: Any) -> FirstBytes | ConnectionEnded:
    stream = await fed(chunks, eof)
    first = FirstBytes()
    try:
        with trio.fail_after(1):  # without EOF a reader that needs more waits: only that may time out
            await reader(stream, first, **kw)
    except ConnectionEnded as exc:
        return exc
    except trio.TooSlowError:
        assert not eof
        return FirstBytes()
    return first


def hello_answer(data: bytes) -> object:
    try:
        return parse_client_hello(data)
    except ClientHelloError:
        return "not tls"


@BOUNDED
@given(st.one_of(valid_hellos(), st.binary(max_size=300)), st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
async def test_client_hello_reader_in_any_pieces(data: bytes, cuts: list[int], eof: bool) -> None:
    """However the bytes are split, the reader ends as the parser says of the whole: a
    hello, not TLS (bytes kept for a fallback route), or — short, then EOF — client_reset."""
    result = await read_first(read_client_hello, chunked(data, cuts), eof)
    whole = hello_answer(data)
    if isinstance(result, ConnectionEnded):
        assert result.reason == triofwd.Reason.CLIENT_RESET and whole is None
    elif result.hello is not None:
        assert data.startswith(result.data) and result.hello.record_bytes <= len(result.data)
        assert whole is not None and whole != "not tls"
    elif result.data:
        assert hello_answer(result.data) == "not tls"


@BOUNDED
@given(st.one_of(valid_headers(), st.binary(max_size=200)), st.binary(max_size=20), st.lists(st.integers(0, 10_000), max_size=8), st.booleans(), st.booleans())
async def test_proxy_header_reader_in_any_pieces(header: bytes, rest: bytes, cuts: list[int], eof: bool, required: bool) -> None:
    """A trusted proxy's header is read whole, with what follows kept; a bad one is
    `rejected`; a direct client's header is `rejected` and its other bytes kept."""
    data = header + rest
    result = await read_first(read_proxy_header, chunked(data, cuts), eof, required=required)
    if isinstance(result, ConnectionEnded):
        assert result.reason in (triofwd.Reason.CLIENT_RESET, triofwd.Reason.REJECTED)
        return
    if result.proxy is not None:
        parsed = parse_proxy_header(data)
        assert required and parsed is not None and data[parsed[1]:].startswith(result.data)  # what follows, as far as read
    elif result.data:
        assert not required and data.startswith(result.data)


# -- control messages -------------------------------------------------------------------

COMMANDS = ["connections", "connection", "kill", "stats", "routes", "reload", "drain", "metrics", "watch", "nope", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "cmd": st.sampled_from(COMMANDS) | json_values,
        "args": st.fixed_dictionaries({}, optional={"id": json_values, "route": json_values, "client": st.sampled_from(["127.0.0.1", "10.0.0.0/8", "::1", "1.2.3.4:5", "x", "300.1.1.1/99"]) | json_values}) | json_values,
        "extra": json_values,
    },
)
messages = st.one_of(
    requests.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
)


# Not UTF-8 inside a JSON string, in the request and in its args (found by fuzz/fuzz_control.py).
BAD_UTF8 = [b'{"i\x9f": 3, "cmd": "kill"}', b'{"id": 1, "cmd": "\xff"}', b'{"id": 1, "cmd": "kill", "args": {"id": "\xc3("}}']


@settings(max_examples=50, deadline=None)
@given(st.lists(messages | st.sampled_from(BAD_UTF8), min_size=1, max_size=30))
@example(BAD_UTF8)
def test_control_messages_always_get_a_reply(batch: list[bytes]) -> None:
    """Whatever a client sends, dispatch answers with a Reply that encodes (or starts a
    watch), and never raises; the forwarder keeps serving."""

    async def main() -> None:
        with trio.fail_after(10):
            async with forwarder(config(route(action="reject"))) as fwd:
                server = ControlServer(fwd)
                for data in batch:
                    outcome = await server.dispatch(data)
                    assert isinstance(outcome, Reply | WatchRequest)
                    if isinstance(outcome, Reply):
                        assert outcome.ok or isinstance(outcome.error, str)
                        msgspec.json.encode(outcome)
                assert (await server.dispatch(b'{"id": 1, "cmd": "stats"}')).ok

    trio.run(main)


async def test_bad_messages_on_a_live_control_socket(scenario) -> None:
    """Junk frames, half a handshake and plain garbage on the daemon's control socket: each
    gets an error reply or its connection closed; the daemon and other sessions go on."""
    junk = [b"\xff\xfe", "not json", "{}", '{"cmd": 5}', '{"cmd": "kill", "args": {"id": -1}}', '{"cmd": "connections", "args": {"client": "300.1.1.1/99"}}', "[" * 10_000, '{"id": 1e999, "cmd": "stats"}']
    async with scenario(route_file({}, {"name": "r", "action": "reject"})) as s:
        control_path = s.daemon.proc.args[s.daemon.proc.args.index("--control") + 1]
        with trio.fail_after(30):
            async with triofwd.open_control(control_path) as client:
                for message in [*junk, *BAD_UTF8]:
                    await client.send_raw(message)
                    reply = await client.receive()
                    assert reply["ok"] is False and reply["error"], reply
                assert "total" in await client.request("stats")
            for garbage in (b"\x00" * 100, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1\r\n"):
                stream = await trio.open_unix_socket(control_path)
                async with stream:
                    await stream.send_all(garbage)
            assert (await s.request("stats"))["total"] == 0
            # trio-websocket does not notice an EOF in the middle of a handshake: such a
            # session holds its socket until HANDSHAKE_TIMEOUT cuts it off.
            s.fds_settle = HANDSHAKE_TIMEOUT + 2
            s.faults = len(junk) + len(BAD_UTF8) + 3
