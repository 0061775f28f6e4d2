"""Prometheus text: the pure renderer under a strict parser, the numbers against stats, the HTTP endpoint."""

from __future__ import annotations

import math
import pathlib
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import h11
import hypothesis
import hypothesis.strategies as st
import pytest
import trio

import triofwd
from tests.conftest import REPO, backend, config, connect, echo, forwarder, receive_exactly, route, split, wait_for
from triofwd._metrics import CONTENT_TYPE, render_metrics
from triofwd._stats import CONNECT_BUCKETS

# -- a strict parser of the text format 0.0.4 --------------------------------------------
# https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
FLOAT = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?Inf|NaN")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
Series = tuple[str, frozenset[tuple[str, str]]]


class Family:
    def __init__(self, name: str) -> None:
        self.name = name
        self.type = "untyped"
        self.help: str | None = None
        self.samples: dict[Series, float] = {}


def parse_value(text: str) -> float:
    if not FLOAT.fullmatch(text):
        raise ValueError(f"bad value {text!r}")
    return float(text.replace("Inf", "inf"))


def unescape(text: str, allowed: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            if i + 1 >= len(text) or text[i + 1] not in allowed:
                raise ValueError(f"bad escape in {text!r}")
            out.append("\n" if text[i + 1] == "n" else text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        m = LABEL_NAME.match(text, i)
        if not m or text[m.end() : m.end() + 2] != '="':
            raise ValueError(f"bad label at {text[i:]!r}")
        j = m.end() + 2
        value = []
        while j < len(text) and text[j] != '"':
            if text[j] == "\n":
                raise ValueError("raw newline in a label value")
            value.append(text[j : j + 2] if text[j] == "\\" else text[j])
            j += 2 if text[j] == "\\" else 1
        if j >= len(text):
            raise ValueError(f"unterminated label value in {text!r}")
        if m.group() in labels:
            raise ValueError(f"duplicate label {m.group()!r}")
        labels[m.group()] = unescape("".join(value), '\\"n')
        i = j + 1
        if i < len(text):
            if text[i] != ",":
                raise ValueError(f"expected ',' at {text[i:]!r}")
            i += 1
    return labels


def split_sample(line: str) -> tuple[str, dict[str, str], float]:
    m = METRIC_NAME.match(line)
    if not m:
        raise ValueError(f"bad sample line {line!r}")
    name, rest = m.group(), line[m.end() :]
    labels: dict[str, str] = {}
    if rest.startswith("{"):
        # the closing brace is the first '}' outside a quoted value
        depth_quote, k = False, 1
        while k < len(rest) and (depth_quote or rest[k] != "}"):
            if rest[k] == "\\" and depth_quote:
                k += 1
            elif rest[k] == '"':
                depth_quote = not depth_quote
            k += 1
        labels, rest = parse_labels(rest[1:k]), rest[k + 1 :]
    parts = rest.split(" ")
    if parts[0] != "" or len(parts) not in (2, 3) or (len(parts) == 3 and not re.fullmatch(r"-?\d+", parts[2])):
        raise ValueError(f"bad sample line {line!r}")
    return name, labels, parse_value(parts[1])


def family_of(name: str, families: dict[str, Family]) -> Family:
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in families and families[base].type in ("histogram", "summary"):
            return families[base]
    return families.setdefault(name, Family(name))


def parse_exposition(text: str) -> dict[str, Family]:
    """Parse strictly: grammar, escapes, TYPE/HELP once and first, families contiguous,
    no duplicate series, histograms cumulative with +Inf equal to _count."""
    assert text.endswith("\n"), "the text must end with a line feed"
    families: dict[str, Family] = {}
    finished: set[str] = set()
    current: str | None = None
    for line in text[:-1].split("\n"):
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert METRIC_NAME.fullmatch(name), line
                fam = families.setdefault(name, Family(name))
                assert not fam.samples and name not in finished, f"{parts[1]} after samples: {line}"
                if parts[1] == "HELP":
                    assert fam.help is None, f"second HELP for {name}"
                    fam.help = unescape(parts[3] if len(parts) > 3 else "", "\\n")
                else:
                    assert fam.type == "untyped" and len(parts) == 4 and parts[3] in TYPES, line
                    fam.type = parts[3]
            continue
        name, labels, value = split_sample(line)
        fam = family_of(name, families)
        if fam.name != current:
            assert fam.name not in finished, f"samples of {fam.name} are not contiguous"
            if current is not None:
                finished.add(current)
            current = fam.name
        series = (name, frozenset(labels.items()))
        assert series not in fam.samples, f"duplicate series {line}"
        if fam.type == "histogram":
            assert name != fam.name, f"a histogram has only _bucket, _sum and _count samples: {line}"
            assert ("le" in labels) == name.endswith("_bucket"), line
        fam.samples[series] = value
    for fam in families.values():
        if fam.type == "counter":
            assert all(v >= 0 for v in fam.samples.values()), fam.name
        if fam.type == "histogram":
            check_histogram(fam)
    return families


def check_histogram(fam: Family) -> None:
    groups: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
    for (name, labels), value in fam.samples.items():
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            groups.setdefault(frozenset((k, v) for k, v in labels if k != "le"), []).append((parse_value(le), value))
    for labels, buckets in groups.items():
        buckets.sort()
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{fam.name}{dict(labels)}: buckets not cumulative"
        assert buckets[-1][0] == math.inf, f"{fam.name}{dict(labels)}: no +Inf bucket"
        assert fam.samples[(fam.name + "_count", labels)] == buckets[-1][1]
        assert (fam.name + "_sum", labels) in fam.samples


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    fam = family_of(name, families)
    return fam.samples[(name, frozenset(labels.items()))]


def test_the_parser_rejects_what_the_format_forbids() -> None:
    # A parser that accepts anything proves nothing: each of these must fail.
    bad = [
        "m 1",  # no final line feed
        'm{a="x} 1\n',
        'm{a="\\t"} 1\n',
        "m{a=x} 1\n",
        "m 1 2 3\n",
        "m one\n",
        "# TYPE m counter\n# TYPE m counter\nm 1\n",
        "m 1\n# TYPE m counter\n",
        "a 1\nb 1\na{x=\"1\"} 2\n",
        "m 1\nm 2\n",
        '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 0\nh_count 1\n',
        '# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 0\nh_count 1\n',
        "# TYPE c counter\nc -1\n",
    ]
    for text in bad:
        with pytest.raises((AssertionError, ValueError, KeyError)):
            parse_exposition(text)


# -- the renderer -------------------------------------------------------------------------


def snapshot(**routes: dict[str, Any]) -> dict[str, Any]:
    """A stats snapshot in the shape Forwarder.stats() gives."""
    out = {}
    for name, r in routes.items():
        counts = r.get("connect", [])
        buckets = [(bound, sum(1 for c in counts if c <= bound)) for bound in (*CONNECT_BUCKETS, math.inf)]
        out[name] = {
            "active": r.get("active", 0),
            "total": r.get("total", 0),
            "bytes_in": r.get("bytes_in", 0),
            "bytes_out": r.get("bytes_out", 0),
            "terminations": r.get("terminations", {}),
            "connect_time": {"buckets": buckets, "count": len(counts), "sum": sum(counts)},
        }
    return {"active": 0, "total": 0, "accept_errors": 3, "bytes_in": 0, "bytes_out": 0, "terminations": {}, "routes": out}


def test_render_follows_the_conventions_and_carries_every_number() -> None:
    stats = snapshot(
        web={"active": 2, "total": 9, "bytes_in": 100, "bytes_out": 2**40, "terminations": {"normal": 5, "capacity": 2}, "connect": [0.0004, 0.02, 3.0]},
        **{"-": {"total": 1, "terminations": {"no_route": 1}}},
    )
    fams = parse_exposition(render_metrics(stats, ["web", "idle"]))
    for fam in fams.values():
        assert fam.name.startswith("triofwd_") and fam.help, fam.name
        if fam.type == "counter":
            assert fam.name.endswith("_total"), fam.name
    assert fams["triofwd_connections_active"].type == "gauge"
    assert fams["triofwd_connect_duration_seconds"].type == "histogram"
    assert value(fams, "triofwd_connections_active", route="web") == 2
    assert value(fams, "triofwd_connections_active", route="idle") == 0  # known route, exported before its first connection
    assert value(fams, "triofwd_connections_total", route="web") == 9
    assert value(fams, "triofwd_terminations_total", route="web", reason="normal") == 5
    assert value(fams, "triofwd_terminations_total", route="web", reason="killed") == 0  # every reason, zero or not
    assert value(fams, "triofwd_terminations_total", route="-", reason="no_route") == 1
    assert value(fams, "triofwd_limit_rejections_total", route="web", limit="capacity") == 2
    assert value(fams, "triofwd_bytes_total", route="web", direction="out") == 2**40  # integers stay exact
    assert value(fams, "triofwd_bytes_total", route="web", direction="in") == 100
    assert value(fams, "triofwd_connect_duration_seconds_bucket", route="web", le="0.0005") == 1
    assert value(fams, "triofwd_connect_duration_seconds_bucket", route="web", le="0.025") == 2
    assert value(fams, "triofwd_connect_duration_seconds_bucket", route="web", le="+Inf") == 3
    assert value(fams, "triofwd_connect_duration_seconds_sum", route="web") == pytest.approx(3.0204)
    assert value(fams, "triofwd_connect_duration_seconds_count", route="idle") == 0
    assert value(fams, "triofwd_accept_errors_total") == 3


def test_label_values_are_escaped() -> None:
    text = render_metrics(snapshot(**{'a"b\\c\nd': {"active": 1}}))
    assert 'triofwd_connections_active{route="a\\"b\\\\c\\nd"} 1\n' in text
    assert value(parse_exposition(text), "triofwd_connections_active", route='a"b\\c\nd') == 1


@hypothesis.given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.fixed_dictionaries(
            {"active": st.integers(0, 10**6), "total": st.integers(0, 10**12), "bytes_in": st.integers(0, 2**63), "bytes_out": st.integers(0, 2**63),
             "terminations": st.dictionaries(st.sampled_from([r.value for r in triofwd.Reason]), st.integers(0, 10**9)),
             "connect": st.lists(st.floats(0, 100), max_size=5)}
        ),
        max_size=4,
    )
)
def test_any_snapshot_renders_to_valid_text_that_reads_back(routes: dict[str, dict[str, Any]]) -> None:
    fams = parse_exposition(render_metrics(snapshot(**routes)))
    for name, r in routes.items():
        assert value(fams, "triofwd_bytes_total", route=name, direction="in") == float(r["bytes_in"])
        for reason, count in r["terminations"].items():
            assert value(fams, "triofwd_terminations_total", route=name, reason=reason) == count
        assert value(fams, "triofwd_connect_duration_seconds_count", route=name) == len(r["connect"])


# -- a live forwarder: the numbers are the stats' numbers ----------------------------------


async def test_metrics_command_numbers_match_stats(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(10):
        async with backend(echo) as target:
            cfg = config(route("web", targets=[target]), route("closed", action="reject"), route("dead", targets=["127.0.0.1:1"], connect_retries=0))
            async with forwarder(cfg) as fwd, trio.open_nursery() as nursery:
                path = await nursery.start(triofwd.serve_control, fwd, str(tmp_path / "c.sock"))
                for _ in range(3):
                    async with await connect(fwd, "web") as s:
                        await s.send_all(b"hello")
                        assert await receive_exactly(s, 5) == b"hello"
                live = await connect(fwd, "web")
                await live.send_all(b"x" * 1000)
                assert len(await receive_exactly(live, 1000)) == 1000
                for name in ("closed", "dead"):
                    async with await connect(fwd, name) as s:
                        await s.receive_some(1)
                await wait_for(lambda: fwd.stats()["total"] == 6 and fwd.stats()["active"] == 1)
                async with triofwd.open_control(path) as client:
                    stats = await client.request("stats")
                    fams = parse_exposition(await client.request("metrics"))
                await live.aclose()
                nursery.cancel_scope.cancel()
    for name, r in stats["routes"].items():
        assert value(fams, "triofwd_connections_active", route=name) == r["active"]
        assert value(fams, "triofwd_connections_total", route=name) == r["total"]
        assert value(fams, "triofwd_bytes_total", route=name, direction="in") == r["bytes_in"]
        assert value(fams, "triofwd_bytes_total", route=name, direction="out") == r["bytes_out"]
        for reason, count in r["terminations"].items():
            assert value(fams, "triofwd_terminations_total", route=name, reason=reason) == count
        assert value(fams, "triofwd_connect_duration_seconds_count", route=name) == r["connect_time"]["count"]
        assert value(fams, "triofwd_connect_duration_seconds_bucket", route=name, le="+Inf") == r["connect_time"]["buckets"]["+Inf"]
    assert stats["routes"]["web"]["active"] == 1 and stats["routes"]["web"]["bytes_in"] == 3 * 5 + 1000
    assert stats["routes"]["web"]["connect_time"]["count"] == 3  # the three that ended
    assert stats["routes"]["closed"]["terminations"] == {"rejected": 1}
    assert stats["routes"]["dead"]["terminations"] == {"connect_refused": 1}


# -- the HTTP endpoint ---------------------------------------------------------------------


async def http(address: tuple[str, int], *requests: tuple[str, str], raw: bytes | None = None) -> list[tuple[int, dict[str, str], bytes]]:
    """Send requests on one keep-alive connection (or raw bytes); the responses."""
    out = []
    async with await trio.open_tcp_stream(*address) as stream:
        conn = h11.Connection(h11.CLIENT)
        if raw is not None:
            await stream.send_all(raw)
            requests = (("GET", "/"),)  # what h11 is told to expect an answer to
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        for method, target in requests:
            if raw is None:
                await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=[("host", "x")])) + conn.send(h11.EndOfMessage()))
            status, headers, body = 0, {}, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            out.append((status, headers, body))
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
    return out


async def test_http_endpoint_serves_metrics_and_nothing_else() -> None:
    calls = []

    def render() -> str:
        calls.append(1)
        return "# TYPE triofwd_x gauge\ntriofwd_x 1\n"

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(triofwd.serve_metrics, render, "127.0.0.1", 0)
            address = listeners[0].socket.getsockname()[:2]
            (ok, query, head, missing, post) = await http(
                address, ("GET", "/metrics"), ("GET", "/metrics?name[]=x"), ("HEAD", "/metrics"), ("GET", "/"), ("POST", "/metrics")
            )
            [(bad, _, _)] = await http(address, raw=b"NOT HTTP AT ALL\r\n\r\n")
            nursery.cancel_scope.cancel()
    assert ok == (200, {"content-type": CONTENT_TYPE, "content-length": "35"}, render().encode())
    assert query[0] == 200
    assert head == (200, {"content-type": CONTENT_TYPE, "content-length": "35"}, b"")  # HEAD: GET's headers, no body
    assert missing[0] == 404
    assert post[0] == 405 and post[1]["allow"] == "GET, HEAD"
    assert bad == 400
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_daemon_serves_metrics_over_http(daemon: Callable[..., Any]) -> None:
    d = daemon((REPO / "routes" / "demo.toml").read_text().replace("8080", "0").replace("8083", "0"), "--metrics", "127.0.0.1:0")
    address = d.wait_log("metrics at")[0]["metrics"]
    with socket.create_connection(split(d.listeners["closed"][0]), timeout=5) as sock:
        assert sock.recv(1) == b""  # rejected: counted
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE
        fams = parse_exposition(response.read().decode())
    assert value(fams, "triofwd_terminations_total", route="closed", reason="rejected") == 1
    assert value(fams, "triofwd_connections_active", route="web") == 0
    with urllib.request.urlopen(f"http://{address}/", timeout=5) as response:  # the status page (tests/test_status_page.py)
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{address}/nothing-here", timeout=5)
    assert missing.value.code == 404


@pytest.mark.parametrize(
    ("option", "message"),
    [("nonsense", "invalid --metrics 'nonsense': expected HOST:PORT"), ("127.0.0.1:99999", "invalid --metrics"), ("192.0.2.1:0", "cannot listen for metrics on 192.0.2.1:0")],
)
def test_bad_metrics_address_is_one_line_and_exit_2(daemon: Callable[..., Any], option: str, message: str) -> None:
    d = daemon('[[routes]]\nname = "r"\nports = [0]\nbind = "127.0.0.1"\naction = "reject"\n', "--metrics", option, ready=False)
    assert d.wait() == 2
    err = d.stderr_path.read_text().strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"triofwd: {message}"), err
