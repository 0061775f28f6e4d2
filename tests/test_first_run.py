"""A first run: what `make run` starts comes up without a warning, and its demo answers HTTP/1.0."""

from __future__ import annotations

import pathlib
import resource
import socket
import time
from collections.abc import Callable

import triofwd
from tests.conftest import REPO, Daemon, free_port, run_triofwd
from tests.test_cli import demo_backend

TIMEOUT = 5.0


def demo(daemon: Callable[..., Daemon], tmp_path: pathlib.Path, backend_port: int, **kw: object) -> Daemon:
    """routes/demo.toml with make run's options (--access-log -, --control, --metrics), its ports made free."""
    text = (REPO / "routes" / "demo.toml").read_text().replace("8080", "0").replace("8083", "0").replace("8081", str(backend_port))
    options = ["--access-log", "-", "--control", str(tmp_path / "demo.sock"), "--metrics", f"127.0.0.1:{free_port()}"]
    return daemon(text, *options, **kw)


def test_the_demo_starts_without_a_warning_and_http_1_0_returns_and_closes(daemon: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    with demo_backend() as port:
        d = demo(daemon, tmp_path, port)
        with socket.create_connection(d.address("web"), timeout=TIMEOUT) as sock:
            start = time.monotonic()
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):  # until the end: HTTP/1.0 closes after one answer
                answer += chunk
            took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello from the triofwd demo backend\n")
    assert took < TIMEOUT / 2  # closed by the backend, not by a timeout
    noise = [(e["level"], e["msg"]) for e in d.logs() if e["level"] not in ("debug", "info")]
    assert noise == []


def test_an_open_file_limit_below_the_default_max_connections_is_no_warning(daemon: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    """A hard limit of 1024 holds about 480 connections, not the default 10000: said once, as information."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # noqa: E731
    with demo_backend() as port:
        d = demo(daemon, tmp_path, port, preexec_fn=limit)
        d.wait_log("the open file limit")  # logged once serving
    assert [(e["level"], e["msg"]) for e in d.logs() if "open file limit" in e["msg"]] == [
        (
            "info",
            "the open file limit (1024) holds about 480 connections, fewer than max_connections = 10000 (the default); "
            "set max_connections to what you expect, or raise the hard limit (ulimit -Hn, LimitNOFILE=) to 20064",
        )
    ]
    assert [e for e in d.logs() if e["level"] not in ("debug", "info")] == []


def test_a_max_connections_asked_for_that_does_not_fit_is_a_warning(daemon: Callable[..., Daemon]) -> None:
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # noqa: E731
    d = daemon('[settings]\nmax_connections = 5000\n[[routes]]\nname = "r"\nports = [0]\nbind = "127.0.0.1"\naction = "reject"\n', preexec_fn=limit)
    d.wait_log("the open file limit")
    assert [(e["level"], e["msg"]) for e in d.logs() if "open file limit" in e["msg"]] == [
        (
            "warning",
            "the open file limit (1024) holds about 480 connections, fewer than max_connections = 5000; "
            "raise the hard limit (ulimit -Hn, LimitNOFILE=) to 10064",
        )
    ]


def test_version() -> None:
    result = run_triofwd("--version")
    assert (result.returncode, result.stdout) == (0, f"triofwd {triofwd.__version__}\n")
