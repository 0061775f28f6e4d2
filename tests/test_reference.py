"""The documentation in docs/ and the README agree with the code they describe.

The route-file reference is rendered from the structs and the table of meanings in
triofwd/_schema.py, and checked here key by key; the control protocol and metrics pages are
checked against the commands, rows and metric families the code has; every example of the
README's and the guide's `check` output is what `check` prints; links stay inside the
repository.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib
from typing import Any

import jsonschema
import msgspec
import pytest

from triofwd._config import Config, Route, Settings
from triofwd._metrics import render_metrics
from triofwd._reasons import Reason
from triofwd._record import Connection
from triofwd._schema import KEYS, key_docs, reference_markdown, route_file_schema, structs
from triofwd.control.messages import COMMANDS

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
REGENERATE = "python -m triofwd._schema > docs/reference.md"


def fields(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.name: f for f in msgspec.structs.fields(struct)}


# -- the route-file reference ---------------------------------------------------------------


def test_the_route_file_is_made_of_these_tables() -> None:
    """Guard: the walk over the annotations finds the nested tables (so a new one is found too)."""
    names = {s.__name__ for s in structs()}
    assert {"Config", "Settings", "Route", "TLS", "HealthCheck", "CircuitBreaker"} <= names


@pytest.mark.parametrize("struct", structs(), ids=lambda s: s.__name__)
def test_every_key_is_documented(struct: type[msgspec.Struct]) -> None:
    missing = set(fields(struct)) - set(key_docs(struct))
    assert not missing, f"{struct.__name__}: keys without a meaning in triofwd/_schema.py KEYS: {sorted(missing)}"


@pytest.mark.parametrize("struct", list(KEYS), ids=lambda s: s.__name__)
def test_every_documented_key_exists(struct: type[msgspec.Struct]) -> None:
    assert struct in structs(), f"{struct.__name__} is documented but no longer part of a route file"
    gone = set(KEYS[struct]) - set(fields(struct))
    assert not gone, f"{struct.__name__}: documented keys the route file no longer has: {sorted(gone)}"


def test_reference_page_is_rendered_from_the_code() -> None:
    page = (DOCS / "reference.md").read_text()
    assert page == reference_markdown(), f"docs/reference.md is out of date: run `{REGENERATE}`"


def test_reference_page_has_a_row_for_every_key() -> None:
    """The rendering itself: each table of the page holds one row per key of its struct."""
    page = reference_markdown()
    sections = re.split(r"^## ", page, flags=re.M)[1:]
    assert len(sections) == len(structs())
    for struct, section in zip(structs(), sections, strict=True):
        rows = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
        own = set(fields(struct)) - (set(Settings.__struct_fields__) if struct is Route else set())
        assert rows == own, struct.__name__
        if struct is Route:  # the [settings] keys a route may override are listed after the table
            assert set(re.findall(r"\[`(\w+)`\]\(#settings\)", section)) == set(fields(Route)) & set(Settings.__struct_fields__)


def key_examples() -> list[tuple[str, type[msgspec.Struct], str]]:
    return [(f"{s.__name__}.{name}", s, name) for s in structs() for name in key_docs(s)]


@pytest.mark.parametrize(("where", "struct", "name"), key_examples(), ids=lambda x: x if isinstance(x, str) else "")
def test_each_example_is_a_value_the_loader_and_the_schema_accept(where: str, struct: type[msgspec.Struct], name: str) -> None:
    value = tomllib.loads(f"v = {key_docs(struct)[name].example}")["v"]
    msgspec.convert(value, fields(struct)[name].type)  # the loader's shape check
    schema = route_file_schema()
    definition = schema if struct is Config else schema["$defs"][struct.__name__]
    prop = definition["properties"][name]
    jsonschema.Draft7Validator({**prop, "$defs": schema["$defs"]}).validate(value)
    assert prop["description"] and prop["examples"] == [value]


def test_a_file_of_every_example_compiles() -> None:
    """The examples are sensible together: [settings] made of every settings example loads."""
    from triofwd._table import compile_table

    settings = {name: tomllib.loads(f"v = {doc.example}")["v"] for name, doc in key_docs(Settings).items()}
    config = msgspec.convert({"settings": settings, "routes": [{"name": "a", "ports": [0], "targets": ["127.0.0.1:1"]}]}, Config)
    compile_table(config)


# -- the control protocol and the metrics --------------------------------------------------


def table_rows(page: str, heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first table after `heading`."""
    section = page.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if not set("".join(cells)) <= set("- "):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header


def test_control_page_lists_every_command_and_its_arguments() -> None:
    rows = table_rows((DOCS / "control.md").read_text(), "## Commands")
    documented = {re.fullmatch(r"`(\w+)`", row[0]).group(1): row[1] for row in rows}  # type: ignore[union-attr]
    assert set(documented) == set(COMMANDS)
    for cmd, args in COMMANDS.items():
        names = {f.name for f in msgspec.structs.fields(args)}
        if names:
            assert all(f"`{n}`" in documented[cmd] for n in names), (cmd, names)
        else:
            assert documented[cmd] == "none", cmd


def test_control_page_lists_every_field_of_a_connection_row() -> None:
    rows = table_rows((DOCS / "control.md").read_text(), "A connection row:")
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row[0])}
    row = Connection(id=1, client_ip="127.0.0.1", client_port=1, listener=("127.0.0.1", 1, ""), started=0.0, opened=0.0).describe(now=0.0)
    assert documented == set(row)


def full_snapshot() -> dict[str, Any]:
    """A stats snapshot with something in every family: an offload route and a target."""
    buckets = {"buckets": [(0.01, 1), (float("inf"), 1)], "count": 1, "sum": 0.002}
    route = {"active": 1, "total": 2, "bytes_in": 3, "bytes_out": 4, "terminations": {"normal": 1}, "connect_time": buckets}
    target = {"target": "127.0.0.1:1", "up": True, "circuit": "closed", "failures_total": 0, "circuit_opens_total": 0, "checks_passed": 1, "checks_failed": 0, "active": 1, "warm": 0}
    return {
        "accept_errors": 0,
        "routes": {
            "web": route,
            "db": {**route, "offload": {"packets": 5, "bytes": 6}},
            "dns": {**route, "udp": {"datagrams_in": 7, "datagrams_out": 7, "drops": {"capacity": 1}}},
        },
        "targets": {"web": [target]},
    }


def test_metrics_page_lists_every_family_with_its_labels() -> None:
    text = render_metrics(full_snapshot(), ["web", "db"])
    exported: dict[str, set[str]] = {name: set() for name in re.findall(r"^# TYPE (\w+) ", text, flags=re.M)}
    for name, labels in re.findall(r"^(\w+)\{([^}]*)\}", text, flags=re.M):
        family = next(f for f in exported if name in (f, f"{f}_bucket", f"{f}_sum", f"{f}_count"))
        exported[family] |= set(re.findall(r'(\w+)="', labels)) - {"le"}
    page = (DOCS / "metrics.md").read_text()
    documented = {}
    for line in page.splitlines():
        match = re.match(r"\| `(triofwd_\w+)` \| (\w+) \|([^|]*)\|", line)
        if match:
            documented[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(3)))
    assert documented == exported


def test_metrics_page_lists_every_reason() -> None:
    section = (DOCS / "metrics.md").read_text().split("## Reasons", 1)[1].split("##", 1)[0]
    assert set(re.findall(r"`(\w+)`", section)) - {"reason"} == {r.value for r in Reason}


# -- the README and the guide ---------------------------------------------------------------


def check_examples(page: str) -> list[tuple[str, list[str]]]:
    """(route file, lines `check` prints) of each TOML block followed by a `$ triofwd check routes.toml` block."""
    found = re.findall(r"```toml\n((?:(?!```).)*)```\s*```\n\$ triofwd check routes\.toml\n((?:(?!```).)*)```", page, flags=re.S)
    return [(text, lines.splitlines()) for text, lines in found]


@pytest.mark.parametrize("page", ["README.md", "docs/routes.md"])
def test_check_examples_show_what_check_prints(page: str, tmp_path: pathlib.Path) -> None:
    examples = check_examples((REPO / page).read_text())
    assert examples, f"{page}: no example of `triofwd check` found"
    for text, expected in examples:
        (tmp_path / "routes.toml").write_text(text)
        result = subprocess.run([sys.executable, "-m", "triofwd", "check", "routes.toml"], capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.splitlines() == expected
        assert len(expected) >= 2  # every error in one run, not the first alone


def markdown_pages() -> list[pathlib.Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md")), *sorted((REPO / "contrib").glob("*.md"))]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_inside_the_repository(page: pathlib.Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links, not code
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(REPO), f"{page.name}: {target} leads outside the repository"
        assert path.exists(), f"{page.name}: {target} does not exist"
    assert not re.search(r"/work/|\.\./shared|CONTRACT\.md", text), f"{page.name} names a path outside the repository"
