"""tools/demo_backend.py speaks HTTP/1.1 through h11: keep-alive unless HTTP/1.0 or Connection: close."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import h11
import pytest

from tests.conftest import REPO

BODY = b"hello from the triofwd demo backend\n"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[str, int]]:
    """The backend as `make run` starts it, on a port the kernel picks (--port 0)."""
    proc = subprocess.Popen([sys.executable, "tools/demo_backend.py", "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("demo backend on http://127.0.0.1:"), line
        yield "127.0.0.1", int(line.rsplit(":", 1)[1].strip("/\n"))
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def exchange(sock: socket.socket, method: bytes = b"GET", *, close: bool = False) -> tuple[h11.Response, bytes, bool]:
    """One HTTP/1.1 request through h11 as the client: (response, body, whether the server then closed)."""
    client = h11.Connection(h11.CLIENT)
    headers = [(b"host", b"x"), *([(b"connection", b"close")] if close else [])]
    sock.sendall(client.send(h11.Request(method=method, target="/", headers=headers)) + client.send(h11.EndOfMessage()))
    response, body = None, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    assert response is not None
    assert client.trailing_data[0] == b"", "bytes after the response"  # e.g. a body after HEAD's
    return response, body, closed(sock)


def closed(sock: socket.socket) -> bool:
    """True when the server closed the connection after its response (EOF within TIMEOUT), False when it keeps it open."""
    sock.settimeout(0.3)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    finally:
        sock.settimeout(TIMEOUT)


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=TIMEOUT)


def test_http_1_0_gets_its_answer_and_the_connection_closes(backend: tuple[str, int]) -> None:
    with connect(backend) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):  # the server's EOF ends this loop (a kept connection would time out)
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nconnection: close" in head.lower()
    assert body == BODY


def test_keep_alive_serves_two_requests_on_one_connection(backend: tuple[str, int]) -> None:
    with connect(backend) as sock:
        for _ in range(2):
            response, body, closed_after = exchange(sock)
            assert (response.status_code, response.reason, body, closed_after) == (200, b"OK", BODY, False)
            assert dict(response.headers)[b"content-type"] == b"text/plain"


def test_pipelined_requests_are_answered_in_order(backend: tuple[str, int]) -> None:
    with connect(backend) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 3 and answer.endswith(BODY)


def test_connection_close_closes(backend: tuple[str, int]) -> None:
    with connect(backend) as sock:
        response, body, closed_after = exchange(sock, close=True)
    assert (response.status_code, body, closed_after) == (200, BODY, True)


def test_head_gets_the_headers_of_a_get_and_no_body(backend: tuple[str, int]) -> None:
    with connect(backend) as sock:
        response, body, closed_after = exchange(sock, b"HEAD")
        assert (response.status_code, body, closed_after) == (200, b"", False)
        assert dict(response.headers)[b"content-length"] == b"%d" % len(BODY)
        response, body, _ = exchange(sock)  # the connection is still in step
        assert body == BODY


def test_what_is_not_http_gets_400_and_a_close(backend: tuple[str, int]) -> None:
    with connect(backend) as sock:
        sock.sendall(b"hello\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
