"""Offload routes against real nftables, in a private netns.

Each scenario runs tests/offload_netns_helper.py under `unshare -n` (a network namespace
this test creates; only 127.0.0.1 and an address it puts on that namespace's lo are
used), once per module, and the tests below assert on the JSON it prints:

  embedded  triofwd.serve: traffic on an offload port reaches the target while the
            connection table stays empty and the kernel counters grow; reload swaps the
            rules in one nft transaction, in place (200 reloads under traffic: the table is
            never missing and every connection reaches a target);
            a connection that reaches the program anyway ends with reason `offloaded`;
            a cancelled nursery and an exception both remove the table
  daemon    `python -m triofwd serve`: the same traffic, SIGHUP, SIGTERM, SIGKILL + restart
            (and a restart without offload routes after a crash, xfail)
  fallback  `nft` not on PATH: offload_fallback = "forward", or OffloadError
  loonly    a namespace with loopback addresses only (a masquerade bug, xfail)

How a connection is made to reach the program although the DNAT rule is in place: a
table of the test's own marks the offload port's packets `notrack`, so no nat chain sees
them (the kernel step is real, not monkeypatched).

The route-file checks (hostile values refused before nft runs) need no namespace: they
never bind a port and prove that a fake `nft` on PATH is never started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import triofwd
from tests.conftest import REPO, netns_prefix, run_triofwd
from triofwd._errors import OffloadError

HELPER = Path(__file__).resolve().parent / "offload_netns_helper.py"
HELPER_TIMEOUT_S = 60
PAYLOAD = 20_480  # offload_netns_helper.PAYLOAD
TARGET_A, TARGET_B = "9001", "9002"


# ------------------------------------------------------------------ running the helper


@pytest.fixture(scope="module")
def netns(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """Run a helper scenario once per module (its result, or its failure, is reused)."""
    prefix = netns_prefix()
    results: dict[str, dict[str, Any] | str] = {}

    def run(scenario: str) -> dict[str, Any]:
        if scenario not in results:
            workdir = tmp_path_factory.mktemp(scenario)
            env = dict(os.environ, PYTHONPATH=str(REPO))
            try:
                # unshare execs the helper in place: the timeout kills the helper itself,
                # and the daemons it started die with it (PR_SET_PDEATHSIG).
                done = subprocess.run(
                    [*prefix, sys.executable, str(HELPER), scenario, str(workdir)],
                    capture_output=True, text=True, timeout=HELPER_TIMEOUT_S, env=env, cwd=REPO,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                results[scenario] = f"helper {scenario} timed out after {HELPER_TIMEOUT_S}s: {exc.stderr!r}"
            else:
                try:
                    out = json.loads(done.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    out = {"error": f"exit {done.returncode}, stdout {done.stdout!r}"}
                if done.returncode != 0 or "error" in out:
                    results[scenario] = f"helper {scenario} failed: {out.get('error')}\nstderr: {done.stderr}"
                else:
                    results[scenario] = out
        result = results[scenario]
        if isinstance(result, str):
            pytest.fail(result)
        return result

    return run


@pytest.fixture(scope="module")
def embedded(netns: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    return netns("embedded")


@pytest.fixture(scope="module")
def daemon(netns: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    return netns("daemon")


@pytest.fixture(scope="module")
def fallback(netns: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    return netns("fallback")


@pytest.fixture(scope="module")
def loonly(netns: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    return netns("loonly")


@pytest.fixture(scope="module")
def udp(netns: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    return netns("udp")


def reached(call: dict[str, Any], target: str) -> None:
    """The client got the backend's greeting and its whole payload echoed back."""
    assert call["tag"] == target, call
    assert call["echo_ok"], call


def only_target(ruleset: str, target: str, other: str) -> None:
    """The kernel's table DNATs port 8001 to 127.0.0.1:target and mentions no other target."""
    assert f"dnat ip to 127.0.0.1:{target}" in ruleset, ruleset
    assert f"127.0.0.1 . {target}" in ruleset, ruleset
    assert f":{other}" not in ruleset and f". {other}" not in ruleset, ruleset


# ------------------------------------------------------------------ 1. the kernel path


def test_offload_client_reaches_target_while_the_table_stays_empty(embedded: dict[str, Any]) -> None:
    assert embedded["tables_running"] == 1
    call = embedded["offload_call"]
    assert call == {"tag": TARGET_A, "echo_ok": True, "eof_after": True}  # half-close passed on too
    # While the client's connection was open, and after it closed: nothing in the table.
    assert embedded["open_table_size"] == 0
    assert embedded["table_size_after"] == 0
    # The watch stream saw exactly one connection: the user-space route's, for contrast.
    assert [event for event, _ in embedded["events"]].count("open") == 1
    assert ["close", "plain"] in embedded["events"]
    reached(embedded["plain"], TARGET_A)
    assert embedded["access_routes"] == ["plain"]
    assert embedded["stats_off"]["total"] == 0
    assert embedded["stats_off"]["terminations"] == {}


def test_offload_route_kernel_counters_grow(embedded: dict[str, Any]) -> None:
    assert embedded["counters_before"] == {"off": [0, 0]}
    packets, size = embedded["counters_after"]["off"]
    # The payload went both ways (echo) and every packet is counted once.
    assert packets >= 6
    assert 2 * PAYLOAD < size < 3 * PAYLOAD
    assert embedded["stats_off"]["offload"] == {"packets": packets, "bytes": size}


async def test_read_offload_counters_without_offload_routes_is_empty() -> None:
    # No offload route: nothing is installed and nft is never asked (works without root).
    cfg = triofwd.Config(routes=[triofwd.Route(name="r", ports=[0], bind="127.0.0.1", targets=["127.0.0.1:9"])])
    async with trio.open_nursery() as nursery:
        fwd = await nursery.start(triofwd.serve, cfg)
        assert await fwd.read_offload_counters() == {}
        assert "offload" not in fwd.stats()["routes"].get("r", {})
        nursery.cancel_scope.cancel()


def test_daemon_offload_traffic_has_no_access_log_line(daemon: dict[str, Any]) -> None:
    first = daemon["first"]
    assert first["tables_running"] == 1
    reached(first["offload_call"], TARGET_A)
    reached(first["plain_call"], TARGET_A)
    # The access log (read after the daemon stopped) has the user-space connection only.
    assert first["access_routes"] == ["plain"]
    packets, size = first["counters"]["route_off"]
    assert packets >= 6
    assert 2 * PAYLOAD < size < 3 * PAYLOAD


# ------------------------------------------------------------------ 2. no stale table


def test_embedded_exit_removes_the_table(embedded: dict[str, Any]) -> None:
    assert embedded["tables_before_exit"] == 1
    assert embedded["tables_after_cancel"] == 0  # the embedding nursery was cancelled
    assert embedded["tables_before_error"] == 1
    assert embedded["error_propagated"]
    assert embedded["tables_after_error"] == 0  # an exception left the nursery


def test_sigterm_removes_the_table(daemon: dict[str, Any]) -> None:
    first = daemon["first"]
    assert first["exit"] == 0
    assert first["tables_after_term"] == 0
    assert first["log_errors"] == []


def test_sigkill_leaves_the_table_and_a_restart_replaces_it(daemon: dict[str, Any]) -> None:
    killed, restarted = daemon["killed"], daemon["restarted"]
    assert killed["exit"] == -9
    assert killed["tables_after_kill"] == 1  # nothing can clean up after SIGKILL...
    only_target(killed["stale_ruleset"], TARGET_A, TARGET_B)
    # ...so the restart (its route file now says 9002) replaces the table in one go.
    assert restarted["tables_running"] == 1
    only_target(restarted["ruleset"], TARGET_B, TARGET_A)
    reached(restarted["call"], TARGET_B)
    assert restarted["exit"] == 0
    assert restarted["tables_after_term"] == 0
    assert restarted["log_errors"] == []


def test_restart_without_offload_routes_removes_a_stale_table(daemon: dict[str, Any]) -> None:
    stale = daemon["stale_without_offload"]
    assert stale["tables_after_kill"] == 1
    assert stale["exit"] == 0
    # Port 8001 is a user-space forward to 9002 now; the old kernel rule must not win.
    reached(stale["call"], TARGET_B)
    assert stale["tables_running"] == 0
    assert stale["tables_after_term"] == 0


# ------------------------------------------------------------------ 3. reload


def test_reload_swaps_the_target(embedded: dict[str, Any]) -> None:
    only_target(embedded["ruleset_before_reload"], TARGET_A, TARGET_B)
    assert embedded["reload_change"] == {"added": [], "removed": [], "changed": ["off"]}
    only_target(embedded["ruleset_after_reload"], TARGET_B, TARGET_A)
    assert embedded["tables_after_reload"] == 1
    reached(embedded["after_reload_call"], TARGET_B)


def test_reload_is_one_transaction(embedded: dict[str, Any]) -> None:
    atomic = embedded["atomic"]
    # `nft list tables` polled in a tight loop during the reloads: always exactly one table.
    assert atomic["polls"] >= 5, atomic
    assert atomic["table_counts"] == [1], atomic
    assert atomic["probes"] >= 20, atomic
    only_target(embedded["ruleset_after_reloads"], TARGET_B, TARGET_A)


def test_reload_never_lets_a_connection_past_the_kernel(embedded: dict[str, Any]) -> None:
    """A reload updates the table in place (chains and sets flushed and refilled): no SYN
    slips past DNAT while it commits. Deleting and recreating the table did, now and then:
    such a connection reached triofwd itself, which closed it at once ("" here)."""
    # Every connection made all the while reached one target or the other: none was
    # refused, hung, or slipped through to the program.
    assert set(embedded["atomic"]["probe_results"]) == {TARGET_A, TARGET_B}, embedded["atomic"]


def test_reload_reinstalls_a_table_deleted_from_outside(embedded: dict[str, Any]) -> None:
    only_target(embedded["ruleset_after_outside_delete"], TARGET_A, TARGET_B)


def test_daemon_sighup_swaps_the_target(daemon: dict[str, Any]) -> None:
    first = daemon["first"]
    only_target(first["ruleset_after_hup"], TARGET_B, TARGET_A)
    assert first["tables_after_hup"] == 1
    reached(first["after_hup_call"], TARGET_B)


# ------------------------------------------------------------------ 4. hostile values

HOSTILE = [
    (
        "quote.toml",
        '[[routes]]\nname = "a\\"; flush ruleset; \\""\nports = [8001]\naction = "offload"\ntargets = ["127.0.0.1:9001"]\n',
        [
            """invalid route name 'a"; flush ruleset; "': use 1-63 letters, digits, '_', '.' or '-' - at `$.routes[0].name`""",
        ],
    ),
    (
        "newline.toml",
        '[[routes]]\nname = "web\\ntable ip x { }"\nports = [8001]\naction = "offload"\ntargets = ["127.0.0.1:9001"]\n',
        [
            "invalid route name 'web\\ntable ip x { }': use 1-63 letters, digits, '_', '.' or '-' - at `$.routes[0].name`",
        ],
    ),
    (
        "quote.json",
        json.dumps({"routes": [{"name": "it's", "ports": [8001], "action": "offload", "targets": ["127.0.0.1:9001"]}]}),
        [
            """invalid route name "it's": use 1-63 letters, digits, '_', '.' or '-' - at `$.routes[0].name`""",
        ],
    ),
    (
        "cidr.yaml",
        "routes:\n  - name: web\n    ports: [8001]\n    action: offload\n    targets: ['127.0.0.1:9001']\n"
        "    client_ips: ['10.0.0.0/33']\n    block_ips: ['192.0.2.0/24; accept']\n",
        [
            "invalid CIDR '10.0.0.0/33': expected an address or address/prefix - at `$.routes[0].client_ips[0]`",
            "invalid CIDR '192.0.2.0/24; accept': expected an address or address/prefix - at `$.routes[0].block_ips[0]`",
        ],
    ),
    (
        "hostname.toml",
        '[[routes]]\nname = "db"\nports = [5432]\naction = "offload"\ntargets = ["db.internal:5432"]\n',
        [
            "route 'db': target host 'db.internal' is not an IP address literal (hostnames cannot be offloaded) - at `$.routes[0]`",
        ],
    ),
    (
        # ipaddress accepts any IPv6 scope id, so the text reaches the offload check.
        "zone.toml",
        '[[routes]]\nname = "z"\nports = [8001]\nbind = "::"\naction = "offload"\ntargets = ["[fe80::2%eth0; flush ruleset]:80"]\n',
        [
            "route 'z': target host 'fe80::2%eth0; flush ruleset' is not an IP address literal (hostnames cannot be offloaded) - at `$.routes[0]`",
        ],
    ),
]


@pytest.fixture
def fake_nft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `nft` first on PATH that only records that it ran; returns its record file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "nft-ran"
    script = bin_dir / "nft"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\nexit 1\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return record


@pytest.mark.parametrize(("filename", "text", "errors"), HOSTILE, ids=[case[0] for case in HOSTILE])
def test_check_refuses_hostile_values(
    tmp_path: Path, fake_nft: Path, capsys: pytest.CaptureFixture[str], filename: str, text: str, errors: list[str]
) -> None:
    # `triofwd check` in process (the command's own entry point); one subprocess run below.
    from triofwd._cli import main

    path = tmp_path / filename
    path.write_text(text)
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"{path}: {line}" for line in errors]
    assert not fake_nft.exists()


# Several hostile routes in one file: every one is reported, each with its path.
HOSTILE_FILE = "".join(
    f'[[routes]]\nname = {name}\nports = [{port}]\nbind = "127.0.0.1"\naction = "offload"\ntargets = ["127.0.0.1:9001"]\n{extra}\n'
    for name, port, extra in [
        ('"a\\"; flush ruleset; \\""', 8001, ""),
        ('"web\\ntable ip x { }"', 8002, ""),
        ('"ok"', 8003, 'client_ips = ["10.0.0.0/33"]\nblock_ips = ["192.0.2.0/24; accept"]'),
    ]
)
HOSTILE_FILE_ERRORS = [
    """invalid route name 'a"; flush ruleset; "': use 1-63 letters, digits, '_', '.' or '-' - at `$.routes[0].name`""",
    "invalid route name 'web\\ntable ip x { }': use 1-63 letters, digits, '_', '.' or '-' - at `$.routes[1].name`",
    "invalid CIDR '10.0.0.0/33': expected an address or address/prefix - at `$.routes[2].client_ips[0]`",
    "invalid CIDR '192.0.2.0/24; accept': expected an address or address/prefix - at `$.routes[2].block_ips[0]`",
]


def test_check_command_lists_every_hostile_value(tmp_path: Path, fake_nft: Path) -> None:
    path = tmp_path / "hostile.toml"
    path.write_text(HOSTILE_FILE)
    result = run_triofwd("check", str(path))
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{path}: {line}" for line in HOSTILE_FILE_ERRORS]
    assert not fake_nft.exists()


def test_serve_refuses_hostile_values_before_nft_runs(tmp_path: Path, fake_nft: Path) -> None:
    path = tmp_path / "hostile.toml"
    path.write_text(HOSTILE_FILE)
    result = run_triofwd("serve", str(path))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert all(line in result.stderr for line in HOSTILE_FILE_ERRORS), result.stderr
    assert not fake_nft.exists()


@pytest.mark.parametrize(
    ("name", "target", "error"),
    [
        ('x"\ny', "127.0.0.1:9001", r"invalid route name .* - at `\$\.routes\[0\]\.name`"),
        ("db", "db.internal:5432", r"hostnames cannot be offloaded\) - at `\$\.routes\[0\]`"),
    ],
    ids=["name", "hostname"],
)
async def test_embedded_serve_refuses_hostile_values_before_nft_runs(fake_nft: Path, name: str, target: str, error: str) -> None:
    # A Config built in code skips the file parser; serve() still checks it first.
    cfg = triofwd.Config(routes=[triofwd.Route(name=name, ports=[8001], bind="127.0.0.1", action="offload", targets=[target])])
    async with trio.open_nursery() as nursery:
        with pytest.raises(triofwd.ConfigError, match=error):
            await nursery.start(triofwd.serve, cfg)
    assert not fake_nft.exists()


# ------------------------------------------------------------------ 5. nft unavailable


def test_fallback_forwards_in_user_space_and_names_the_route(fallback: dict[str, Any]) -> None:
    assert fallback["actions"] == {"off": "forward", "plain": "forward"}
    assert fallback["call"] == {"tag": TARGET_A, "echo_ok": True, "eof_after": True}
    # In user space the connection is in the table, and ends like any forwarded one.
    assert fallback["open_table"] == [{"route": "off", "target": f"127.0.0.1:{TARGET_A}", "state": "established"}]
    [record] = fallback["access"]
    assert record["route"] == "off"
    assert record["reason"] == "normal"
    assert record["bytes_in"] == PAYLOAD
    assert fallback["counters"] == {}  # nothing in the kernel to read
    assert any(w.startswith("route off: nftables unavailable") and "forwarding in user space" in w for w in fallback["warnings"]), fallback["warnings"]
    assert fallback["tables_after"] == 0


def test_without_fallback_serve_fails_to_start(fallback: dict[str, Any]) -> None:
    assert fallback["strict"] == {
        "raised": "OffloadError",
        "messages": ["cannot install nftables rules for offload routes off: nft binary 'nft' not found"],
    }
    assert fallback["port_free_after_refusal"]  # it failed before binding anything


async def test_without_fallback_serve_raises_offload_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No namespace needed: with nft off PATH, serve() fails before it binds a port.
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = triofwd.Config(
        routes=[
            triofwd.Route(name="soft", ports=[8001], bind="127.0.0.1", action="offload", targets=["127.0.0.1:9001"], offload_fallback="forward"),
            triofwd.Route(name="hard", ports=[8002], bind="127.0.0.1", action="offload", targets=["127.0.0.1:9002"]),
        ]
    )
    async with trio.open_nursery() as nursery:
        with pytest.raises(OffloadError) as info:  # raised by nursery.start as is, not grouped
            await nursery.start(triofwd.serve, cfg)
    # One line, naming only the route without a fallback, and why.
    assert str(info.value) == "cannot install nftables rules for offload routes hard: nft binary 'nft' not found"


# ------------------------------------------------------------------ 6. reason `offloaded`


def test_a_connection_the_kernel_did_not_take_is_closed_as_offloaded(embedded: dict[str, Any]) -> None:
    # The test's own `notrack` table made the connection skip triofwd's DNAT rule.
    bypass = embedded["bypass"]
    assert bypass["result"] == ""  # closed before a byte: no target was dialled
    assert bypass["seconds"] < 2.0  # at once, not after the client's 3 s timeout
    [record] = embedded["bypass_access"]
    assert record["route"] == "off"
    assert record["reason"] == "offloaded"
    assert record["target"] is None
    # Counted once more on the route (a reload may already have let one through: see above).
    before, after = embedded["stats_before_bypass"], embedded["bypass_stats"]
    assert set(after["terminations"]) == {"offloaded"}
    assert after["terminations"]["offloaded"] == before["terminations"].get("offloaded", 0) + 1
    assert after["total"] == before["total"] + 1
    assert after["active"] == 0


# ------------------------------------------------------------------ loopback-only host


def test_preserve_source_ip_works_with_loopback_addresses_only(loonly: dict[str, Any]) -> None:
    reached(loonly["preserve"], TARGET_A)


def test_masquerade_works_with_loopback_addresses_only(loonly: dict[str, Any]) -> None:
    reached(loonly["masquerade"], TARGET_A)


# ------------------------------------------------------------------ UDP routes


def test_udp_offload_datagrams_go_through_the_kernel(udp: dict[str, Any]) -> None:
    assert udp["tables_running"] == 1
    assert "udp dport @ports_dns" in udp["ruleset"] and "ct protocol udp" in udp["ruleset"], udp["ruleset"]
    assert udp["calls"] == [TARGET_A] * 3, udp["calls"]
    assert udp["sessions"] == 0  # no session in user space: the kernel forwarded them
    packets, nbytes = udp["counters"]["dns"]
    assert packets >= 6 and nbytes > 0  # three datagrams each way at least


def test_udp_offload_reload_and_exit(udp: dict[str, Any]) -> None:
    assert udp["after_reload"] == TARGET_B, udp
    only_target(udp["ruleset_after_reload"], TARGET_B, TARGET_A)
    assert udp["tables_after_exit"] == 0
