"""A route file is compiled once per start, reload and check, and each certificate read once.

Counted: calls of compile_table, and certificate loads (SSLContext.load_cert_chain), with a
route file of two TLS routes sharing one certificate.
"""

from __future__ import annotations

import os
import pathlib
import signal
import ssl
import threading
import time
from typing import Any

import pytest
import trustme

import triofwd
from tests.conftest import forwarder
from triofwd import _cli, _table

ROUTES = """
[[routes]]
name = "a"
ports = [0]
bind = "127.0.0.1"
action = "bridge"
targets = ["127.0.0.1:9"]
tls = {{ mode = "terminate", cert = "{cert}", key = "{key}" }}

[[routes]]
name = "b"
ports = [0]
bind = "127.0.0.1"
action = "bridge"
targets = ["127.0.0.1:9"]
tls = {{ mode = "terminate", cert = "{cert}", key = "{key}" }}
"""


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, int]]:
    """A route file, and counters of compiles and certificate loads from now on."""
    issued = trustme.CA().issue_cert("secure.example")
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES.format(cert=cert, key=key))
    counts = {"compiles": 0, "certificates": 0}
    compile_table, load_cert_chain = _table.compile_table, ssl.SSLContext.load_cert_chain

    def counting_compile(config: Any) -> Any:
        counts["compiles"] += 1
        return compile_table(config)

    def counting_load(self: ssl.SSLContext, *args: Any, **kw: Any) -> None:
        counts["certificates"] += 1
        load_cert_chain(self, *args, **kw)

    monkeypatch.setattr(_table, "compile_table", counting_compile)
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", counting_load)
    return path, counts


def test_check_compiles_once(counted: tuple[pathlib.Path, dict[str, int]], capsys: pytest.CaptureFixture[str]) -> None:
    path, counts = counted
    assert _cli.main(["check", str(path), "--show-nft"]) == 0
    assert capsys.readouterr().err == "ok: 2 routes\n"
    assert counts == {"compiles": 1, "certificates": 1}


async def test_load_config_then_serve_and_reload_compile_once_each(counted: tuple[pathlib.Path, dict[str, int]]) -> None:
    path, counts = counted
    config = triofwd.load_config(path)  # checked: compiled once
    async with forwarder(config) as fwd:  # served with that table: no second compile
        assert counts == {"compiles": 1, "certificates": 1}
        await fwd.reload(triofwd.load_config(path))
        assert counts == {"compiles": 2, "certificates": 2}
        await fwd.reload(config)  # the same Config again: compiled afresh (renewed certificates are read)
        assert counts == {"compiles": 3, "certificates": 3}


def test_the_daemon_compiles_once_to_start_and_once_per_reload(counted: tuple[pathlib.Path, dict[str, int]], tmp_path: pathlib.Path) -> None:
    """`triofwd serve` in this process: start, one SIGHUP reload, SIGTERM."""
    path, counts = counted
    sock = tmp_path / "c.sock"
    seen: dict[str, Any] = {}

    def operator() -> None:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the forwarder binds its ports after the control socket
        seen["started"] = dict(counts)
        os.kill(os.getpid(), signal.SIGHUP)
        while counts["compiles"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        seen["reloaded"] = dict(counts)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    assert _cli.main(["serve", str(path), "--control", str(sock), "--log-level", "warning"]) == 0
    thread.join(5)
    assert seen == {"started": {"compiles": 1, "certificates": 1}, "reloaded": {"compiles": 2, "certificates": 2}}


async def test_a_config_changed_after_load_config_is_compiled_again(counted: tuple[pathlib.Path, dict[str, int]]) -> None:
    path, counts = counted
    config = triofwd.load_config(path)
    config.routes[1].name = "renamed"
    async with forwarder(config) as fwd:
        assert counts["compiles"] == 2
        assert sorted(fwd.addresses) == ["a", "renamed"]
