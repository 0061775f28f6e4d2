"""Log rotation: SIGUSR1 reopens the access log, so logrotate can rename it (no copytruncate)."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import REPO, Daemon, roundtrip, threaded_echo
from triofwd._accesslog import AccessLogFile

TIMEOUT = 10.0
ROTATIONS = 3
PER_ROTATION = 30  # connections the loop makes between two rotations, at least


def routes(target: str) -> str:
    return f'[settings]\nshutdown_grace = "1s"\n[[routes]]\nname = "echo"\nports = [0]\nbind = "127.0.0.1"\ntargets = ["{target}"]\n'


def wait_lines(path: pathlib.Path, count: int) -> None:
    """Until another process has written `count` whole lines to `path`."""
    deadline = time.monotonic() + TIMEOUT
    while path.read_text().count("\n") < count:
        assert time.monotonic() < deadline, f"{path}: {path.read_text()!r}"
        time.sleep(0.01)


def test_access_log_file_reopen_writes_to_a_new_file_at_the_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLogFile(str(path))
    log.write("one\n")
    log.flush()
    path.rename(tmp_path / "access.log.1")
    log.write("two\n")  # still the renamed file: the path is only looked at by reopen()
    log.flush()
    log.reopen()
    log.write("three\n")
    log.flush()
    log.close()
    assert ((tmp_path / "access.log.1").read_text(), path.read_text()) == ("one\ntwo\n", "three\n")


def test_sigusr1_under_a_connection_loop_loses_and_splits_no_line(daemon: Callable[..., Daemon]) -> None:
    """logrotate's way: rename the file, SIGUSR1; every line lands whole in the old or the new file."""
    with threaded_echo() as target:
        d = daemon(routes(target))
        address = d.address("echo")
        made = 0
        failures: list[str] = []
        progress = threading.Condition()
        stop = threading.Event()

        def client_loop() -> None:
            nonlocal made
            while not stop.is_set():
                try:
                    roundtrip(address, b"x").close()
                except (OSError, AssertionError) as exc:
                    failures.append(repr(exc))
                with progress:
                    made += 1
                    progress.notify_all()

        def made_at_least(count: int) -> None:
            with progress:
                assert progress.wait_for(lambda: made >= count, TIMEOUT), made

        loop = threading.Thread(target=client_loop, daemon=True)
        loop.start()
        rotated = []
        try:
            for i in range(1, ROTATIONS + 1):
                made_at_least(i * PER_ROTATION)
                moved = d.access_log.with_name(f"{d.access_log.name}.{i}")
                d.access_log.rename(moved)  # lines keep going to it until the daemon reopens
                rotated.append(moved)
                d.signal(signal.SIGUSR1)
                d.wait_log("access log reopened", count=i)
            made_at_least((ROTATIONS + 1) * PER_ROTATION)
        finally:
            stop.set()
            loop.join(TIMEOUT)
        d.signal(signal.SIGTERM)  # every connection ended: every line written
        assert d.wait() == 0
    assert failures == []
    records = []
    for path in [*rotated, d.access_log]:
        text = path.read_text()
        assert text.endswith("\n"), path  # no line cut short at the end of a file
        lines = text.splitlines()
        assert lines, f"{path} got no line"
        records += [json.loads(line) for line in lines]  # each line whole: one JSON object
    assert len(records) == made
    assert len({r["id"] for r in records}) == made  # none twice
    assert {r["reason"] for r in records} == {"normal"}


def test_a_reopen_that_fails_keeps_the_old_file(daemon: Callable[..., Daemon]) -> None:
    with threaded_echo() as target:
        d = daemon(routes(target))
        moved = d.access_log.with_name(d.access_log.name + ".1")
        d.access_log.rename(moved)
        d.access_log.mkdir()  # the path cannot be opened as a file now
        d.signal(signal.SIGUSR1)
        [error] = d.wait_log("cannot reopen the access log")
        assert error["level"] == "error" and error["msg"].endswith("still writing to the old file: Is a directory")
        roundtrip(d.address("echo")).close()
        wait_lines(moved, 1)  # written to the old file, before the path can be opened again
        d.access_log.rmdir()
        d.signal(signal.SIGUSR1)
        d.wait_log("access log reopened")
        roundtrip(d.address("echo")).close()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert [len(path.read_text().splitlines()) for path in (moved, d.access_log)] == [1, 1]


def test_sigusr1_without_an_access_log_file_is_harmless(daemon: Callable[..., Daemon]) -> None:
    with threaded_echo() as target:
        d = daemon(routes(target), "--access-log", "-")  # the last --access-log wins: stdout
        d.signal(signal.SIGUSR1)
        d.wait_log("SIGUSR1: no access log file to reopen")
        roundtrip(d.address("echo")).close()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0


def test_contribs_logrotate_snippet_rotates_a_running_daemons_log(daemon: Callable[..., Daemon], tmp_path: pathlib.Path) -> None:
    """contrib/triofwd.logrotate run by logrotate itself, its path and its signal pointed at a test daemon."""
    logrotate = shutil.which("logrotate") or shutil.which("/usr/sbin/logrotate")
    if logrotate is None:
        pytest.skip("logrotate is not installed (apt-get install logrotate)")
    with threaded_echo() as target:
        d = daemon(routes(target))
        roundtrip(d.address("echo")).close()
        wait_lines(d.access_log, 1)
        snippet = (REPO / "contrib" / "triofwd.logrotate").read_text()
        signal_line = "systemctl kill --kill-whom=main --signal=SIGUSR1 triofwd.service"
        assert signal_line in snippet and "/var/log/triofwd/access.log {" in snippet
        config = tmp_path / "logrotate.conf"
        config.write_text(snippet.replace("/var/log/triofwd/access.log", str(d.access_log)).replace(signal_line, f"kill -USR1 {d.pid}"))
        result = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(config)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        d.wait_log("access log reopened")
        roundtrip(d.address("echo")).close()
        wait_lines(d.access_log, 1)  # created by the daemon (nocreate), and written to
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    rotated = d.access_log.with_name(d.access_log.name + ".1")  # delaycompress: not compressed yet
    assert [len(path.read_text().splitlines()) for path in (rotated, d.access_log)] == [1, 1]
