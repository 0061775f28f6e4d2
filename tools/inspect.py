#!/usr/bin/env python3
"""The inspector's documented entry point: `python tools/inspect.py ARGS` runs `triofwd inspect ARGS`
(the inspector itself is triofwd/control/inspector.py).

This file shares its name with the standard library's `inspect`, and a script run from
tools/ has this folder first on sys.path: imported by such a script (dataclasses and trio
import `inspect`), this module puts the standard library's in its own place.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    # A fresh interpreter that does not put tools/ on sys.path (-P), with this checkout's
    # triofwd first: the inspector runs as `triofwd inspect` would.
    root = os.path.dirname(_HERE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    os.execve(sys.executable, [sys.executable, "-P", "-m", "triofwd", "inspect", *sys.argv[1:]], env)
else:
    import importlib.machinery
    import importlib.util

    _spec = importlib.machinery.PathFinder.find_spec("inspect", [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE])
    assert _spec is not None and _spec.loader is not None, "the standard library's inspect"
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
