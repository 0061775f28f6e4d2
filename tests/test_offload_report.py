"""Offload routes' kernel counters as stats, metrics and the inspector report them.

Reading the counters from a real kernel is tested in a network namespace (test_offload.py);
here the reading is stubbed so that the reporting path runs everywhere.
"""

from __future__ import annotations

import pathlib

import trio

import triofwd
from tests.conftest import config, forwarder, route
from triofwd._metrics import render_metrics
from triofwd._stats import Stats
from triofwd.control import inspector


def test_snapshot_metrics_and_inspector_table_carry_kernel_counters() -> None:
    snapshot = Stats().snapshot([], {"db": (12, 3400)})
    assert snapshot["routes"]["db"]["offload"] == {"packets": 12, "bytes": 3400}
    text = render_metrics(snapshot, ["db"])
    assert 'triofwd_offload_packets_total{route="db"} 12\n' in text
    assert 'triofwd_offload_bytes_total{route="db"} 3400\n' in text
    lines = inspector.format_stats(snapshot)
    assert lines[-2:] == ["OFFLOAD ROUTE  PACKETS    BYTES", "db                  12  3.3 KiB"]


async def test_the_control_stats_command_reads_fresh_kernel_counters(tmp_path: pathlib.Path) -> None:
    async with forwarder(config(route(action="reject"))) as fwd:
        reads = 0

        async def fake_read() -> dict[str, tuple[int, int]]:
            nonlocal reads
            reads += 1
            fwd._kernel.counters = {"db": (7 * reads, 700 * reads)}
            return fwd._kernel.counters

        fwd._kernel.read_counters = fake_read  # the kernel step, stubbed
        async with trio.open_nursery() as nursery:
            path = await nursery.start(triofwd.serve_control, fwd, str(tmp_path / "c.sock"))
            async with triofwd.open_control(path) as client:
                stats = await client.request("stats")
                metrics = await client.request("metrics")
            nursery.cancel_scope.cancel()
    assert stats["routes"]["db"]["offload"] == {"packets": 7, "bytes": 700}
    assert 'triofwd_offload_packets_total{route="db"} 14\n' in metrics
