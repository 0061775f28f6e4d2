"""atheris: control messages. Any bytes as a request to a live embedded forwarder's control
server: a Reply that encodes (or a watch started), never an exception."""

from __future__ import annotations

import threading

import atheris
import common

with atheris.instrument_imports():
    import msgspec
    import trio

    import triofwd
    from triofwd.control import ControlServer
    from triofwd.control.messages import Reply, WatchRequest

_ready = threading.Event()
_server: ControlServer | None = None
_token: trio.lowlevel.TrioToken | None = None


async def _forwarder() -> None:
    global _server, _token
    routes = [triofwd.Route(name="r", ports=[0], bind="127.0.0.1", action="reject")]
    async with trio.open_nursery() as nursery:
        fwd = await nursery.start(lambda task_status: triofwd.serve(triofwd.Config(routes=routes), task_status=task_status))
        _server, _token = ControlServer(fwd), trio.lowlevel.current_trio_token()
        _ready.set()


def test_one_input(data: bytes) -> None:
    assert _server is not None
    outcome = trio.from_thread.run(_server.dispatch, data, trio_token=_token)
    assert isinstance(outcome, Reply | WatchRequest)
    if isinstance(outcome, Reply):
        assert outcome.ok or isinstance(outcome.error, str)
        msgspec.json.encode(outcome)


if __name__ == "__main__":
    threading.Thread(target=trio.run, args=(_forwarder,), daemon=True).start()
    _ready.wait(10)
    common.run(test_one_input)
