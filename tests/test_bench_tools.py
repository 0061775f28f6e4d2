"""The benchmark's reference forwarders (tools/forwarders/) forward bytes and half-close correctly.

Correctness only, no performance: a benchmark comparing triofwd with a forwarder that loses
or truncates data would be meaningless. Each forwarder runs as a subprocess on port 0 in
front of an echo backend; 1 MB goes through and back, then the client's EOF must come back
as the backend's EOF.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import trio

FORWARDERS = pathlib.Path(__file__).resolve().parent.parent / "tools" / "forwarders"
PAYLOAD = os.urandom(1 << 20)


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close back."""
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()


async def read_ready_port(process: trio.Process) -> int:
    """The forwarder prints "ready PORT" once listening."""
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some(1)
        assert chunk, f"forwarder exited before 'ready' ({process.returncode})"
        line += chunk
    word, port = line.split()
    assert word == b"ready"
    return int(port)


@pytest.mark.parametrize(
    "script",
    [
        "plain_trio.py",
        "engine_prototype.py",
        pytest.param(
            "asyncio_uvloop.py",
            marks=pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop not installed"),
        ),
    ],
)
async def test_reference_forwarder_round_trip(script: str) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            backend = (await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")))[0]
            target_port = backend.socket.getsockname()[1]
            argv = [sys.executable, str(FORWARDERS / script), "0", "127.0.0.1", str(target_port)]
            process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
            try:
                port = await read_ready_port(process)
                client = await trio.open_tcp_stream("127.0.0.1", port)
                async with client:
                    received = bytearray()

                    async def send() -> None:
                        await client.send_all(PAYLOAD)
                        await client.send_eof()

                    nursery.start_soon(send)
                    while data := await client.receive_some(65536):
                        received += data
                assert received == PAYLOAD  # every byte, in order, and the EOF came back after them
            finally:
                process.kill()  # by pid: only the process this test started
                await process.wait()
            nursery.cancel_scope.cancel()


def test_hold_serves_every_connection_while_all_are_open() -> None:
    """tools/hold.py (10,000 connections on the real machine) works, on a few hundred here."""
    hold = FORWARDERS.parent / "hold.py"
    done = subprocess.run([sys.executable, str(hold), "--connections", "300"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["connections"] == 300
    assert result["serve_s"] > 0 and result["pss_kib_per_connection"] > 0
