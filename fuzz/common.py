"""Shared by the atheris harnesses: run one of them with libFuzzer's own arguments.

    python fuzz/fuzz_clienthello.py fuzz/corpus/clienthello fuzz/seeds/clienthello -max_total_time=60

`make fuzz` runs all four, unbounded (FUZZ_ARGS=-max_total_time=N bounds them).
A failing input is written to fuzz/crashes/ and the run exits non-zero.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# Run as a script, this folder would be first on sys.path; put the repository root there
# instead so `triofwd` is this checkout's (as tools/ does).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(1, _HERE)

import atheris


def run(test_one_input: Callable[[bytes], None]) -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
