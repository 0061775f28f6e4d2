"""The status page: its data (_status, pure), /status.json exact after known traffic over a real
socket, and the page itself in a real browser, headless Chromium driven over the DevTools
protocol (JSON over a WebSocket, spoken here with trio-websocket), against the running daemon.

The browser tests skip, with their reason, only where no Chromium binary is on PATH
(`make system-deps` installs Debian's as root). Set TRIOFWD_STATUS_SCREENSHOT=docs/status.png
to keep the browser test's screenshot (the README's picture is made that way).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import functools
import importlib.metadata
import importlib.resources
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio_websocket

import triofwd
from tests.conftest import REPO, AccessLogCapture, backend, config, connect, echo, forwarder, receive_all, receive_exactly, refused_address, route, split
from tests.test_metrics import http
from triofwd._status import REASONS, status_document, target_status
from triofwd._table import as_table

# -- the document, pure ------------------------------------------------------------------------


def counts(**kw: Any) -> dict[str, Any]:
    return {"active": 0, "total": 0, "bytes_in": 0, "bytes_out": 0, "terminations": {}, "connect_time": {"buckets": [], "count": 0, "sum": 0.0}} | kw


def test_document_follows_the_table_then_keeps_what_a_reload_removed() -> None:
    table = as_table(config(route("b", action="reject"), route("k", action="offload", targets=["127.0.0.1:9"], ports=[5555]), route("a", action="reject")))
    stats = {
        "active": 0,
        "total": 9,
        "accept_errors": 2,
        "bytes_in": 7,
        "bytes_out": 8,
        "terminations": {"rejected": 4, "no_route": 3, "normal": 2},
        "routes": {
            "a": counts(total=4, terminations={"rejected": 4}),
            "gone": counts(total=2, bytes_in=7, bytes_out=8, terminations={"normal": 2}, connect_time={"buckets": [], "count": 2, "sum": 0.5}),
            "-": counts(total=3, terminations={"no_route": 3}),
            "k": counts(offload={"packets": 5, "bytes": 300}),
        },
        "targets": {},
    }
    doc = status_document(stats, table.routes, {"a": ["127.0.0.1:1"]}, time=12.5, draining=True, version="9")
    assert [(r["name"], r["removed"]) for r in doc["routes"]] == [("b", False), ("k", False), ("a", False), ("gone", True)]
    b, k, a, gone = doc["routes"]
    assert a["listening"] == ["127.0.0.1:1"] and b["listening"] == [] and a["terminations"] == {"rejected": 4} and a["balance"] is None
    assert k["offload"] == {"packets": 5, "bytes": 300} and k["action"] == "offload" and k["ports"] == [5555]
    # the kernel forwards an offload route: its targets are listed, with no health of ours
    assert [(t["target"], t["status"], t["active"], t["up"]) for t in k["targets"]] == [("127.0.0.1:9", "unmonitored", None, None)]
    assert gone["action"] is None and gone["connects"] == 2 and gone["connect_time_sum_s"] == 0.5 and gone["bytes_in"] == 7
    assert doc["unrouted"] == {"total": 3, "terminations": {"no_route": 3}}
    assert doc["totals"] == {"active": 0, "total": 9, "accept_errors": 2, "bytes_in": 7, "bytes_out": 8, "terminations": {"rejected": 4, "no_route": 3, "normal": 2}}
    assert (doc["time"], doc["draining"], doc["version"], doc["format"]) == (12.5, True, "9", 1)
    assert doc["reasons"] == list(REASONS) and doc["reasons"][0] == "normal" and "destination_denied" in doc["reasons"]
    json.dumps(doc, allow_nan=False)  # plain JSON, nothing else


@pytest.mark.parametrize(
    ("up", "circuit", "word"), [(True, "closed", "up"), (False, "closed", "down"), (False, "open", "down"), (True, "open", "open"), (True, "half-open", "half-open")]
)
def test_one_word_per_target(up: bool, circuit: str, word: str) -> None:
    assert target_status({"up": up, "circuit": circuit}) == word


# -- the page as shipped -----------------------------------------------------------------------

PAGE = importlib.resources.files("triofwd").joinpath("status.html").read_text()


def test_page_is_package_data_and_self_contained() -> None:
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["triofwd"]
    assert any(fnmatch.fnmatch("status.html", pattern) for pattern in package_data), package_data
    # No asset from elsewhere: it must work on a host without internet.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", PAGE), "an external asset"
    assert not re.search(r"@import|url\(", PAGE)
    assert PAGE.count("<script>") == 1 and PAGE.count("<style>") == 1 and "<script src" not in PAGE
    # Data reaches the DOM as text only.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "setAttribute("):
        assert sink not in PAGE, sink


# -- /status.json over a real socket, against a running forwarder --------------------------------


async def get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    [response] = await http(address, (method, path))
    return response


async def test_status_json_is_exact_after_known_traffic() -> None:
    log = AccessLogCapture()
    with trio.fail_after(15), refused_address() as refused:
        async with backend(echo) as target:
            cfg = config(route("web", targets=[target]), route("closed", action="reject"), route("dead", targets=[refused], connect_retries=0))
            async with forwarder(cfg, access_log=log) as fwd, trio.open_nursery() as nursery:
                serve = functools.partial(triofwd.serve_metrics, lambda: triofwd.metrics_text(fwd), "127.0.0.1", 0, status=lambda: triofwd.status_json(fwd))
                address = (await nursery.start(serve))[0].socket.getsockname()[:2]
                status, headers, body = await get(address, "/status.json")
                assert status == 200 and headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
                before = json.loads(body)
                for _ in range(2):  # two whole exchanges, each ended by EOF both ways: normal
                    async with await connect(fwd, "web") as s:
                        await s.send_all(b"hello")
                        assert await receive_exactly(s, 5) == b"hello"
                        await s.send_eof()
                        assert await receive_all(s) == b""
                live = await connect(fwd, "web")
                await live.send_all(b"x" * 1000)
                assert len(await receive_exactly(live, 1000)) == 1000
                for name in ("closed", "dead"):
                    async with await connect(fwd, name) as s:
                        await s.receive_some(1)
                await log.wait(4)  # the four that ended are counted (stats before the log line)
                after = json.loads((await get(address, "/status.json"))[2])
                head = await get(address, "/status.json", "HEAD")
                post = await get(address, "/status.json", "POST")
                listening = fwd.addresses
                await live.aclose()
                nursery.cancel_scope.cancel()

    assert head[0] == 200 and head[2] == b"" and int(head[1]["content-length"]) > 0
    assert post[0] == 405 and post[1]["allow"] == "GET, HEAD"

    def route_doc(name: str, action: str, targets: list[dict[str, Any]], **numbers: Any) -> dict[str, Any]:
        return {
            "name": name, "removed": False, "action": action, "bind": "127.0.0.1", "ports": [0], "domains": [], "priority": 0,
            "balance": "round-robin" if targets else None, "listening": listening[name], "active": 0, "total": 0, "bytes_in": 0, "bytes_out": 0,
            "terminations": {}, "connects": 0, "connect_time_sum_s": 0.0, "offload": None, "targets": targets,
        } | numbers  # fmt: skip

    def target_doc(address: str, **numbers: Any) -> dict[str, Any]:
        return {
            "target": address, "status": "up", "active": 0, "warm": 0, "up": True, "circuit": "closed", "usable": True, "retry_in_s": 0.0,
            "consecutive_failures": 0, "failures_total": 0, "circuit_opens_total": 0, "checks_passed": 0, "checks_failed": 0, "last_check": "",
        } | numbers  # fmt: skip

    for doc in (before, after):
        assert abs(doc.pop("time") - time.time()) < 60
    assert after.pop("version") == before.pop("version") == importlib.metadata.version("triofwd")
    assert before == {
        "format": 1,
        "draining": False,
        "reasons": list(REASONS),
        "totals": {"active": 0, "total": 0, "accept_errors": 0, "bytes_in": 0, "bytes_out": 0, "terminations": {}},
        "unrouted": {"total": 0, "terminations": {}},
        "routes": [
            route_doc("web", "forward", [target_doc(target)]),
            route_doc("closed", "reject", []),
            route_doc("dead", "forward", [target_doc(refused)]),
        ],
    }
    web_connect = after["routes"][0].pop("connect_time_sum_s")  # the two that ended; the live one counts when it ends
    assert 0 < web_connect < 10
    after["routes"][0]["connect_time_sum_s"] = 0.0
    assert after == {
        "format": 1,
        "draining": False,
        "reasons": list(REASONS),
        "totals": {"active": 1, "total": 5, "accept_errors": 0, "bytes_in": 1010, "bytes_out": 1010, "terminations": {"connect_refused": 1, "normal": 2, "rejected": 1}},
        "unrouted": {"total": 0, "terminations": {}},
        "routes": [
            route_doc("web", "forward", [target_doc(target, active=1)], active=1, total=3, bytes_in=1010, bytes_out=1010, terminations={"normal": 2}, connects=2),
            route_doc("closed", "reject", [], total=1, terminations={"rejected": 1}),
            route_doc("dead", "forward", [target_doc(refused, consecutive_failures=1, failures_total=1)], total=1, terminations={"connect_refused": 1}),
        ],
    }


async def test_page_is_served_with_a_policy_that_runs_only_its_own_script() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(triofwd.serve_metrics, lambda: "", "127.0.0.1", 0, status=dict)
            address = (await nursery.start(serve))[0].socket.getsockname()[:2]
            page, index, missing, post = [await get(address, *request) for request in (("/",), ("/index.html?x=1",), ("/status",), ("/", "POST"))]
            nursery.cancel_scope.cancel()
    status, headers, body = page
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8" and body.decode() == PAGE and index[2] == body
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/]+={0,2}';", policy) and re.search(r"style-src 'sha256-[A-Za-z0-9+/]+={0,2}';", policy)
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    assert missing[0] == 404 and b"/status.json" in missing[2]
    assert post[0] == 405


# -- the page in a real browser ------------------------------------------------------------------

CHROMIUM = next((found for found in map(shutil.which, ("chromium", "chromium-browser")) if found), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: neither `chromium` nor `chromium-browser` is on PATH (as root on Debian, `make system-deps` installs it)"
)
WINDOW = (1280, 720)
# Chromium's start on a small machine takes seconds; everything after it is bounded by the test.
BROWSER_START = 30.0
BROWSER_STOP = 5.0
# The page's rows as {column key: text}, and its terminations table likewise (row key: route name).
ROWS = "[...document.querySelectorAll('#%s tbody tr')].map(tr => Object.fromEntries([...tr.cells].map(td => [td.dataset.k, td.textContent])))"


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.session: str | None = None

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        request_id = next(self.ids)
        message: dict[str, Any] = {"id": request_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        await self.ws.send_message(json.dumps(message))
        while True:  # events (no domain is enabled, but attaching sends one) are passed over
            reply = json.loads(await self.ws.get_message())
            if reply.get("id") == request_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    async def open(self, url: str) -> None:
        target = (await self.call("Target.createTarget", url="about:blank"))["targetId"]
        self.session = (await self.call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        await self.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1, mobile=False)
        # Returns once the navigation is committed: what is evaluated next runs in the new
        # document, which is whole once loaded.
        navigated = await self.call("Page.navigate", url=url)
        assert "errorText" not in navigated, navigated
        await self.wait_until("document.readyState === 'complete'")

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_until(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll the page (another process: no event of ours to await) until `expression` is truthy."""
        with trio.fail_after(timeout):
            while not (value := await self.evaluate(expression)):
                await trio.sleep(0.1)
        return value

    async def rows(self, table: str) -> list[dict[str, str]]:
        return list(await self.evaluate(ROWS % table))

    async def screenshot(self) -> bytes:
        return base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])


@contextlib.asynccontextmanager
async def chromium(tmp_path: pathlib.Path) -> AsyncIterator[Browser]:
    """Headless Chromium with a fresh profile; its whole process group is killed by pid at the end."""
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    errors = tmp_path / "chromium.stderr"
    command = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions", "--mute-audio",
               f"--user-data-dir={profile}", "--remote-debugging-port=0", f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"]  # fmt: skip
    with errors.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True)
    try:
        # Chromium writes its DevTools port and the browser's path here once it listens.
        port_file = profile / "DevToolsActivePort"
        try:
            with trio.fail_after(BROWSER_START):
                while len(lines := port_file.read_text().splitlines() if port_file.exists() else []) < 2:
                    if proc.poll() is not None:
                        raise AssertionError(f"chromium exited {proc.returncode}: {errors.read_text()[-2000:]}")
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            raise AssertionError(f"chromium did not start within {BROWSER_START}s: {errors.read_text()[-2000:]}") from None
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{lines[0]}{lines[1]}", max_message_size=64 << 20) as ws:
            browser = Browser(ws)
            yield browser
            with trio.move_on_after(BROWSER_STOP):
                await browser.call("Browser.close")
    finally:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group it leads: renderers, zygote, GPU process
            with trio.move_on_after(BROWSER_STOP):
                await proc.wait()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@needs_chromium
async def test_browser_shows_the_daemon_live(daemon: Any, tmp_path: pathlib.Path) -> None:
    with trio.fail_after(60), refused_address() as refused, refused_address() as down:
        async with backend(echo) as target:
            d = daemon(
                f'[[routes]]\nname = "web"\nports = [0]\nbind = "127.0.0.1"\ntargets = ["{target}", "{refused}"]\n'
                'circuit_breaker = { failures = 1, backoff = "5m" }\n'
                f'[[routes]]\nname = "api"\nports = [0]\nbind = "127.0.0.1"\ntargets = ["{down}"]\n'
                'health_check = { interval = "200ms", timeout = "200ms", rise = 1, fall = 1 }\n'
                '[[routes]]\nname = "closed"\nports = [0]\nbind = "127.0.0.1"\naction = "reject"\n',
                "--metrics", "127.0.0.1:0",
            )  # fmt: skip
            address = d.wait_log("metrics at")[0]["metrics"]
            async with chromium(tmp_path) as browser:
                await browser.open(f"http://{address}/")
                await browser.wait_until("Number(document.documentElement.dataset.samples) >= 1")
                first = await browser.rows("routes")
                assert [(r["name"], r["action"], r["total"], r["active"]) for r in first] == [("web", "forward", "0", "0"), ("api", "forward", "0", "0"), ("closed", "reject", "0", "0")]
                assert [r["listening"] for r in first] == [", ".join(d.listeners[name]) for name in ("web", "api", "closed")]

                for _ in range(3):  # round robin: one of them meets the refused target first, whose circuit opens
                    async with await trio.open_tcp_stream(*split(d.listeners["web"][0])) as s:
                        await s.send_all(b"hello")
                        assert await receive_exactly(s, 5) == b"hello"
                        await s.send_eof()
                        assert await receive_all(s) == b""
                live = await trio.open_tcp_stream(*split(d.listeners["web"][0]))
                await live.send_all(b"x" * 100_000)
                assert len(await receive_exactly(live, 100_000)) == 100_000
                async with await trio.open_tcp_stream(*split(d.listeners["closed"][0])) as s:
                    assert await s.receive_some(1) == b""

                # The same page, not reloaded: its own refreshes bring the new counts.
                await browser.wait_until(
                    "(() => { const rows = %s; const web = rows.find(r => r.name === 'web'), closed = rows.find(r => r.name === 'closed');"
                    " return web.total === '4' && web.active === '1' && closed.total === '1'; })()" % (ROWS % "routes")
                )
                await browser.wait_until(  # 200ms health checks: the api target is down within a few
                    "(%s).some(r => r.route === 'api' && r.status === 'down')" % (ROWS % "targets")
                )
                routes = {r["name"]: r for r in await browser.rows("routes")}
                ended = {r["name"]: r for r in await browser.rows("terminations")}
                targets = {(r["route"], r["target"]): r for r in await browser.rows("targets")}
                summary = await browser.evaluate("Object.fromEntries([...document.querySelectorAll('#summary dd')].map(dd => [dd.dataset.k, dd.textContent]))")
                shot = await browser.screenshot()
            await live.aclose()

    assert routes["web"]["bytes_in"] == "97.7 KiB"  # 3 x 5 + 100 000 bytes
    assert ended["web"]["normal"] == "3" and ended["closed"]["rejected"] == "1" and ended["all"]["ended"] == "4"
    assert targets[("web", target)]["status"] == "up" and targets[("web", target)]["active"] == "1"
    assert targets[("web", refused)]["status"] == "open" and targets[("web", refused)]["failures_total"] == "1"
    assert targets[("api", down)]["circuit"] == "closed" and targets[("api", down)]["last_check"] == "connect_refused"
    assert summary["active"] == "1" and summary["total"] == "5" and summary["routes"] == "3"
    assert png_size(shot) == WINDOW
    (tmp_path / "status.png").write_bytes(shot)
    if os.environ.get("TRIOFWD_STATUS_SCREENSHOT"):
        pathlib.Path(os.environ["TRIOFWD_STATUS_SCREENSHOT"]).write_bytes(shot)


HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b id="injected">&amp;</b>'


@needs_chromium
async def test_browser_shows_every_name_as_text(tmp_path: pathlib.Path) -> None:
    # Route names in a route file are plain words, but the page must not depend on that: any
    # string the document holds (a name, a reason, a target, a check's outcome) is text.
    stats = {"routes": {HOSTILE: counts(total=1, terminations={HOSTILE: 1})}, "terminations": {HOSTILE: 1}, "targets": {}}
    doc = status_document(stats, (), {}, time=time.time(), version=HOSTILE)
    target = {"target": HOSTILE, "status": HOSTILE, "circuit": HOSTILE, "last_check": HOSTILE, "active": 0, "warm": 0, "retry_in_s": 0.0}
    doc["routes"][0] |= {"removed": False, "action": HOSTILE, "listening": [HOSTILE], "targets": [target]}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(triofwd.serve_metrics, lambda: "", "127.0.0.1", 0, status=lambda: doc)
            host, port = (await nursery.start(serve))[0].socket.getsockname()[:2]
            async with chromium(tmp_path) as browser:
                await browser.open(f"http://{host}:{port}/")
                await browser.wait_until("Number(document.documentElement.dataset.samples) >= 1")
                seen = await browser.evaluate(
                    "({scripts: document.scripts.length, injected: document.querySelectorAll('#injected, img').length, pwned: typeof window.pwned,"
                    " title: document.title, version: document.getElementById('version').textContent,"
                    " badge: document.querySelector('#targets td[data-k=status] span').className,"
                    " reasons: [...document.querySelectorAll('#terminations thead th')].map(th => th.textContent)})"
                )
                routes, targets = await browser.rows("routes"), await browser.rows("targets")
            nursery.cancel_scope.cancel()
    assert seen == {"scripts": 1, "injected": 0, "pwned": "undefined", "title": "triofwd status", "version": f"version {HOSTILE}",
                    "badge": "st st-none", "reasons": ["Route", HOSTILE, "Ended"]}  # fmt: skip
    assert (routes[0]["name"], routes[0]["action"], routes[0]["listening"]) == (HOSTILE, HOSTILE, HOSTILE)
    assert (targets[0]["route"], targets[0]["target"], targets[0]["status"], targets[0]["circuit"], targets[0]["last_check"]) == (HOSTILE,) * 5
