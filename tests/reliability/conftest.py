"""Fixtures of the reliability suite: see harness.py."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability.harness import running


@pytest.fixture
def scenario(daemon: Callable[..., Any], request: pytest.FixtureRequest) -> Callable[..., Any]:
    """`async with scenario(route_file_text, ...) as s:` — the real daemon, checked on the way out."""
    return functools.partial(running, daemon, name=request.node.name)
