"""Route files: decoding (TOML/YAML/JSON), error lines with paths, value parsers, `triofwd check`."""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import subprocess
import textwrap
import tomllib

import hypothesis
import msgspec
import pytest
import trio
from hypothesis import strategies as st

from tests.conftest import run_triofwd
from tests.reliability import test_fuzz as fuzz
from triofwd import _cli
from triofwd._config import (
    ROUTE_OVERRIDES,
    TLS,
    CircuitBreaker,
    Config,
    HealthCheck,
    Route,
    Settings,
    ShapeError,
    parse_cidr,
    parse_config,
    parse_duration,
    parse_ports,
    parse_rate,
    parse_target,
)
from triofwd._errors import ConfigError
from triofwd._health import CheckPolicy, CircuitPolicy
from triofwd._table import compile_table, load_config


def toml(text: str) -> Config:
    return parse_config(textwrap.dedent(text), ".toml")


def errors_of(text: str, suffix: str = ".toml") -> list[str]:
    """The error lines of a route file, from decoding or (if it decodes) from compiling."""
    with pytest.raises(ConfigError) as info:
        compile_table(parse_config(textwrap.dedent(text), suffix))
    return info.value.errors


def compile_errors(config: Config) -> list[str]:
    with pytest.raises(ConfigError) as info:
        compile_table(config)
    return info.value.errors


def one_route(**kw: object) -> str:
    """A TOML file with one good forward route, plus route keys `kw` (TOML-literal values)."""
    lines = ['name = "a"', "ports = [8000]", 'targets = ["127.0.0.1:9000"]']
    lines += [f"{k} = {v}" for k, v in kw.items()]
    return "[[routes]]\n" + "\n".join(lines) + "\n"


# -- the three formats ----------------------------------------------------------------

SMALL_TOML = """
[settings]
connect_timeout = "5s"
max_connections_per_ip = 20
connection_rate_per_ip = "300/min"

[[routes]]
name = "ssh"
ports = [2222, "8000-8010"]
client_ips = ["10.0.0.0/8"]
targets = ["10.0.0.5:22", "[::1]:22"]
balance = "least-connections"
inactivity_timeout = "5m"

[[routes]]
name = "web"
ports = [0]
bind = "127.0.0.1"
priority = 5
domains = ["*.example.com"]
action = "reject"
"""

SMALL_YAML = """
settings:
  connect_timeout: 5s
  max_connections_per_ip: 20
  connection_rate_per_ip: 300/min
routes:
  - name: ssh
    ports: [2222, "8000-8010"]
    client_ips: ["10.0.0.0/8"]
    targets: ["10.0.0.5:22", "[::1]:22"]
    balance: least-connections
    inactivity_timeout: 5m
  - name: web
    ports: [0]
    bind: 127.0.0.1
    priority: 5
    domains: ["*.example.com"]
    action: reject
"""

SMALL_JSON = json.dumps(tomllib.loads(SMALL_TOML))


def test_toml_yaml_json_decode_to_equal_configs() -> None:
    from_toml = parse_config(SMALL_TOML, ".toml")
    assert parse_config(SMALL_YAML, ".yaml") == from_toml
    assert parse_config(SMALL_YAML, ".yml") == from_toml
    assert parse_config(SMALL_JSON, ".json") == from_toml
    assert parse_config(SMALL_JSON.encode(), ".JSON") == from_toml  # bytes, suffix case-insensitive
    # And the values landed where they belong, not just equally wrong everywhere.
    assert from_toml.settings.connect_timeout == "5s"
    assert from_toml.settings.keepalive == "standard"  # default
    assert [r.name for r in from_toml.routes] == ["ssh", "web"]
    assert from_toml.routes[0].ports == [2222, "8000-8010"]
    assert from_toml.routes[0].inactivity_timeout == "5m"
    assert from_toml.routes[0].connect_timeout is None  # not overridden: inherits
    assert from_toml.routes[1].action == "reject"
    compile_table(from_toml)


def test_empty_file_is_a_config_with_defaults() -> None:
    config = parse_config("", ".toml")
    assert config == Config()
    assert config.settings == Settings()
    assert config.routes == []


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_load_config_reads_each_format(tmp_path: pathlib.Path, suffix: str) -> None:
    text = {".toml": SMALL_TOML, ".yaml": SMALL_YAML, ".json": SMALL_JSON}[suffix]
    path = tmp_path / f"routes{suffix}"
    path.write_text(text)
    assert load_config(path) == parse_config(SMALL_TOML, ".toml")
    assert load_config(str(path)) == parse_config(SMALL_TOML, ".toml")


# -- shape errors (msgspec), exact lines ----------------------------------------------


def test_contract_example_error_port_out_of_range() -> None:
    text = one_route() + '[[routes]]\nname = "b"\nports = [70000]\ntargets = ["127.0.0.1:1"]\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, ".toml", "routes.toml")
    assert info.value.errors == ["Expected `int` <= 65535 - at `$.routes[1].ports[0]`"]
    assert info.value.source == "routes.toml"
    assert str(info.value).startswith("routes.toml: ")


def test_contract_example_error_same_in_yaml_and_json() -> None:
    doc = {"routes": [{"name": "a", "ports": [1], "targets": ["127.0.0.1:1"]}, {"name": "b", "ports": [70000]}]}
    expected = ["Expected `int` <= 65535 - at `$.routes[1].ports[0]`"]
    for text, suffix in [(json.dumps(doc), ".json"), (msgspec.yaml.encode(doc), ".yaml")]:
        with pytest.raises(ConfigError) as info:
            parse_config(text, suffix)
        assert info.value.errors == expected


def test_negative_port_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(one_route().replace("[8000]", "[-1]"), ".toml")
    assert info.value.errors == ["Expected `int` >= 0 - at `$.routes[0].ports[0]`"]


def test_unknown_key_in_route() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(one_route(bogus=1), ".toml")
    assert info.value.errors == ["Object contains unknown field `bogus` - at `$.routes[0]`"]


def test_unknown_key_in_settings() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[settings]\nbogus = "x"\n', ".toml")
    assert info.value.errors == ["Object contains unknown field `bogus` - at `$.settings`"]


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[setings]\nconnect_timeout = "1s"\n', ".toml")
    # msgspec names no path at the root; we add `$` so that every error line has one.
    assert info.value.errors == ["Object contains unknown field `setings` (did you mean `settings`?) - at `$`"]


def test_unknown_key_in_tls_and_health_check() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(one_route() + '[routes.tls]\nmode = "terminate"\nkeyfile = "x"\n', ".toml")
    assert info.value.errors == ["Object contains unknown field `keyfile` (did you mean `key`?) - at `$.routes[0].tls`"]
    with pytest.raises(ConfigError) as info:
        parse_config(one_route(health_check='{ interval = "5s", retries = 3 }'), ".toml")
    assert info.value.errors == ["Object contains unknown field `retries` - at `$.routes[0].health_check`"]


def test_bad_enum_action() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(one_route(action='"teleport"'), ".toml")
    assert info.value.errors == ["Invalid enum value 'teleport' - at `$.routes[0].action`"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("balance", '"fastest"'), ("proxy_protocol", '"v3"'), ("keepalive", '"forever"'), ("offload_fallback", '"drop"')],
)
def test_bad_enum_other_keys(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(one_route(**{key: value}), ".toml")
    assert info.value.errors == [f"Invalid enum value {value.strip(chr(34))!r} - at `$.routes[0].{key}`"]


def test_bad_keepalive_in_settings() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[settings]\nkeepalive = "forever"\n', ".toml")
    assert info.value.errors == ["Invalid enum value 'forever' - at `$.settings.keepalive`"]


def test_missing_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[[routes]]\nports = [1]\ntargets = ["127.0.0.1:1"]\n', ".toml")
    assert info.value.errors == ["Object missing required field `name` - at `$.routes[0]`"]


def test_missing_ports() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[[routes]]\nname = "a"\ntargets = ["127.0.0.1:1"]\n', ".toml")
    assert info.value.errors == ["Object missing required field `ports` - at `$.routes[0]`"]


def test_duration_given_as_number_is_a_type_error() -> None:
    # Durations are strings; an unquoted 0 names the path instead of being guessed at.
    with pytest.raises(ConfigError) as info:
        parse_config("[settings]\nhalf_close_timeout = 0\n", ".toml")
    assert info.value.errors == ["Expected `str`, got `int` - at `$.settings.half_close_timeout`"]


def test_keepalive_multiplier_must_be_positive() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[settings]\nkeepalive_multiplier = 0\n", ".toml")
    assert info.value.errors == ["Expected `int` >= 1 - at `$.settings.keepalive_multiplier`"]


# -- syntax errors, files, suffixes ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "suffix", "prefix"),
    [
        ('[[routes]\nname = "a"\n', ".toml", "invalid TOML"),
        ("routes: [\n", ".yaml", "invalid YAML"),
        ("routes: [\n", ".yml", "invalid YML"),
        ('{"routes": [', ".json", "invalid JSON"),
        (b"\xff\xfe{", ".json", "invalid JSON"),
    ],
)
def test_syntax_error(text: str | bytes, suffix: str, prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, suffix)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(prefix + ": ")


def test_toml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[settings]\nconnect_timeout = "1s"\nmax_connections = \n', ".toml")
    (line,) = info.value.errors
    assert line.startswith("invalid TOML")
    assert "line 3" in line


def test_load_config_missing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.errors
    assert line.startswith("cannot read route file")
    assert "No such file" in line
    assert info.value.source == str(path)


def test_load_config_directory_is_unreadable(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "routes.toml"
    folder.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(folder)
    assert info.value.errors[0].startswith("cannot read route file")


def test_unknown_suffix(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "routes.ini"
    path.write_text(one_route())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["unknown route file type '.ini': expected .toml, .yaml, .yml or .json"]
    assert info.value.source == str(path)
    with pytest.raises(ConfigError):
        parse_config(one_route(), "")


def test_load_config_also_runs_semantic_checks(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(one_route(connect_timeout='"5x"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].endswith("- at `$.routes[0].connect_timeout`")


# -- semantic errors (compile_table), lines with paths --------------------------------


@pytest.mark.parametrize("bad", ["5x", "10", "-1s", "", "1.s", "s", "10 sec"])
def test_bad_duration_in_settings(bad: str) -> None:
    errors = errors_of(f'[settings]\nconnect_timeout = "{bad}"\n' + one_route())
    assert len(errors) == 1
    assert "invalid duration" in errors[0]
    assert repr(bad) in errors[0]
    assert errors[0].endswith("- at `$.settings.connect_timeout`")


@pytest.mark.parametrize(
    "key", ["initial_data_timeout", "inactivity_timeout", "half_close_timeout", "max_lifetime", "tcp_keepalive"]
)
def test_bad_duration_route_override(key: str) -> None:
    errors = errors_of(one_route() + '[[routes]]\nname = "b"\nports = [1]\ntargets = ["127.0.0.1:1"]\n' + f'{key} = "5x"\n')
    assert len(errors) == 1
    assert "invalid duration" in errors[0]
    assert errors[0].endswith(f"- at `$.routes[1].{key}`")


def test_bad_shutdown_grace() -> None:
    errors = errors_of('[settings]\nshutdown_grace = "soon"\n')
    assert len(errors) == 1
    assert "invalid duration" in errors[0]
    assert errors[0].endswith("- at `$.settings.shutdown_grace`")


@pytest.mark.parametrize("where", ["settings", "route"])
def test_bad_rate(where: str) -> None:
    if where == "settings":
        text, path = '[settings]\nconnection_rate_per_ip = "300/week"\n' + one_route(), "$.settings"
    else:
        text, path = one_route(connection_rate_per_ip='"lots"'), "$.routes[0]"
    errors = errors_of(text)
    assert len(errors) == 1
    assert "invalid rate" in errors[0]
    assert errors[0].endswith(f"- at `{path}.connection_rate_per_ip`")


def test_bad_cidr() -> None:
    errors = errors_of(one_route(client_ips='["10.0.0.0/33", "10.0.0.0/8"]'))
    assert errors == ["invalid CIDR '10.0.0.0/33': expected an address or address/prefix - at `$.routes[0].client_ips[0]`"]


def test_bad_block_cidr() -> None:
    errors = errors_of(one_route(block_ips='["example.com"]'))
    assert len(errors) == 1
    assert errors[0].startswith("invalid CIDR 'example.com'")
    assert errors[0].endswith("- at `$.routes[0].block_ips[0]`")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("client_ips", '["10.0.0.0/8", "10.0.0.0/33"]'),
        ("block_ips", '["10.0.0.0/8", "nope"]'),
        ("targets", '["127.0.0.1:1", "nope"]'),
    ],
)
def test_bad_list_entry_names_its_own_index(key: str, value: str) -> None:
    # Regression: the path once used a stale index (the last one of the ports loop, 0 here).
    text = '[[routes]]\nname = "a"\nports = [8000]\naction = "reject"\n' + f"{key} = {value}\n"
    errors = errors_of(text)
    assert len(errors) == 1
    assert errors[0].endswith(f"- at `$.routes[0].{key}[1]`")


def test_no_ports_with_targets_is_a_config_error() -> None:
    # Regression: with no ports the stale index was unbound, a NameError instead of a ConfigError.
    errors = errors_of('[[routes]]\nname = "a"\nports = []\ntargets = ["127.0.0.1:1"]\n')
    assert errors == ["a route needs at least one port - at `$.routes[0].ports`"]


@pytest.mark.parametrize("bad", ["10.0.0.5", "10.0.0.5:0", "10.0.0.5:65536", "::1:22", "[::1]", "[nope]:22", "bad host:22", ":22", "db:port"])
def test_bad_target(bad: str) -> None:
    errors = errors_of(one_route().replace('"127.0.0.1:9000"', f'"{bad}", "127.0.0.1:9000"'))
    assert len(errors) == 1
    assert errors[0].startswith(f"invalid target {bad!r}")
    assert errors[0].endswith("- at `$.routes[0].targets[0]`")


def test_duplicate_route_names() -> None:
    errors = errors_of(one_route() + one_route())
    assert errors == ["duplicate route name 'a' (first at $.routes[0]) - at `$.routes[1].name`"]


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x" * 64, "ünïcode"])
def test_invalid_route_name(bad: str) -> None:
    errors = errors_of(one_route().replace('name = "a"', f'name = "{bad}"'))
    assert len(errors) == 1
    assert errors[0].startswith("invalid route name")
    assert errors[0].endswith("- at `$.routes[0].name`")


def test_port_range_accepted() -> None:
    table = compile_table(toml(one_route().replace("[8000]", '[2222, "8000-8010"]')))
    assert table.routes[0].ports == (2222, *range(8000, 8011))


@pytest.mark.parametrize("bad", ["9000-8000", "0-10", "60000-70000"])
def test_port_range_refused(bad: str) -> None:
    errors = errors_of(one_route().replace("[8000]", f'[2222, "{bad}"]'))
    assert errors == [f"invalid port range {bad!r}: expected LOW-HIGH within 1-65535 - at `$.routes[0].ports[1]`"]


@pytest.mark.parametrize("bad", ["8000", "8000-", "a-b", "8000:8010"])
def test_port_string_that_is_not_a_range_is_a_shape_error(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(one_route().replace("[8000]", f'["{bad}"]'), ".toml")
    (line,) = info.value.errors
    assert line.endswith("- at `$.routes[0].ports[0]`")


def test_port_zero_must_be_alone() -> None:
    errors = errors_of(one_route().replace("[8000]", "[8000, 0]"))
    assert errors == ["port 0 (an ephemeral port) must be the route's only port - at `$.routes[0].ports[1]`"]


def test_no_ports() -> None:
    text = '[[routes]]\nname = "a"\nports = []\naction = "reject"\n'
    assert errors_of(text) == ["a route needs at least one port - at `$.routes[0].ports`"]


def test_forward_needs_targets() -> None:
    errors = errors_of('[[routes]]\nname = "a"\nports = [1]\n')
    assert errors == ['action = "forward" needs at least one target - at `$.routes[0].targets`']
    compile_table(toml('[[routes]]\nname = "a"\nports = [1]\naction = "reject"\n'))  # reject needs none


@pytest.mark.parametrize("bad", ["localhost", "0.0.0.0:80", "", "300.0.0.1"])
def test_bad_bind(bad: str) -> None:
    errors = errors_of(one_route(bind=f'"{bad}"'))
    assert len(errors) == 1
    assert errors[0].startswith("invalid bind address")
    assert errors[0].endswith("- at `$.routes[0].bind`")


@pytest.mark.parametrize("bad", ["*", "a.*.example.com", "**.example.com", "exa mple.com", "*example.com", ""])
def test_bad_domain_pattern(bad: str) -> None:
    errors = errors_of(one_route(domains=f'["example.com", "{bad}"]'))
    assert len(errors) == 1
    assert errors[0].startswith("invalid domain pattern")
    assert errors[0].endswith("- at `$.routes[0].domains[1]`")


def test_every_error_is_reported_at_once() -> None:
    errors = errors_of(
        '[settings]\nconnect_timeout = "5x"\n'
        + one_route(client_ips='["nope"]')
        + '[[routes]]\nname = "a"\nports = ["9-1"]\ntargets = ["x"]\n'
    )
    paths = [line.rsplit(" - at ", 1)[1] for line in errors]
    assert paths == [
        "`$.settings.connect_timeout`",
        "`$.routes[0].client_ips[0]`",
        "`$.routes[1].name`",
        "`$.routes[1].ports[0]`",
        "`$.routes[1].targets[0]`",
    ]


# -- every contract key: parsed; later features refused by name -----------------------

# The example of docs/routes.md, with the per-route overrides spelled out.
CONTRACT_EXAMPLE = """
[settings]
connect_timeout        = "10s"
initial_data_timeout   = "30s"
inactivity_timeout     = "1h"
half_close_timeout     = "0"
max_lifetime           = "24h"
keepalive              = "standard"
keepalive_multiplier   = 6
tcp_keepalive          = "60s"
max_connections        = 10000
max_connections_per_ip = 0
connection_rate_per_ip = "0"
shutdown_grace         = "30s"
trusted_proxies        = []
workers                = 1

[[routes]]
name       = "ssh"
ports      = [2222, "8000-8010"]
bind       = "0.0.0.0"
priority   = 0
domains    = []
client_ips = []
block_ips  = []
protocol   = "tcp"
action     = "forward"
targets    = ["10.0.0.5:22", "[::1]:22", "db.internal:5432"]
balance    = "round-robin"
connect_retries = 2
proxy_protocol  = ""
accept_proxy_protocol = false
bridge_to  = "internal"
handler    = ""
offload_fallback   = ""
preserve_source_ip = false
warm       = 0
health_check = { interval = "5s", timeout = "1s", rise = 2, fall = 3, send = "PING", expect = "PONG" }
circuit_breaker = { failures = 5, backoff = "1s", max_backoff = "5m" }
destinations = []
users      = []
responses  = 0
connect_timeout        = "3s"
initial_data_timeout   = "5s"
inactivity_timeout     = "2h"
half_close_timeout     = "30s"
max_lifetime           = "7d"
keepalive              = "extended"
keepalive_multiplier   = 4
tcp_keepalive          = "30s"
max_connections        = 100
max_connections_per_ip = 5
connection_rate_per_ip = "300/min"

[routes.tls]
mode        = "passthrough"
cert        = "certs/example.pem"
key         = "certs/example.key"
min_version = "1.2"
target_ca   = ""
target_sni  = ""
"""


def test_contract_example_uses_every_key() -> None:
    """Guard for the next test: the example really names every field of every struct."""
    doc = tomllib.loads(CONTRACT_EXAMPLE)
    names = lambda cls: {f.encode_name for f in msgspec.structs.fields(cls)}  # noqa: E731
    assert set(doc) == names(Config)
    assert set(doc["settings"]) == names(Settings)
    assert set(doc["routes"][0]) == names(Route)
    assert set(doc["routes"][0]["tls"]) == names(TLS)
    assert set(doc["routes"][0]["health_check"]) == names(HealthCheck)
    assert set(doc["routes"][0]["circuit_breaker"]) == names(CircuitBreaker)
    assert set(ROUTE_OVERRIDES) <= names(Settings) & names(Route)


def test_contract_example_parses_and_compiles() -> None:
    config = parse_config(CONTRACT_EXAMPLE, ".toml")
    route = config.routes[0]
    assert route.ports == [2222, "8000-8010"]
    assert route.tls == TLS(cert="certs/example.pem", key="certs/example.key")
    assert route.health_check == HealthCheck(send="PING", expect="PONG")
    assert route.circuit_breaker == CircuitBreaker()
    assert route.keepalive == "extended"
    compiled = compile_table(config).routes[0]  # tls passthrough needs no certificate
    assert compiled.health == CheckPolicy(interval=5.0, timeout=1.0, rise=2, fall=3, send=b"PING", expect=b"PONG")
    assert compiled.circuit == CircuitPolicy(failures=5, backoff=1.0, max_backoff=300.0)
    assert compiled.warm == 0


def test_health_check_send_and_expect_take_toml_escapes() -> None:
    route = compile_table(parse_config(one_route(warm="2", health_check='{ send = "PING\\r\\n", expect = "+OK" }'), ".toml")).routes[0]
    assert route.health == CheckPolicy(interval=5.0, timeout=1.0, rise=2, fall=3, send=b"PING\r\n", expect=b"+OK")
    assert route.warm == 2 and route.circuit is None


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"health_check": '{ interval = "0" }'}, "invalid duration '0': this one cannot be off, give a positive duration such as \"1s\" - at `$.routes[0].health_check.interval`"),
        ({"health_check": '{ timeout = "soon" }'}, "- at `$.routes[0].health_check.timeout`"),
        ({"health_check": "{ rise = 0 }"}, "Expected `int` >= 1 - at `$.routes[0].health_check.rise`"),
        ({"circuit_breaker": '{ backoff = "10s", max_backoff = "1s" }'}, "max_backoff '1s' is shorter than backoff '10s' - at `$.routes[0].circuit_breaker.max_backoff`"),
        ({"circuit_breaker": "{ failures = 0 }"}, "Expected `int` >= 1 - at `$.routes[0].circuit_breaker.failures`"),
        ({"circuit_breaker": "{ tries = 3 }"}, "Object contains unknown field `tries` - at `$.routes[0].circuit_breaker`"),
        ({"warm": "-1"}, "Expected `int` >= 0 - at `$.routes[0].warm`"),
        ({"action": '"reject"', "warm": "2"}, 'warm is only used with action = "forward" or "bridge" (reject: it has no targets) - at `$.routes[0].warm`'),
        ({"action": '"offload"', "health_check": "{}"}, 'health_check is only used with action = "forward" or "bridge" (offload: the kernel forwards it) - at `$.routes[0].health_check`'),
    ],
)
def test_target_health_keys_are_checked_at_their_path(keys: dict[str, str], expected: str) -> None:
    errors = errors_of(one_route(**keys))
    assert any(line.endswith(expected) for line in errors), errors


def test_trusted_proxies_are_cidrs() -> None:
    table = compile_table(parse_config('[settings]\ntrusted_proxies = ["10.0.0.0/8"]\n' + one_route(), ".toml"))
    assert table.is_trusted_proxy("10.1.2.3") and not table.is_trusted_proxy("192.0.2.1")
    # A bad CIDR in it is reported at its own index.
    errors = errors_of('[settings]\ntrusted_proxies = ["10.0.0.0/8", "bad"]\n')
    assert any(line.endswith("- at `$.settings.trusted_proxies[1]`") for line in errors)


def test_accept_proxy_protocol_needs_trusted_proxies() -> None:
    errors = errors_of(one_route(accept_proxy_protocol="true"))
    assert errors == ["accept_proxy_protocol needs [settings] trusted_proxies: the addresses allowed to send the header - at `$.routes[0].accept_proxy_protocol`"]


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ('action = "bridge"\n', 'action = "bridge" to the built-in terminator needs [routes.tls] with mode, cert and key - at `$.routes[0].tls`'),
        ('action = "bridge"\n[routes.tls]\nmode = "passthrough"\n', 'the built-in terminator needs tls.mode = "terminate" or "reencrypt" - at `$.routes[0].tls.mode`'),
        ('[routes.tls]\nmode = "terminate"\ncert = "c"\nkey = "k"\n', 'tls.mode = "terminate" needs action = "bridge" with bridge_to = "internal" - at `$.routes[0].tls.mode`'),
        ('action = "bridge"\n[routes.tls]\nmode = "terminate"\n', "tls.cert is needed to terminate TLS - at `$.routes[0].tls.cert`"),
        ('bridge_to = "127.0.0.1:8443"\n', 'bridge_to is only used with action = "bridge" - at `$.routes[0].bridge_to`'),
        ('action = "bridge"\nbridge_to = "nowhere"\n', "invalid target 'nowhere': expected host:port - at `$.routes[0].bridge_to`"),
    ],
)
def test_tls_and_bridge_combinations(route: str, expected: str) -> None:
    text = '[[routes]]\nname = "a"\nports = [1]\ntargets = ["127.0.0.1:2"]\n' + route
    assert expected in errors_of(text)


def test_a_missing_certificate_is_named_at_its_path(tmp_path) -> None:
    text = f'[[routes]]\nname = "a"\nports = [1]\ntargets = ["127.0.0.1:2"]\naction = "bridge"\n[routes.tls]\nmode = "terminate"\ncert = "{tmp_path}/none.pem"\nkey = "{tmp_path}/none.key"\n'
    assert errors_of(text) == ["cannot load TLS certificate or key: No such file or directory - at `$.routes[0].tls.cert`"]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"offload_fallback": '"forward"'}, 'offload_fallback is only used with action = "offload" - at `$.routes[0].offload_fallback`'),
        ({"preserve_source_ip": "true"}, 'preserve_source_ip is only used with action = "offload" - at `$.routes[0].preserve_source_ip`'),
        ({"action": '"offload"', "domains": '["a.example"]'}, 'action = "offload" is forwarded by the kernel: domains, tls and PROXY protocol need user space - at `$.routes[0].action`'),
    ],
)
def test_offload_keys_are_checked_before_nft_sees_them(keys: dict[str, str], expected: str) -> None:
    assert expected in errors_of(one_route(**keys))


def test_offload_targets_must_be_addresses() -> None:
    errors = errors_of('[[routes]]\nname = "a"\nports = [8000]\naction = "offload"\ntargets = ["db.internal:5432"]\n')
    assert errors == ["route 'a': target host 'db.internal' is not an IP address literal (hostnames cannot be offloaded) - at `$.routes[0]`"]


def test_an_offload_route_compiles() -> None:
    table = compile_table(parse_config(one_route(action='"offload"', preserve_source_ip="true"), ".toml"))
    assert table.routes[0].action == "offload"


# -- handlers -------------------------------------------------------------------------


def test_handler_resolves() -> None:
    table = compile_table(toml('[[routes]]\nname = "h"\nports = [1]\naction = "handler"\nhandler = "trio:sleep_forever"\n'))
    assert table.routes[0].handler is trio.sleep_forever
    assert table.routes[0].action == "handler"


def test_handler_callable_in_code() -> None:
    async def handle(stream: object, info: object) -> None:
        pass

    table = compile_table(Config(routes=[Route(name="h", ports=[1], action="handler", handler=handle)]))
    assert table.routes[0].handler is handle


@pytest.mark.parametrize(
    ("spec", "start"),
    [
        ("nosuchmodule_triofwd:fn", "cannot import handler module 'nosuchmodule_triofwd'"),
        ("os.path:nosuch", "handler 'os.path:nosuch' is not a callable in 'os.path'"),
        ("os.path:sep", "handler 'os.path:sep' is not a callable"),  # exists, but a string
        ("os.path:join", "handler 'os.path:join' must be an async callable (stream, info)"),
        ("os.path", "invalid handler 'os.path'"),
        ("os.path:", "invalid handler 'os.path:'"),
        ("", 'action = "handler" needs handler'),
    ],
)
def test_bad_handler(spec: str, start: str) -> None:
    errors = errors_of(f'[[routes]]\nname = "h"\nports = [1]\naction = "handler"\nhandler = "{spec}"\n')
    assert len(errors) == 1
    assert errors[0].startswith(start)
    assert errors[0].endswith("- at `$.routes[0].handler`")


def test_handler_without_handler_action_refused() -> None:
    errors = errors_of(one_route(handler='"os.path:join"'))
    assert errors == ['handler is only used with action = "handler" - at `$.routes[0].handler`']


# -- value parsers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("4h", 14400.0),
        ("7d", 604800.0),
        ("1.5s", 1.5),
        ("0", math.inf),
        (" 10s ", 10.0),
        ("1000ms", 1.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["5x", "10", "-1s", "", "1.s", ".5s", "s", "1e3s", "inf", "5 m", "5M", "1h30m"])
def test_parse_duration_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("300/min", (300, 60.0)),
        ("300/m", (300, 60.0)),
        ("300/minute", (300, 60.0)),
        ("5/s", (5, 1.0)),
        ("5/sec", (5, 1.0)),
        ("5/second", (5, 1.0)),
        ("100/hour", (100, 3600.0)),
        ("100/h", (100, 3600.0)),
        ("10/5s", (10, 5.0)),
        ("10/15min", (10, 900.0)),
        ("10 / min", (10, 60.0)),
        ("0", None),
    ],
)
def test_parse_rate(text: str, rate: tuple[int, float] | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("bad", ["300", "300/week", "0/min", "-1/s", "10/0s", "x/s", "", "1.5/s", "/s"])
def test_parse_rate_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate(bad)


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits allowed
        ("192.0.2.7", "192.0.2.7/32"),
        ("::1", "::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        (" 10.0.0.0/8 ", "10.0.0.0/8"),
    ],
)
def test_parse_cidr(text: str, network: str) -> None:
    assert str(parse_cidr(text)) == network


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "example.com", "", "10.0.0", "::1/129"])
def test_parse_cidr_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid CIDR"):
        parse_cidr(bad)


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("10.0.0.5:22", ("10.0.0.5", 22)),
        ("[::1]:22", ("::1", 22)),
        ("[2001:db8::5]:443", ("2001:db8::5", 443)),
        ("db.internal:5432", ("db.internal", 5432)),
        ("localhost:65535", ("localhost", 65535)),
        ("my_host:1", ("my_host", 1)),
    ],
)
def test_parse_target(text: str, target: tuple[str, int]) -> None:
    assert parse_target(text) == target


@pytest.mark.parametrize("bad", ["10.0.0.5", "10.0.0.5:0", "host:65536", "::1:22", "[::1]", "[::1]22", "[10.0.0.1]:22", "-bad:22", "a..b:22", ":22", "host:-1"])
def test_parse_target_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid target"):
        parse_target(bad)


@pytest.mark.parametrize(
    ("spec", "ports"),
    [(2222, range(2222, 2223)), (0, range(1)), ("8000-8010", range(8000, 8011)), ("5-5", range(5, 6))],
)
def test_parse_ports(spec: int | str, ports: range) -> None:
    assert parse_ports(spec) == ports


@pytest.mark.parametrize("bad", ["9000-8000", "0-1", "1-65536"])
def test_parse_ports_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid port range"):
        parse_ports(bad)


# -- triofwd check --------------------------------------------------------------------


def test_cli_check_good_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(SMALL_TOML)
    result = run_triofwd("check", str(path), timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok: 2 routes"
    assert "Traceback" not in result.stderr


def test_cli_check_bad_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "settings:\n  connect_timeout: 5x\n"
        "routes:\n  - name: a\n    ports: [1]\n    targets: ['127.0.0.1:1']\n    client_ips: ['10.0.0.0/8', 'nope']\n"
    )
    result = run_triofwd("check", str(path), timeout=30)
    assert result.returncode == 1
    assert "ok:" not in result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: invalid duration '5x'")
    assert lines[0].endswith("- at `$.settings.connect_timeout`")
    assert lines[1] == f"{path}: invalid CIDR 'nope': expected an address or address/prefix - at `$.routes[0].client_ips[1]`"


def test_cli_check_shape_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(one_route() + '[[routes]]\nname = "b"\nports = [70000]\n')
    result = run_triofwd("check", str(path), timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"{path}: Expected `int` <= 65535 - at `$.routes[1].ports[0]`"


def test_cli_check_missing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "missing.toml"
    result = run_triofwd("check", str(path), timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{path}: cannot read route file")


# -- known bugs -----------------------------------------------------------------------

_DOLLAR_BUG = (
    "BUG: the checks use re.match(r'^...$'), and '$' also matches before a trailing newline, "
    "so a value ending in '\\n' passes (use re.fullmatch or '\\Z')"
)


def test_route_name_with_trailing_newline_refused() -> None:
    # Route names go into logs, metric labels and nftables rules: they must stay one plain line.
    errors = errors_of(one_route().replace('name = "a"', 'name = "a\\n"'))
    assert any(line.endswith("- at `$.routes[0].name`") for line in errors)


def test_domain_pattern_with_trailing_newline_refused() -> None:
    errors = errors_of(one_route(domains='["example.com\\n"]'))
    assert any(line.endswith("- at `$.routes[0].domains[0]`") for line in errors)


def test_target_host_with_newline_refused() -> None:
    with pytest.raises(ValueError, match="invalid target"):
        parse_target("db\n:5432")


def test_cli_check_empty_ports_no_traceback(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('[[routes]]\nname = "a"\nports = []\ntargets = ["127.0.0.1:1"]\n')
    result = run_triofwd("check", str(path), timeout=30)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert result.stderr.strip() == f"{path}: a route needs at least one port - at `$.routes[0].ports`"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"action": '"reject"'}, 'proxy_protocol is the header sent to a target: action = "reject" dials none'),
        ({"action": '"handler"', "handler": '"trio:sleep"'}, 'proxy_protocol is the header sent to a target: action = "handler" dials none'),
        (
            {"action": '"bridge"', "bridge_to": '"127.0.0.1:9443"'},
            'proxy_protocol is not used with bridge_to = "host:port": the hop always carries PROXY v2, and the terminator there decides what its targets get',
        ),
    ],
)
def test_proxy_protocol_where_no_target_gets_it(keys: dict[str, str], message: str) -> None:
    errors = errors_of(one_route(proxy_protocol='"v2"', **keys))
    assert message + " - at `$.routes[0].proxy_protocol`" in errors


# -- every error in one run, "did you mean" ---------------------------------------------


def test_every_shape_error_in_one_run() -> None:
    text = textwrap.dedent("""
        [settings]
        max_connections = -1
        keepalive = "forever"

        [[routes]]
        name = 7
        ports = [70000, 80, "x"]
        targets = ["127.0.0.1:1"]
        tls = { mode = "terminate", keyfile = "k.pem" }

        [[routes]]
        ports = [81]
        health_check = { rise = 0, intervall = "1s" }
    """)
    with pytest.raises(ShapeError) as info:
        parse_config(text, ".toml")
    assert info.value.errors == [
        "Expected `int` >= 0 - at `$.settings.max_connections`",
        "Invalid enum value 'forever' - at `$.settings.keepalive`",
        "Expected `str`, got `int` - at `$.routes[0].name`",
        "Expected `int` <= 65535 - at `$.routes[0].ports[0]`",
        "Expected `str` matching regex '^\\\\d{1,5}-\\\\d{1,5}$' - at `$.routes[0].ports[2]`",
        "Object contains unknown field `keyfile` (did you mean `key`?) - at `$.routes[0].tls`",
        "Expected `int` >= 1 - at `$.routes[1].health_check.rise`",
        "Object contains unknown field `intervall` (did you mean `interval`?) - at `$.routes[1].health_check`",
        "Object missing required field `name` - at `$.routes[1]`",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[setings]\nconnect_timeout = "1s"\n', "Object contains unknown field `setings` (did you mean `settings`?) - at `$`"),
        ('[[route]]\nname = "a"\n', "Object contains unknown field `route` (did you mean `routes`?) - at `$`"),
        ('[settings]\ninactivity_timout = "1s"\n', "Object contains unknown field `inactivity_timout` (did you mean `inactivity_timeout`?) - at `$.settings`"),
        (one_route(prority="1"), "Object contains unknown field `prority` (did you mean `priority`?) - at `$.routes[0]`"),
        (one_route(blance='"first"'), "Object contains unknown field `blance` (did you mean `balance`?) - at `$.routes[0]`"),
        (one_route(tls='{ cert_file = "c.pem" }'), "Object contains unknown field `cert_file` (did you mean `cert`?) - at `$.routes[0].tls`"),
        (one_route(circuit_breaker="{ failure = 3 }"), "Object contains unknown field `failure` (did you mean `failures`?) - at `$.routes[0].circuit_breaker`"),
        (one_route(bogus="1"), "Object contains unknown field `bogus` - at `$.routes[0]`"),  # nothing close: no guess
        # a key of a table one level down, written a level too high
        ('max_lifetime = "1h"\n', "Object contains unknown field `max_lifetime` (did you mean `settings.max_lifetime`?) - at `$`"),
        (one_route(min_version='"1.3"'), "Object contains unknown field `min_version` (did you mean `tls.min_version`?) - at `$.routes[0]`"),
    ],
)
def test_did_you_mean_against_the_keys_of_that_level(text: str, message: str) -> None:
    assert errors_of(text) == [message]


def test_did_you_mean_in_yaml_and_json() -> None:
    assert errors_of("routes:\n  - name: a\n    ports: [1]\n    targtes: ['127.0.0.1:1']\n", ".yaml") == [
        "Object contains unknown field `targtes` (did you mean `targets`?) - at `$.routes[0]`"
    ]
    assert errors_of('{"settings": {"shutdown_grase": "1s"}}', ".json") == [
        "Object contains unknown field `shutdown_grase` (did you mean `shutdown_grace`?) - at `$.settings`"
    ]


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("[1, 2]", ".json", "Expected `object`, got `array` - at `$`"),
        ("", ".yaml", "Expected `object`, got `null` - at `$`"),
        ('routes = "a"\n', ".toml", "Expected `array`, got `str` - at `$.routes`"),
        ('settings = 5\n', ".toml", "Expected `object`, got `int` - at `$.settings`"),
        ("routes = [1]\n", ".toml", "Expected `object`, got `int` - at `$.routes[0]`"),
        (one_route(tls='"x"'), ".toml", "Expected `object | null`, got `str` - at `$.routes[0].tls`"),
    ],
)
def test_a_value_of_the_wrong_kind_is_one_error_at_its_path(text: str, suffix: str, message: str) -> None:
    assert errors_of(text, suffix) == [message]


def test_shape_error_keeps_the_sound_rest_of_the_file() -> None:
    text = '[settings]\nmax_connections = -1\nshutdown_grace = "5s"\n' + one_route() + '[[routes]]\nname = "b"\nports = [70000]\n' + one_route().replace('"a"', '"c"')
    with pytest.raises(ShapeError) as info:
        parse_config(text, ".toml")
    sound = info.value.sound
    assert sound is not None
    assert [r.name for r in sound.routes] == ["a", "c"]
    assert info.value.kept == (0, 2)
    assert sound.settings.shutdown_grace == "5s" and sound.settings.max_connections == Settings().max_connections
    assert info.value.dropped == {"max_connections"}


def test_a_good_file_takes_the_fast_path_and_a_bad_one_is_walked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk for every error runs only for a file msgspec already refused."""
    from triofwd import _config

    calls: list[str] = []
    real = _config._check_struct
    monkeypatch.setattr(_config, "_check_struct", lambda *a: calls.append(a[2]) or real(*a))
    parse_config(SMALL_TOML, ".toml")
    assert calls == []
    with pytest.raises(ShapeError):
        parse_config('[[routes]]\nname = "a"\nports = [70000]\n', ".toml")
    assert calls == ["$", "$.routes[0]"]  # the file, and each table in it, once


def write(tmp_path: pathlib.Path, text: str, name: str = "routes.toml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_cli_check_reports_shape_and_compile_errors_together(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        """
        [settings]
        connect_timeout = "5x"

        [[routes]]
        name = "web"
        ports = [70000]
        targets = ["10.0.0.5:8080"]

        [[routes]]
        name = "ssh"
        ports = [2222]
        targets = ["10.0.0.5"]
        client_ips = ["10.0.0.0/33"]

        [[routes]]
        name = "ssh"
        ports = [2223]
        tragets = ["10.0.0.5:22"]
        """,
    )
    result = run_triofwd("check", str(path), timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"{path}: invalid duration '5x': expected a number and a unit (ms, s, m, h, d), e.g. \"250ms\", \"30s\", \"5m\", or \"0\" for off - at `$.settings.connect_timeout`",
        f"{path}: Expected `int` <= 65535 - at `$.routes[0].ports[0]`",
        # route 1 is compiled without route 0 (whose shape is wrong): its paths are still the file's
        f"{path}: invalid CIDR '10.0.0.0/33': expected an address or address/prefix - at `$.routes[1].client_ips[0]`",
        f"{path}: invalid target '10.0.0.5': expected host:port - at `$.routes[1].targets[0]`",
        f"{path}: Object contains unknown field `tragets` (did you mean `targets`?) - at `$.routes[2]`",
    ]


def test_cli_check_leaves_out_what_only_follows_from_a_bad_setting(tmp_path: pathlib.Path) -> None:
    """trusted_proxies of the wrong shape is left out of the second look: a route that accepts
    PROXY headers is then not also told that trusted_proxies is missing."""
    path = write(tmp_path, '[settings]\ntrusted_proxies = "10.0.0.0/8"\n' + one_route(accept_proxy_protocol="true", block_ips='["x"]'))
    result = run_triofwd("check", str(path), timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: Expected `array`, got `str` - at `$.settings.trusted_proxies`",
        f"{path}: invalid CIDR 'x': expected an address or address/prefix - at `$.routes[0].block_ips[0]`",
    ]


def test_serve_names_every_shape_error_on_its_one_line(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, '[[routes]]\nname = "a"\nports = [70000]\ntargets = ["127.0.0.1:1"]\nblance = "first"\n')
    result = run_triofwd("serve", str(path), timeout=30)
    assert result.returncode == 2
    assert result.stderr == (
        f"triofwd: {path}: Expected `int` <= 65535 - at `$.routes[0].ports[0]`; "
        "Object contains unknown field `blance` (did you mean `balance`?) - at `$.routes[0]`\n"
    )


OFFLOAD_FILE = """
[[routes]]
name = "db"
ports = [15432]
bind = "127.0.0.1"
action = "offload"
targets = ["127.0.0.1:5432"]
client_ips = ["127.0.0.0/8"]

[[routes]]
name = "web"
ports = [18080]
targets = ["127.0.0.1:8081"]
"""


def test_cli_check_show_nft_stdout_is_the_ruleset_alone(tmp_path: pathlib.Path) -> None:
    result = run_triofwd("check", str(write(tmp_path, OFFLOAD_FILE)), "--show-nft", timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "ok: 2 routes\n"
    assert result.stdout.startswith("# generated by triofwd") and result.stdout.endswith("}\n")
    assert "ok:" not in result.stdout


def test_cli_check_show_nft_pipes_into_nft_check(tmp_path: pathlib.Path) -> None:
    """`triofwd check f --show-nft | nft -c -f -`: nft itself accepts what check prints."""
    nft = shutil.which("nft")
    if nft is None:
        pytest.skip("nft is not installed (Debian: apt-get install nftables)")
    probe = subprocess.run([nft, "-c", "-f", "-"], input="table inet triofwd_probe {\n}\n", capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"nft -c cannot run here (needs CAP_NET_ADMIN): {probe.stderr.strip()}")
    check = run_triofwd("check", str(write(tmp_path, OFFLOAD_FILE)), "--show-nft", timeout=30)
    assert check.returncode == 0, check.stderr
    result = subprocess.run([nft, "-c", "-f", "-"], input=check.stdout, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    broken = subprocess.run([nft, "-c", "-f", "-"], input=check.stdout + "ok: 2 routes\n", capture_output=True, text=True, timeout=10)
    assert broken.returncode != 0  # what stdout held before: the check above could fail


@hypothesis.settings(max_examples=200, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(fuzz.config_dicts, st.sampled_from([".toml", ".yaml", ".json"]))
def test_every_error_of_odd_files_names_a_path_in_the_file(data: dict[str, object], suffix: str) -> None:
    """What `check` prints for any file: lines with a path each, pointing into the file
    (route indices renumbered back), every shape error among them, no line twice."""
    text = fuzz.encode_route_file(data, suffix)
    try:
        compile_table(parse_config(text, suffix))
        return
    except ShapeError as exc:
        shape, lines = exc.errors, _cli._every_error(exc)
    except ConfigError as exc:
        shape, lines = [], _cli._every_error(exc)
    assert lines and set(shape) <= set(lines) and len(set(lines)) == len(lines)
    routes = data.get("routes") if isinstance(data.get("routes"), list) else []
    for line in lines:
        if line.startswith("invalid ") and " - at `" not in line:
            continue  # a syntax error (the TOML writer of the fuzzer can make one): no path to name
        assert " - at `$" in line, line
        for index in re.findall(r"\$\.routes\[(\d+)\]", line):
            assert int(index) < len(routes), line


def test_every_error_of_a_large_file_is_found_quickly() -> None:
    """The walk for every error reads each struct's fields once (msgspec evaluates them on
    every call: 3 s for 1,500 routes before they were kept); measured 0.2 s here."""
    import time

    text = "".join(f'[[routes]]\nname = "r{i}"\nports = [{10000 + i}]\ntargets = ["127.0.0.1:{i + 1}"]\n' for i in range(1500))
    started = time.perf_counter()
    with pytest.raises(ShapeError) as info:
        parse_config(text + '[[routes]]\nname = "x"\nports = [70000]\n', ".toml")
    assert time.perf_counter() - started < 2.0
    assert info.value.errors == ["Expected `int` <= 65535 - at `$.routes[1500].ports[0]`"]
    assert info.value.kept == tuple(range(1500))
