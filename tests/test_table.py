"""The route table: matching order, allow/deny lists, SNI patterns, policies, listen keys."""

from __future__ import annotations

import ipaddress
import math
import textwrap
from typing import Any

import pytest

from triofwd._addresses import client_address
from triofwd._config import Config, Route, Settings, parse_config
from triofwd._errors import ConfigError
from triofwd._limits import Limits
from triofwd._policy import Policy
from triofwd._reasons import Reason
from triofwd._table import RouteTable, compile_table, domain_matches

KEY = ("0.0.0.0", 8000, "")


def r(name: str, **kw: Any) -> Route:
    kw.setdefault("ports", [8000])
    kw.setdefault("targets", ["127.0.0.1:9000"])
    return Route(name=name, **kw)


def table(*routes: Route, **settings: Any) -> RouteTable:
    return compile_table(Config(settings=Settings(**settings), routes=list(routes)))


def name_of(result: object) -> object:
    return getattr(result, "name", result)


# -- order ----------------------------------------------------------------------------


def test_priority_higher_first_then_file_order() -> None:
    t = table(r("low"), r("high1", priority=10), r("mid", priority=5), r("high2", priority=10), r("neg", priority=-1))
    assert [x.name for x in t.by_listener[KEY]] == ["high1", "high2", "mid", "low", "neg"]
    assert name_of(t.match(KEY, "192.0.2.1")) == "high1"
    # routes keeps file order and each route knows its index
    assert [(x.name, x.index) for x in t.routes] == [("low", 0), ("high1", 1), ("mid", 2), ("high2", 3), ("neg", 4)]


def test_equal_priority_file_order() -> None:
    t = table(r("first"), r("second"))
    assert name_of(t.match(KEY, "192.0.2.1")) == "first"
    assert t.route("second") is t.routes[1]
    assert t.route("nope") is None


# -- allow and deny lists -------------------------------------------------------------


def test_client_ips_allow_list_skips_to_next_route() -> None:
    t = table(r("inside", priority=1, client_ips=["10.0.0.0/8", "192.168.0.0/16"]), r("outside"))
    assert name_of(t.match(KEY, "10.1.2.3")) == "inside"
    assert name_of(t.match(KEY, "192.168.7.7")) == "inside"
    assert name_of(t.match(KEY, "192.0.2.1")) == "outside"


def test_block_ips_is_final() -> None:
    # A route that matches and blocks the client ends it: no falling through to the next route.
    t = table(r("guarded", priority=1, block_ips=["10.1.0.0/16"]), r("open"))
    assert t.match(KEY, "10.1.2.3") is Reason.IP_BLOCKED
    assert name_of(t.match(KEY, "10.2.0.1")) == "guarded"


def test_block_ips_within_allow_list() -> None:
    t = table(r("a", client_ips=["10.0.0.0/8"], block_ips=["10.9.9.9"]))
    assert name_of(t.match(KEY, "10.9.9.8")) == "a"
    assert t.match(KEY, "10.9.9.9") is Reason.IP_BLOCKED


def test_turned_away_by_every_allow_list_is_ip_blocked() -> None:
    t = table(r("a", client_ips=["10.0.0.0/8"]), r("b", client_ips=["172.16.0.0/12"]))
    assert t.match(KEY, "192.0.2.1") is Reason.IP_BLOCKED
    assert name_of(t.match(KEY, "172.16.1.1")) == "b"


def test_nothing_on_the_listener_is_no_route() -> None:
    t = table(r("a"))
    assert t.match(("0.0.0.0", 8001, ""), "10.0.0.1") is Reason.NO_ROUTE
    assert t.match(("127.0.0.1", 8000, ""), "10.0.0.1") is Reason.NO_ROUTE


def test_no_route_when_only_domains_routes_and_no_sni() -> None:
    t = table(r("tls", domains=["example.com"]))
    assert t.match(KEY, "10.0.0.1") is Reason.NO_ROUTE
    assert t.match(KEY, "10.0.0.1", sni="other.com") is Reason.NO_ROUTE
    assert name_of(t.match(KEY, "10.0.0.1", sni="example.com")) == "tls"


def test_domain_mismatch_is_not_ip_blocked() -> None:
    # A domains route that does not match is skipped before its allow list is looked at.
    t = table(r("tls", domains=["example.com"], client_ips=["10.0.0.0/8"]))
    assert t.match(KEY, "192.0.2.1", sni="other.com") is Reason.NO_ROUTE
    assert t.match(KEY, "192.0.2.1", sni="example.com") is Reason.IP_BLOCKED


def test_sni_routes_then_fallback() -> None:
    t = table(
        r("exact", domains=["api.example.com"], priority=2),
        r("wild", domains=["*.example.com"], priority=1),
        r("default"),
    )
    assert t.reads_client_hello(KEY)
    assert name_of(t.match(KEY, "10.0.0.1", sni="api.example.com")) == "exact"
    assert name_of(t.match(KEY, "10.0.0.1", sni="WWW.Example.COM.")) == "wild"
    assert name_of(t.match(KEY, "10.0.0.1", sni="example.com")) == "default"
    assert name_of(t.match(KEY, "10.0.0.1")) == "default"


def test_reads_client_hello_only_with_domains() -> None:
    t = table(r("plain"), r("other", ports=[9000], domains=["a.example"]))
    assert not t.reads_client_hello(KEY)
    assert t.reads_client_hello(("0.0.0.0", 9000, ""))
    assert not t.reads_client_hello(("0.0.0.0", 1, ""))


def test_domains_are_stored_lowercase_without_trailing_dot() -> None:
    t = table(r("a", domains=["API.Example.COM.", "*.Example.com"]))
    assert t.routes[0].domains == ("api.example.com", "*.example.com")


# -- addresses ------------------------------------------------------------------------


def test_ipv4_mapped_client_matches_ipv4_allow_list() -> None:
    t = table(r("v4", bind="::", client_ips=["10.0.0.0/8"]))
    key = ("::", 8000, "")
    assert name_of(t.match(key, "::ffff:10.1.2.3")) == "v4"
    assert t.match(key, "::ffff:192.0.2.1") is Reason.IP_BLOCKED


def test_ipv4_mapped_client_matches_ipv4_block_list() -> None:
    t = table(r("v4", bind="::", block_ips=["10.0.0.0/8"]))
    assert t.match(("::", 8000, ""), "::ffff:10.1.2.3") is Reason.IP_BLOCKED


def test_ipv6_client_never_matches_ipv4_cidr() -> None:
    t = table(r("v4only", bind="::", client_ips=["0.0.0.0/0"]), r("blocks", bind="::", ports=[9000], block_ips=["0.0.0.0/0"]))
    assert t.match(("::", 8000, ""), "2001:db8::1") is Reason.IP_BLOCKED  # not in the allow list
    assert name_of(t.match(("::", 9000, ""), "2001:db8::1")) == "blocks"  # not in the deny list


def test_ipv6_allow_list() -> None:
    t = table(r("v6", bind="::", client_ips=["2001:db8::/32"]))
    assert name_of(t.match(("::", 8000, ""), "2001:db8:1::5")) == "v6"
    assert t.match(("::", 8000, ""), "2001:db9::5") is Reason.IP_BLOCKED
    assert t.match(("::", 8000, ""), "10.0.0.1") is Reason.IP_BLOCKED


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_address(text: str, address: str) -> None:
    assert client_address(text) == ipaddress.ip_address(address)


def test_client_address_unwraps_to_ipv4() -> None:
    assert isinstance(client_address("::ffff:127.0.0.1"), ipaddress.IPv4Address)


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "www.example.com", False),
        ("example.com", "example.org", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "example.com", False),  # "*" is exactly one label
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),  # empty label
        ("*.example.com", "aexample.com", False),
        ("Example.COM", "example.com", True),
        ("example.com", "EXAMPLE.com", True),
        ("*.EXAMPLE.com", "Www.example.COM", True),
        ("example.com.", "example.com", True),
        ("example.com", "example.com.", True),
        ("*.example.com", "a.example.com.", True),
        ("*.example.com.", "a.example.com", True),
    ],
)
def test_domain_matches(pattern: str, name: str, expected: bool) -> None:
    assert domain_matches(pattern, name) is expected


# -- policies -------------------------------------------------------------------------


def test_default_policy() -> None:
    t = table(r("a"))
    assert t.policy == Policy(
        connect_timeout=10.0,
        initial_data_timeout=30.0,
        inactivity_timeout=3600.0,
        half_close_timeout=math.inf,  # "0": off
        max_lifetime=86400.0,
        keepalive="standard",
        keepalive_multiplier=6,
        tcp_keepalive=60.0,
    )
    assert t.routes[0].policy == t.policy
    assert t.policy.idle_window == 3600.0
    assert t.policy.idle_warning_after == math.inf
    assert t.shutdown_grace == 30.0
    assert t.limits == Limits(max_connections=10000)
    assert t.routes[0].limits == Limits()  # no route-level limits
    assert not t.routes[0].limits.any


def test_route_override_and_inheritance() -> None:
    t = table(
        r("a", inactivity_timeout="5s"),
        r("b", connect_timeout="250ms", max_lifetime="0"),
        connect_timeout="3s",
        tcp_keepalive="0",
    )
    a, b = t.routes
    assert a.policy.inactivity_timeout == 5.0
    assert a.policy.idle_window == 5.0
    assert a.policy.connect_timeout == 3.0  # from [settings]
    assert a.policy.tcp_keepalive == math.inf  # from [settings], "0" = off
    assert a.policy.max_lifetime == 86400.0  # default
    assert b.policy.connect_timeout == 0.25
    assert b.policy.max_lifetime == math.inf
    assert b.policy.inactivity_timeout == 3600.0
    assert t.policy.connect_timeout == 3.0
    assert t.policy.inactivity_timeout == 3600.0  # a route override never leaks into [settings]


def test_keepalive_extended_from_settings() -> None:
    t = table(r("a"), keepalive="extended", inactivity_timeout="10m", keepalive_multiplier=3)
    p = t.routes[0].policy
    assert p.keepalive == "extended"
    assert p.idle_warning_after == 600.0 * 3
    assert p.idle_window == 600.0 * 3 + 600.0


def test_keepalive_extended_route_override_mixes_with_settings() -> None:
    t = table(r("a", keepalive="extended", keepalive_multiplier=2), r("b", keepalive="extended"), inactivity_timeout="30s")
    a, b = t.routes
    assert (a.policy.idle_warning_after, a.policy.idle_window) == (60.0, 90.0)
    assert (b.policy.idle_warning_after, b.policy.idle_window) == (180.0, 210.0)  # multiplier 6 from settings
    assert t.policy.keepalive == "standard"
    assert t.policy.idle_window == 30.0


def test_keepalive_immortal() -> None:
    t = table(r("a", keepalive="immortal"), r("b"), inactivity_timeout="5s")
    a, b = t.routes
    assert a.policy.idle_window == math.inf
    assert a.policy.idle_warning_after == math.inf
    assert a.policy.max_lifetime == 86400.0  # max_lifetime still holds
    assert b.policy.idle_window == 5.0


def test_settings_immortal_route_standard() -> None:
    t = table(r("a", keepalive="standard"), r("b"), keepalive="immortal", inactivity_timeout="1m")
    assert t.routes[0].policy.idle_window == 60.0
    assert t.routes[1].policy.idle_window == math.inf


def test_policy_properties_directly() -> None:
    base = dict(connect_timeout=1.0, initial_data_timeout=1.0, half_close_timeout=math.inf,
                max_lifetime=100.0, keepalive_multiplier=4, tcp_keepalive=1.0)  # fmt: skip
    standard = Policy(inactivity_timeout=10.0, keepalive="standard", **base)
    extended = Policy(inactivity_timeout=10.0, keepalive="extended", **base)
    immortal = Policy(inactivity_timeout=10.0, keepalive="immortal", **base)
    assert (standard.idle_warning_after, standard.idle_window) == (math.inf, 10.0)
    assert (extended.idle_warning_after, extended.idle_window) == (40.0, 50.0)
    assert (immortal.idle_warning_after, immortal.idle_window) == (math.inf, math.inf)
    off = Policy(inactivity_timeout=math.inf, keepalive="extended", **base)
    assert off.idle_window == math.inf


def test_limits_settings_and_route() -> None:
    t = table(
        r("a", max_connections=5, max_connections_per_ip=2, connection_rate_per_ip="10/s"),
        r("b", connection_rate_per_ip="0"),
        max_connections=100,
        max_connections_per_ip=3,
        connection_rate_per_ip="300/min",
    )
    assert t.limits == Limits(100, 3, (300, 60.0))
    assert t.limits.any
    assert t.routes[0].limits == Limits(5, 2, (10, 1.0))
    assert t.routes[1].limits == Limits()
    assert not Limits().any


def test_shutdown_grace_zero_means_none() -> None:
    assert table(shutdown_grace="0").shutdown_grace == 0.0
    assert table(shutdown_grace="1500ms").shutdown_grace == 1.5


# -- listen keys ----------------------------------------------------------------------


def test_port_zero_routes_each_get_their_own_listener() -> None:
    t = table(r("a", ports=[0], bind="127.0.0.1"), r("b", ports=[0], bind="127.0.0.1"))
    assert t.routes[0].listen_keys() == [("127.0.0.1", 0, "a")]
    assert set(t.by_listener) == {("127.0.0.1", 0, "a"), ("127.0.0.1", 0, "b")}
    assert name_of(t.match(("127.0.0.1", 0, "b"), "127.0.0.1")) == "b"


def test_shared_port_is_one_listener_with_both_routes() -> None:
    t = table(r("a", ports=[8000, 8001]), r("b", ports=[8000], priority=1))
    assert set(t.by_listener) == {KEY, ("0.0.0.0", 8001, "")}
    assert [x.name for x in t.by_listener[KEY]] == ["b", "a"]
    assert [x.name for x in t.by_listener[("0.0.0.0", 8001, "")]] == ["a"]


def test_port_range_listen_keys() -> None:
    t = table(r("a", ports=["8000-8002", 9000], bind="::"))
    assert t.routes[0].ports == (8000, 8001, 8002, 9000)
    assert t.routes[0].listen_keys() == [("::", 8000, ""), ("::", 8001, ""), ("::", 8002, ""), ("::", 9000, "")]


def test_same_port_different_bind_is_two_listeners() -> None:
    t = table(r("a", bind="127.0.0.1"), r("b", bind="127.0.0.2"))
    assert name_of(t.match(("127.0.0.1", 8000, ""), "127.0.0.1")) == "a"
    assert name_of(t.match(("127.0.0.2", 8000, ""), "127.0.0.1")) == "b"


# -- compiled values ------------------------------------------------------------------


def test_compiled_route_fields() -> None:
    config = parse_config(
        textwrap.dedent(
            """
            [[routes]]
            name = "ssh"
            ports = [2222]
            client_ips = ["10.0.0.0/8", "192.0.2.7"]
            block_ips = ["::1"]
            targets = ["10.0.0.5:22", "[::1]:22", "db.internal:5432"]
            balance = "random"
            connect_retries = 0
            """
        ),
        ".toml",
    )
    t = compile_table(config)
    (route,) = t.routes
    assert route.client_ips == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"))
    assert route.block_ips == (ipaddress.ip_network("::1/128"),)
    assert route.targets == (("10.0.0.5", 22), ("::1", 22), ("db.internal", 5432))
    assert (route.balance, route.connect_retries, route.action, route.handler) == ("random", 0, "forward", None)
    assert route.spec is config.routes[0]
    assert t.config is config


def test_empty_config_compiles() -> None:
    t = compile_table(Config())
    assert t.routes == ()
    assert t.by_listener == {}


def test_compile_reports_errors_without_source() -> None:
    with pytest.raises(ConfigError) as info:
        compile_table(Config(routes=[r("a", connect_timeout="nope")]))
    assert info.value.source == ""
    assert info.value.errors[0].endswith("- at `$.routes[0].connect_timeout`")


@pytest.mark.parametrize("port", [70000, -1])
def test_code_built_config_port_out_of_range_refused(port: int) -> None:
    with pytest.raises(ConfigError) as info:
        compile_table(Config(routes=[r("a", ports=[port])]))
    assert any(line.endswith("- at `$.routes[0].ports[0]`") for line in info.value.errors)


def test_first_bytes_timeout_is_the_most_patient_route_on_the_listener() -> None:
    """The first bytes pick the route, so a listener waits as long as its most patient route."""
    settings = Settings(initial_data_timeout="30s")
    sni = [Route(name="a", ports=[443], domains=["a.example"], targets=["127.0.0.1:1"], initial_data_timeout="2s"),
           Route(name="b", ports=[443], domains=["b.example"], targets=["127.0.0.1:1"], initial_data_timeout="5s")]  # fmt: skip
    table = compile_table(Config(settings=settings, routes=sni))
    assert table.first_bytes_timeout(("0.0.0.0", 443, "")) == 5.0
    fallback = Route(name="c", ports=[443], targets=["127.0.0.1:1"])  # no override: [settings]' 30 s
    table = compile_table(Config(settings=settings, routes=[*sni, fallback]))
    assert table.first_bytes_timeout(("0.0.0.0", 443, "")) == 30.0
    assert table.first_bytes_timeout(("0.0.0.0", 8443, "")) == 30.0  # not a listener of this table


# -- socks5 and http_connect: destinations and users ------------------------------------


def _dynamic_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        compile_table(parse_config(textwrap.dedent(text), ".toml"))
    return info.value.errors


def test_a_socks5_route_compiles_its_destinations_and_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_PASSWORD", "from-the-environment")
    t = compile_table(
        parse_config(
            textwrap.dedent("""
                [[routes]]
                name = "proxy"
                ports = [1080]
                bind = "127.0.0.1"
                action = "socks5"
                destinations = ["*.example.com:443", "10.0.0.0/8:22,80", "[2001:db8::/32]:*"]
                users = [{ name = "alice", password = "env:PROXY_PASSWORD" }, { name = "bob", password = "plain" }]

                [[routes]]
                name = "web"
                ports = [3128]
                action = "http_connect"
                destinations = ["*:443"]
            """),
            ".toml",
        )
    )
    proxy, web = t.routes
    assert (proxy.kind, web.kind) == ("socks5", "http_connect")
    assert proxy.destinations is not None and proxy.users is not None
    assert proxy.destinations.allows_name("www.example.com", 443) and not proxy.destinations.allows_name("example.com", 443)
    assert proxy.destinations.allows_address("10.1.2.3", 22, via_name=None) and not proxy.destinations.allows_address("10.1.2.3", 443, via_name=None)
    assert proxy.users.verify("alice", "from-the-environment") and not proxy.users.verify("alice", "plain")
    assert web.users is not None and not web.users  # no users: no authentication
    # The forwarder's own listening addresses are never a destination, even under "*".
    assert web.destinations is not None and not web.destinations.allows_address("127.0.0.1", 1080, via_name=None)
    assert not web.destinations.allows_address("127.0.0.1", 443, via_name=None)  # loopback: not listed
    assert web.destinations.allows_address("192.0.2.1", 443, via_name=None)
    # Nothing to dial until a client asks: no targets, and the listener reads no first bytes.
    assert proxy.targets == () and not proxy.dials and not t.reads_first_bytes(("127.0.0.1", 1080, ""))


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            'action = "socks5"',
            'action = "socks5" needs at least one destination (e.g. "*.example.com:443"): an empty list allows nothing - at `$.routes[0].destinations`',
        ),
        ('action = "socks5"\ndestinations = ["example.com"]', "- at `$.routes[0].destinations[0]`"),
        ('action = "http_connect"\ndestinations = ["*:443", "10.0.0.0/33:22"]', "- at `$.routes[0].destinations[1]`"),
        (
            'action = "socks5"\ndestinations = ["*:443"]\ntargets = ["127.0.0.1:22"]',
            'targets are not used with action = "socks5" connects where the client asks: list what it may reach in destinations - at `$.routes[0].targets`',
        ),
        ('action = "socks5"\ndestinations = ["*:443"]\ndomains = ["example.com"]', "- at `$.routes[0].domains`"),
        ('action = "socks5"\ndestinations = ["*:443"]\nbalance = "random"', "- at `$.routes[0].balance`"),
        ('action = "http_connect"\ndestinations = ["*:443"]\nwarm = 2', "- at `$.routes[0].warm`"),
        ('action = "http_connect"\ndestinations = ["*:443"]\n[routes.tls]\nmode = "passthrough"', "- at `$.routes[0].tls`"),
        ('action = "socks5"\ndestinations = ["*:443"]\nusers = [{ name = "a", password = "" }]', "user 'a': empty password - at `$.routes[0].users[0]`"),
        ('action = "socks5"\ndestinations = ["*:443"]\nusers = [{ name = "a", password = "env:TRIOFWD_TEST_UNSET_VARIABLE" }]', "- at `$.routes[0].users[0]`"),
        ('action = "socks5"\ndestinations = ["*:443"]\nusers = [{ name = "a", password = "scrypt$xx$yy" }]', "- at `$.routes[0].users[0]`"),
        (
            'action = "socks5"\ndestinations = ["*:443"]\nusers = [{ name = "a", password = "x" }, { name = "a", password = "y" }]',
            "user 'a' is listed twice (first at $.routes[0].users[0]) - at `$.routes[0].users[1].name`",
        ),
        ('action = "socks5"\ndestinations = ["*:443"]\nusers = [{ name = "a" }]', "Object missing required field `password` - at `$.routes[0].users[0]`"),
    ],
)
def test_dynamic_route_keys_are_checked_at_their_path(keys: str, expected: str) -> None:
    text = f'[[routes]]\nname = "p"\nports = [1080]\n{keys}\n'
    errors = _dynamic_errors(text)
    assert any(line.endswith(expected) for line in errors), errors


@pytest.mark.parametrize("action", ["forward", "reject"])
@pytest.mark.parametrize("key", ['destinations = ["*:443"]', 'users = [{ name = "a", password = "b" }]'])
def test_destinations_and_users_are_refused_on_other_actions(action: str, key: str) -> None:
    name = key.split()[0]
    errors = _dynamic_errors(f'[[routes]]\nname = "p"\nports = [1080]\ntargets = ["127.0.0.1:22"]\naction = "{action}"\n{key}\n')
    assert f'{name} is only used with action = "socks5" or "http_connect" - at `$.routes[0].{name}`' in errors, errors


def test_the_name_of_connections_no_route_took_is_reserved() -> None:
    """Stats, metrics and the status page count connections that ended before a route was
    chosen under "-": a route of that name would be counted twice."""
    from triofwd._stats import UNROUTED
    from triofwd._table import UNROUTED_NAME

    assert UNROUTED == UNROUTED_NAME
    config = Config(routes=[Route(name="-", ports=[1], action="reject")])
    with pytest.raises(ConfigError) as caught:
        compile_table(config)
    assert caught.value.errors == ["route name '-' is reserved: it stands for connections no route took (in stats, metrics and the status page) - at `$.routes[0].name`"]
