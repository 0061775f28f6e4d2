"""atheris: the route-file loader. Any bytes as TOML, YAML or JSON (the first byte picks):
a Config that compiles, or ConfigError; nothing else may escape."""

from __future__ import annotations

import atheris
import common

with atheris.instrument_imports():
    from triofwd._config import parse_config
    from triofwd._errors import ConfigError
    from triofwd._table import compile_table

SUFFIXES = (".toml", ".yaml", ".json")
# A handler is imported by name: the fuzzer may spell only these.
SAFE_HANDLERS = {"", "json:loads", "json:nope", "os.path:join", "triofwd:serve", "no_such_module_xyz:f"}


def test_one_input(data: bytes) -> None:
    if not data:
        return
    suffix = SUFFIXES[data[0] % len(SUFFIXES)]
    try:
        config = parse_config(data[1:], suffix)
        for route in config.routes:
            if route.handler not in SAFE_HANDLERS:
                route.handler = "no_such_module_xyz:f"
        compile_table(config)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(line, str) for line in exc.errors)


if __name__ == "__main__":
    common.run(test_one_input)
