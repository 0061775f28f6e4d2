"""`triofwd schema`: the JSON Schema editors check route files with, checked with `jsonschema`.

It accepts every route file in routes/, refuses a broken one at the path the loader names,
accepts exactly the duration forms the loader accepts, and agrees with the loader's shape
check on generated files.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import tomllib
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triofwd._config import DURATION_PATTERN, RATE_PATTERN, Duration, Rate, Route, Settings, ShapeError, parse_config, parse_duration, parse_rate
from triofwd._errors import ConfigError
from triofwd._schema import route_file_schema, schema_text

REPO = pathlib.Path(__file__).resolve().parent.parent
SCHEMA = route_file_schema()
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)


def load(path: pathlib.Path) -> Any:
    """A route file as the editors' checkers see it: plain data."""
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(path.read_text())
    return json.loads(path.read_text())


def test_triofwd_schema_prints_the_schema() -> None:
    result = subprocess.run([sys.executable, "-m", "triofwd", "schema"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == SCHEMA
    assert result.stdout == schema_text()


@pytest.mark.parametrize("validator", [jsonschema.Draft7Validator, jsonschema.Draft4Validator, jsonschema.Draft202012Validator], ids=lambda v: v.__name__)
def test_the_schema_is_valid_for_the_drafts_editors_speak(validator: Any) -> None:
    """Draft-07 as declared; draft-04 for older Taplo, 2020-12 for newer checkers."""
    validator.check_schema(SCHEMA)


def test_every_key_has_a_description_and_unknown_keys_are_refused() -> None:
    definitions = [SCHEMA, *SCHEMA["$defs"].values()]
    for definition in definitions:
        assert definition["additionalProperties"] is False
        assert definition["description"]
        for name, prop in definition["properties"].items():
            assert prop.get("description"), name
            assert prop.get("examples"), name


ROUTE_FILES = sorted(p for p in (REPO / "routes").iterdir() if p.suffix in (".toml", ".yaml", ".yml", ".json"))


def test_there_are_route_files_to_check() -> None:
    assert len(ROUTE_FILES) >= 5


@pytest.mark.parametrize("path", ROUTE_FILES, ids=lambda p: p.name)
def test_the_schema_accepts_every_route_file_in_routes(path: pathlib.Path) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(load(path))]
    assert not errors


def loader_path(error: str) -> list[str | int]:
    """`$.routes[1].ports[0]` of a loader's error line as a JSON path list: ["routes", 1, "ports", 0]."""
    path = error.rpartition(" - at `")[2].rstrip("`")
    return [int(index) if index else name for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", path)]


BROKEN = [
    # (file, the path of the bad value, the schema keyword that refuses it)
    ('[[routes]]\nname = "a"\nports = [80]\ntargets = ["h:1"]\n[[routes]]\nname = "b"\nports = [70000]\n', ["routes", 1, "ports", 0], "anyOf"),
    ('[[routes]]\nname = "a"\nports = ["80-"]\n', ["routes", 0, "ports", 0], "anyOf"),
    ('[settings]\nconnect_timeout = "5x"\n', ["settings", "connect_timeout"], "pattern"),
    ('[settings]\nconnection_rate_per_ip = "many"\n', ["settings", "connection_rate_per_ip"], "pattern"),
    ('[settings]\nkeepalive = "forever"\n', ["settings", "keepalive"], "enum"),
    ('[settings]\nmax_connections = -1\n', ["settings", "max_connections"], "minimum"),
    ('[settings]\nconect_timeout = "1s"\n', ["settings"], "additionalProperties"),
    ('[[routes]]\nname = "a"\nports = [1]\nblance = "first"\n', ["routes", 0], "additionalProperties"),
    ('[[routes]]\nports = [1]\n', ["routes", 0], "required"),
    ('[[routes]]\nname = "a"\nports = [1]\ninactivity_timeout = "5 minutes"\n', ["routes", 0, "inactivity_timeout"], "anyOf"),
    ('[[routes]]\nname = "a"\nports = [1]\n[routes.health_check]\nrise = 0\n', ["routes", 0, "health_check"], "anyOf"),
    ('[[routes]]\nname = "a"\nports = [1]\n[routes.tls]\nmode = "decrypt"\n', ["routes", 0, "tls"], "anyOf"),
]


@pytest.mark.parametrize(("text", "path", "keyword"), BROKEN, ids=[str(b[1]) for b in BROKEN])
def test_a_broken_file_is_refused_at_the_path_the_loader_names(text: str, path: list[str | int], keyword: str) -> None:
    errors = list(VALIDATOR.iter_errors(tomllib.loads(text)))
    assert [(list(e.absolute_path), e.validator) for e in errors] == [(path, keyword)]
    # The loader (its shape check, or the compile for durations and rates) names the same value.
    try:
        from triofwd._table import compile_table

        compile_table(parse_config(text, ".toml"))
    except ConfigError as exc:
        # the same value, or (for an optional table, which the schema refuses whole) a key inside it
        assert any(loader_path(line)[: len(path)] == path for line in exc.errors), exc.errors
    else:
        pytest.fail("the loader accepted it")


def test_a_nested_error_names_the_bad_key_inside_the_table() -> None:
    """For optional tables the schema's anyOf error holds the precise one in its context."""
    (error,) = VALIDATOR.iter_errors(tomllib.loads('[[routes]]\nname = "a"\nports = [1]\nhealth_check = { rise = 0 }\n'))
    assert ["rise"] in [list(e.absolute_path)[-1:] for e in error.context]


# -- durations and rates: the forms the loader takes ------------------------------------------


def accepts(parser: Any, text: str) -> bool:
    try:
        parser(text)
    except ValueError:
        return False
    return True


def pattern_accepts(pattern: str, text: str) -> bool:
    return jsonschema.Draft7Validator({"type": "string", "pattern": pattern}).is_valid(text)


@pytest.mark.parametrize("text", ["250ms", "30s", "5m", "4h", "7d", "0", "0s", "1.5s", " 30s ", "00s", "10000d"])
def test_duration_forms_the_loader_takes_are_valid(text: str) -> None:
    assert accepts(parse_duration, text) and pattern_accepts(DURATION_PATTERN, text)


@pytest.mark.parametrize("text", ["", "5x", "-1s", "1e3s", "5", "00", ".5s", "5 s", "5S", "1h30m", "s"])
def test_duration_forms_the_loader_refuses_are_invalid(text: str) -> None:
    assert not accepts(parse_duration, text) and not pattern_accepts(DURATION_PATTERN, text)


@given(st.text(alphabet="0123456789.msdh x-\t", max_size=8))
@settings(max_examples=500, deadline=None)
def test_the_duration_pattern_accepts_exactly_what_the_loader_does(text: str) -> None:
    assert pattern_accepts(DURATION_PATTERN, text) == accepts(parse_duration, text)


@given(st.text(alphabet="0123456789/ smhinuteocrd", max_size=12))
@settings(max_examples=500, deadline=None)
def test_the_rate_pattern_accepts_every_rate_the_loader_does(text: str) -> None:
    if accepts(parse_rate, text):
        assert pattern_accepts(RATE_PATTERN, text)


# -- the schema and the loader agree ---------------------------------------------------------

ODD = [-1, 0, 1, 70000, "", "x", "5x", "30s", "0", "300/min", "10.0.0.1:80", "8000-8010", True, [], ["x"], [80], {}, {"rise": 0}, {"mode": "terminate"}]
SETTINGS_KEYS = sorted(Settings.__struct_fields__)
ROUTE_KEYS = [*sorted(set(Route.__struct_fields__) - {"handler"}), "nmae"]  # handler: any object in code, a string in a file


def route_dicts() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(ROUTE_KEYS), st.sampled_from(ODD), max_size=5).map(lambda d: {"name": "a", "ports": [1], **d})


files = st.fixed_dictionaries(
    {},
    optional={
        "settings": st.dictionaries(st.sampled_from(SETTINGS_KEYS), st.sampled_from(ODD), max_size=4),
        "routes": st.lists(route_dicts(), max_size=2),
    },
)


def loader_accepts_shape(doc: dict[str, Any]) -> bool:
    """The loader's shape check, and the duration and rate forms (which it checks when compiling)."""
    try:
        config = parse_config(json.dumps(doc), ".json")
    except ShapeError:
        return False
    tables: list[msgspec.Struct] = [config.settings, *config.routes]
    tables += [t for r in config.routes for t in (r.health_check, r.circuit_breaker) if t is not None]
    for table in tables:
        for field in msgspec.structs.fields(type(table)):
            value = getattr(table, field.name)
            parser = parse_duration if Duration in (field.type, *getattr(field.type, "__args__", ())) else parse_rate if Rate in (field.type, *getattr(field.type, "__args__", ())) else None
            if parser is not None and value is not None and not accepts(parser, value):
                return False
    return True


@given(files)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_schema_and_the_loader_agree_on_the_shape_of_a_file(doc: dict[str, Any]) -> None:
    assert VALIDATOR.is_valid(doc) == loader_accepts_shape(doc), [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(doc)]
