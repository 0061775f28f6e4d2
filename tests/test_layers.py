"""Imports go down the layers, and no module imports itself back through others.

    0  vocabulary, pure codecs and the route-file schema
    1  the route table and the limits
    2  one connection and its data path
    3  the forwarder: listeners, kernel rules, serve()
    4  the control socket, the metrics endpoint, the command line

Every import of the package's own modules counts, those under `if TYPE_CHECKING:` too: a
type-only import is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "triofwd"

LAYERS: dict[str, int] = {
    **dict.fromkeys(
        ["_errors", "_reasons", "_endings", "_addresses", "_log", "_config", "_schema", "_policy", "_proxy_protocol", "_clienthello", "_socks5", "_httpconnect", "_destinations", "_credentials", "_nft", "_health", "_metrics", "_rawsock", "_systemd", "testing"], 0
    ),
    **dict.fromkeys(["_limits", "_balance", "_tls", "_table"], 1),
    **dict.fromkeys(
        ["_record", "_splice", "_firstbytes", "_connect", "_dial", "_targets", "_idle", "_datagrams", "_engine", "_pump", "_accesslog", "_stats", "_status", "_context", "_dynamic", "_actions", "_connection"], 2
    ),
    **dict.fromkeys(["_listeners", "_offload", "_server", "_reuseport"], 3),
    **dict.fromkeys(
        ["control", "control.messages", "control.socketfile", "control.server", "control.client", "control.inspector", "control.workers", "_metrics_http", "_worker", "_upgrade", "_supervisor", "_cli", "__main__", "__init__"], 4
    ),
}


def module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") or "__init__"


def own_imports(path: pathlib.Path) -> set[str]:
    """The package's modules that `path` imports (relative or absolute, at any depth in the file)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "triofwd":
                target = node.module.split(".")[1:]
            else:
                continue
            name = ".".join(target)
            if not node.module and node.level:  # from . import x: x is a module of the package
                found.update(".".join([*base, alias.name]) for alias in node.names)
            elif name:
                found.add(name)
        elif isinstance(node, ast.Import):
            found.update(".".join(alias.name.split(".")[1:]) for alias in node.names if alias.name.startswith("triofwd."))
    return {f if f in LAYERS else f.rsplit(".", 1)[0] for f in found} - {module_name(path)}


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    assert set(MODULES) == set(LAYERS), f"unplaced: {sorted(set(MODULES) - set(LAYERS))}, gone: {sorted(set(LAYERS) - set(MODULES))}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name: str) -> None:
    upward = {other: LAYERS[other] for other in own_imports(MODULES[name]) if LAYERS[other] > LAYERS[name]}
    assert not upward, f"{name} (layer {LAYERS[name]}) imports from above: {upward}"


def test_no_import_cycles() -> None:
    graph = {name: own_imports(path) for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join([*trail[trail.index(name) :], name])
        state[name] = "open"
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
