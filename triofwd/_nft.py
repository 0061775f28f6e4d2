"""nftables rules for offloaded routes: pure text generation plus a thin apply layer.

Routes with ``action = "offload"`` are forwarded by the kernel, not by
triofwd's event loop.  This module turns a list of :class:`OffloadRule` into
one ``nft -f -`` script that atomically (re)creates triofwd's own table, and
offers small synchronous helpers that run ``nft`` (the core calls them through
``trio.to_thread.run_sync``).

Layout of the generated table (family ``inet``, so one table serves IPv4 and
IPv6; every per-route object carries the route name after a fixed prefix)::

    table inet triofwd {
        counter route_<name>                   packets/bytes of the route's connections
        set ports_<name>                       listen ports (interval set)
        set targets_<name>                     target address . port pairs
        set allow_<name> / block_<name>        client_ips / block_ips (only if given)
        chain prerouting   nat, hook prerouting   DNAT of traffic arriving from outside
        chain output       nat, hook output       DNAT of locally generated traffic
        chain postrouting  nat, hook postrouting  masquerade unless preserve_source_ip
        chain count_in     filter, hook prerouting  counts packets received from interfaces
        chain count_out    filter, hook output      counts locally generated packets
    }

Design decisions:

* A rule's ``protocol`` ("tcp" or "udp") is the transport whose port it
  DNATs (``tcp dport`` / ``udp dport``, ``ct original protocol``); a TCP and a
  UDP route may claim the same port number.
* Several targets are balanced round-robin with ``numgen inc mod N map``.  The
  numgen counter belongs to the rule, so the ``prerouting`` and ``output``
  rules each rotate on their own.
* A connection belongs to a route when conntrack says it was DNATed
  (``ct status dnat``) from one of the route's listen ports (and bind address)
  to one of the route's targets.  Masquerade and the counter both use this
  match, so they never touch unrelated traffic, including other tables' DNAT.
* The counter counts every packet of the route's connections, both
  directions, exactly once: a packet either enters from an interface (seen in
  ``count_in``) or is generated locally (seen in ``count_out``); packets that
  loop back over ``lo`` would be seen twice, so ``count_in`` skips ``lo``.
  (A counter in the nat chains would only see the first packet of each
  connection.)
* ``block_ips`` and a non-empty ``client_ips`` drop the first packet (SYN) in
  the nat chains, so refused clients see a timeout like behind a firewall.
  ``drop`` is valid in nat chains on every kernel with inet nat, while
  ``reject`` in prerouting is not.  Entries of the other address family than
  the route's cannot match its traffic and are ignored.
* A bind of ``0.0.0.0`` / ``::`` means "any local address" (``fib daddr type
  local``), so forwarded traffic that merely passes through this host on the
  same port is left alone.  The bind address decides the route's family; a
  target of the other family is refused (nft cannot DNAT across families).
* DNAT of traffic arriving from outside to a 127.0.0.0/8 target needs
  ``net.ipv4.conf.<iface>.route_localnet=1`` and is impossible for ``::1``;
  triofwd does not change sysctls, local clients work regardless.
  With ``preserve_source_ip`` the target must route replies back via this host.
* Names and addresses are validated before any text is produced; nothing from
  a route is interpolated unless it matched a strict pattern or was
  re-rendered from an :mod:`ipaddress` object.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._addresses import IPAddress, IPNetwork, merge_ranges

__all__ = [
    "DEFAULT_TABLE",
    "NftError",
    "OffloadRule",
    "apply",
    "delete_table",
    "nft_available",
    "read_counters",
    "render_delete",
    "render_ruleset",
    "validate_rule",
]

DEFAULT_TABLE = "triofwd"
TABLE_FAMILY = "inet"
NFT_BINARY = "nft"
# nft normally answers in milliseconds; a hung nft must not hang the forwarder.
NFT_TIMEOUT_S = 10.0

# Route names become part of nft object names, which nft's scanner reads
# unquoted; the prefixes below start with a letter, so any name from this
# charset yields a valid nft identifier and never a keyword.
ROUTE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")  # the route table's too; use fullmatch ("$" lets a final "\n" through)
TABLE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
# Every rendered address must consist of these characters only (a last line
# of defence behind ipaddress; IPv6 zone indexes like "%eth0" are refused).
SAFE_ADDRESS_RE = re.compile(r"[0-9A-Fa-f:./]+")

COUNTER_PREFIX = "route_"
PORTS_SET_PREFIX = "ports_"
TARGETS_SET_PREFIX = "targets_"
ALLOW_SET_PREFIX = "allow_"
BLOCK_SET_PREFIX = "block_"

# Chain priorities, numeric because the symbolic names (dstnat, srcnat) are
# not accepted for every hook by older nft releases.
PRIORITY_DSTNAT = -100
PRIORITY_SRCNAT = 100
# Counting must run after DNAT so that new connections already carry
# ct status dnat.
PRIORITY_COUNT = 0

PORT_MIN = 1
PORT_MAX = 65535
INDENT = "\t"


class NftError(ValueError):
    """Input refused before nft ran, or nft itself failed (message says which)."""


@dataclass(frozen=True)
class OffloadRule:
    """One offloaded route, independent of the rest of triofwd's config.

    ``listen_ports`` items are single ports or inclusive ``(low, high)``
    ranges; overlaps and adjacent ports are merged.  ``bind`` is an IP
    literal, ``"0.0.0.0"`` / ``"::"`` meaning any local address of that
    family.  ``targets`` are ``(ip_literal, port)`` pairs, balanced
    round-robin when there are several.  ``client_ips`` (empty = everyone)
    and ``block_ips`` are CIDRs (a bare address means a single host).
    """

    name: str
    listen_ports: tuple[int | tuple[int, int], ...]
    bind: str
    targets: tuple[tuple[str, int], ...]
    client_ips: tuple[str, ...] = ()
    block_ips: tuple[str, ...] = ()
    preserve_source_ip: bool = False
    protocol: str = "tcp"  # or "udp": which transport's port the rules DNAT


PROTOCOLS = ("tcp", "udp")


@dataclass(frozen=True)
class _Route:
    """A validated rule in canonical form, ready to render."""

    name: str
    version: int  # 4 or 6
    bind: IPAddress | None  # None: any local address
    ports: tuple[tuple[int, int], ...]
    targets: tuple[tuple[IPAddress, int], ...]
    allow: tuple[IPNetwork, ...] | None  # None: everyone allowed
    block: tuple[IPNetwork, ...]
    masquerade: bool
    protocol: str = "tcp"


# ---------------------------------------------------------------- validation


def _check_name(name: object) -> str:
    if not isinstance(name, str) or ROUTE_NAME_RE.fullmatch(name) is None:
        raise NftError(f"route name {name!r} is invalid: expected 1-63 characters from A-Z a-z 0-9 _ . -")
    return name


def _check_table(table: object) -> str:
    if not isinstance(table, str) or TABLE_NAME_RE.fullmatch(table) is None:
        raise NftError(f"table name {table!r} is invalid: expected a letter then up to 31 of A-Z a-z 0-9 _")
    return table


def _is_port(value: object) -> bool:
    # bool is an int subclass; True must not quietly mean port 1.
    return type(value) is int and PORT_MIN <= value <= PORT_MAX


def _parse_address(name: str, what: str, value: object, hint: str = "") -> IPAddress:
    if isinstance(value, str) and "%" not in value:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            if SAFE_ADDRESS_RE.fullmatch(str(address)):
                return address
    raise NftError(f"route {name!r}: {what} {value!r} is not an IP address literal{hint}")


def _parse_networks(name: str, field: str, values: object) -> list[IPNetwork]:
    if not isinstance(values, (tuple, list)):
        raise NftError(f"route {name!r}: {field} must be a sequence of CIDR strings")
    networks = []
    for value in values:
        network = None
        if isinstance(value, str) and "%" not in value:
            try:
                # strict=False: "10.0.0.1/24" means the network 10.0.0.0/24,
                # as the proxy path reads it.
                network = ipaddress.ip_network(value, strict=False)
            except ValueError:
                pass
        if network is None or SAFE_ADDRESS_RE.fullmatch(str(network)) is None:
            raise NftError(f"route {name!r}: {field} entry {value!r} is not a valid CIDR")
        networks.append(network)
    return networks


def _merge_ports(name: str, values: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(values, (tuple, list)) or not values:
        raise NftError(f"route {name!r}: listen_ports must list at least one port")
    ranges = []
    for value in values:
        if _is_port(value):
            ranges.append((value, value))
        elif isinstance(value, (tuple, list)) and len(value) == 2 and _is_port(value[0]) and _is_port(value[1]) and value[0] <= value[1]:
            ranges.append((value[0], value[1]))
        else:
            raise NftError(f"route {name!r}: listen port {value!r} is neither a port in 1-65535 nor an ordered (low, high) pair of such ports")
    # Merge overlapping and adjacent ranges: nft refuses overlapping
    # intervals in a set, and merged text is canonical.
    return merge_ranges(ranges)


def _family_word(version: int) -> str:
    return "IPv4" if version == 4 else "IPv6"


def _normalize(rule: OffloadRule) -> _Route:
    """Validate ``rule`` and return its canonical form, or raise NftError."""
    name = _check_name(rule.name)
    bind = _parse_address(name, "bind", rule.bind)
    version = bind.version
    ports = _merge_ports(name, rule.listen_ports)

    if not isinstance(rule.targets, (tuple, list)) or not rule.targets:
        raise NftError(f"route {name!r}: offload needs at least one target")
    targets = []
    for target in rule.targets:
        if not isinstance(target, (tuple, list)) or len(target) != 2:
            raise NftError(f"route {name!r}: target {target!r} is not a (host, port) pair")
        host, port = target
        address = _parse_address(name, "target host", host, " (hostnames cannot be offloaded)")
        if address.is_unspecified or address.is_multicast:
            raise NftError(f"route {name!r}: target host {host!r} is not a unicast address")
        if address.version != version:
            raise NftError(f"route {name!r}: target host {host!r} is {_family_word(address.version)} but bind {rule.bind!r} is {_family_word(version)}")
        if not _is_port(port):
            raise NftError(f"route {name!r}: target port {port!r} is not in 1-65535")
        targets.append((address, port))
    if len(set(targets)) != len(targets):
        raise NftError(f"route {name!r}: targets contain duplicates")

    allow_all = _parse_networks(name, "client_ips", rule.client_ips)
    block_all = _parse_networks(name, "block_ips", rule.block_ips)
    allow: tuple[IPNetwork, ...] | None = None
    if allow_all:
        allow = _collapse(net for net in allow_all if net.version == version)
        if not allow:
            raise NftError(f"route {name!r}: client_ips has no {_family_word(version)} entry, so every client would be refused")
    block = _collapse(net for net in block_all if net.version == version)

    if type(rule.preserve_source_ip) is not bool:
        raise NftError(f"route {name!r}: preserve_source_ip must be true or false")
    if rule.protocol not in PROTOCOLS:
        raise NftError(f"route {name!r}: protocol {rule.protocol!r} is neither tcp nor udp")

    return _Route(
        name=name,
        version=version,
        bind=None if bind.is_unspecified else bind,
        ports=ports,
        targets=tuple(targets),
        allow=allow,
        block=block,
        masquerade=not rule.preserve_source_ip,
        protocol=rule.protocol,
    )


def _collapse(networks: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    # nft refuses overlapping intervals in a set; collapsing also makes the
    # output canonical.  All networks here share one family.
    return tuple(ipaddress.collapse_addresses(list(networks)))  # type: ignore[type-var]  # one family: see above


def _check_overlaps(routes: Sequence[_Route]) -> None:
    """Refuse two routes that would DNAT the same (address, port)."""
    seen: dict[str, _Route] = {}
    for route in routes:
        if route.name in seen:
            raise NftError(f"route {route.name!r} appears more than once")
        seen[route.name] = route
    for i, first in enumerate(routes):
        for second in routes[i + 1 :]:
            if first.version != second.version or first.protocol != second.protocol:
                continue
            if first.bind is not None and second.bind is not None and first.bind != second.bind:
                continue
            for low1, high1 in first.ports:
                for low2, high2 in second.ports:
                    if low1 <= high2 and low2 <= high1:
                        port = max(low1, low2)
                        raise NftError(
                            f"routes {first.name!r} and {second.name!r} both claim {_family_word(first.version)} {'UDP ' if first.protocol == 'udp' else ''}port {port}"
                        )


def validate_rule(rule: OffloadRule) -> None:
    """Raise :class:`NftError` naming the route and value if ``rule`` cannot be offloaded."""
    _normalize(rule)


def _checked(rules: Sequence[OffloadRule]) -> list[_Route]:
    routes = [_normalize(rule) for rule in rules]
    _check_overlaps(routes)
    return routes


def check_rules(rules: Sequence[OffloadRule]) -> None:
    """Raise :class:`NftError` if the rules cannot be installed together (what
    :func:`render_ruleset` refuses), without rendering them."""
    _checked(rules)


# ----------------------------------------------------------------- rendering


def _port_text(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _endpoint_text(address: IPAddress, port: int) -> str:
    return f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"


def _elements(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _set_lines(name: str, type_: str, elements: Iterable[str], interval: bool) -> list[str]:
    lines = [f"{INDENT}set {name} {{", f"{INDENT * 2}type {type_}"]
    if interval:
        lines.append(f"{INDENT * 2}flags interval")
    lines += [f"{INDENT * 2}elements = {_elements(elements)}", f"{INDENT}}}"]
    return lines


def _route_sets(route: _Route) -> list[tuple[str, str, list[str], bool]]:
    """The route's named sets: (name, type, elements, interval flag)."""
    addr_type = "ipv4_addr" if route.version == 4 else "ipv6_addr"
    sets = [
        (PORTS_SET_PREFIX + route.name, "inet_service", [_port_text(low, high) for low, high in route.ports], True),
        (TARGETS_SET_PREFIX + route.name, f"{addr_type} . inet_service", [f"{address} . {port}" for address, port in route.targets], False),
    ]
    if route.allow is not None:
        sets.append((ALLOW_SET_PREFIX + route.name, addr_type, [str(n) for n in route.allow], True))
    if route.block:
        sets.append((BLOCK_SET_PREFIX + route.name, addr_type, [str(n) for n in route.block], True))
    return sets


def _route_objects(route: _Route) -> list[str]:
    """Counter and named sets of one route."""
    lines = [f"{INDENT}counter {COUNTER_PREFIX}{route.name} {{", f"{INDENT}}}"]
    for name, type_, elements, interval in _route_sets(route):
        lines += _set_lines(name, type_, elements, interval)
    return lines


def _ip_keywords(version: int) -> tuple[str, str]:
    """(nfproto value, address family keyword) for an IP version."""
    return ("ipv4", "ip") if version == 4 else ("ipv6", "ip6")


def _dnat_rules(route: _Route) -> list[str]:
    """Rules for the prerouting and output nat chains (same text for both)."""
    nfproto, ip = _ip_keywords(route.version)
    if route.bind is None:
        destination = "fib daddr type local"
    else:
        destination = f"{ip} daddr {route.bind}"
    select = f"meta nfproto {nfproto} {destination} {route.protocol} dport @{PORTS_SET_PREFIX}{route.name}"
    rules = []
    if route.block:
        rules.append(f"{select} {ip} saddr @{BLOCK_SET_PREFIX}{route.name} drop")
    if route.allow is not None:
        rules.append(f"{select} {ip} saddr != @{ALLOW_SET_PREFIX}{route.name} drop")
    if len(route.targets) == 1:
        address, port = route.targets[0]
        rules.append(f"{select} dnat {ip} to {_endpoint_text(address, port)}")
    else:
        mapping = _elements(f"{index} : {address} . {port}" for index, (address, port) in enumerate(route.targets))
        rules.append(f"{select} dnat {ip} to numgen inc mod {len(route.targets)} map {mapping}")
    return rules


def _connection_match(route: _Route) -> str:
    """Match every packet (both directions) of a connection this route DNATed."""
    nfproto, ip = _ip_keywords(route.version)
    # "ct original protocol tcp" (or udp) gives nft the context it needs to type
    # ct original proto-dst / ct reply proto-src.
    parts = [f"meta nfproto {nfproto} ct original protocol {route.protocol} ct status dnat"]
    if route.bind is not None:
        parts.append(f"ct original {ip} daddr {route.bind}")
    parts.append(f"ct original proto-dst @{PORTS_SET_PREFIX}{route.name}")
    parts.append(f"ct reply {ip} saddr . ct reply proto-src @{TARGETS_SET_PREFIX}{route.name}")
    return " ".join(parts)


def _chain_lines(name: str, type_: str, hook: str, priority: int, rules: list[str]) -> list[str]:
    return (
        [
            f"{INDENT}chain {name} {{",
            f"{INDENT * 2}type {type_} hook {hook} priority {priority}; policy accept;",
        ]
        + [INDENT * 2 + rule for rule in rules]
        + [f"{INDENT}}}"]
    )


CHAINS = ("prerouting", "output", "postrouting", "count_in", "count_out")


def render_ruleset(rules: Sequence[OffloadRule], table: str = DEFAULT_TABLE, previous: Sequence[OffloadRule] | None = None) -> str:
    """Return the ``nft -f -`` script that atomically gives ``table`` exactly ``rules``.

    Without ``previous``, the script creates the table if missing, deletes it and
    defines it in full, so a stale table (e.g. left by a crash) is replaced.
    With ``previous`` (non-empty: the rules this process installed last), the
    table is updated in place: its chains stay hooked and are flushed and
    refilled, so are the sets that keep their definition (others are deleted
    and defined anew), and the counters of routes that remain keep counting.
    Deleting a hooked chain or a set in use and creating it again, even in one
    transaction, lets a packet through now and then (a SYN not DNATed: about
    1 in 150 reloads here); flushing and refilling did not.  nft applies the
    file as one transaction either way.  Deterministic: equal input gives equal
    text.  Raises :class:`NftError` on any invalid rule or on two routes
    claiming the same port.  With no rules the table is left empty (no hooks).
    """
    table = _check_table(table)
    routes = _checked(rules)

    head = f"table {TABLE_FAMILY} {table}"
    if previous and routes:
        old = [_normalize(rule) for rule in previous]
        kept = {route.name for route in routes}
        # A set defined alike before and after is flushed and refilled (the same object
        # throughout); one that is gone or changes type is deleted (after the rules using it).
        wanted = {name: (type_, interval) for route in routes for name, type_, _, interval in _route_sets(route)}
        lines = ["# generated by triofwd; updated in place: chains and sets flushed and refilled", head]
        lines += [f"flush chain {TABLE_FAMILY} {table} {chain}" for chain in CHAINS]
        for route in old:
            for name, type_, _, interval in _route_sets(route):
                verb = "flush" if wanted.get(name) == (type_, interval) else "delete"
                lines.append(f"{verb} set {TABLE_FAMILY} {table} {name}")
        lines += [f"delete counter {TABLE_FAMILY} {table} {COUNTER_PREFIX}{route.name}" for route in old if route.name not in kept]
        lines.append(head + " {")
    else:
        lines = [
            "# generated by triofwd; replaced as a whole on every change",
            head,
            f"delete {head}",
            head + " {",
        ]
    if routes:
        body: list[list[str]] = [_route_objects(route) for route in routes]
        dnat = [rule for route in routes for rule in _dnat_rules(route)]
        masquerade = [
            # Not toward lo: a loopback-to-loopback connection has no other source address
            # to take, and masquerading it drops the SYN on a host with only loopback.
            f'oif != "lo" {_connection_match(route)} masquerade'
            for route in routes
            if route.masquerade
        ]
        count_in = [f'iif != "lo" {_connection_match(route)} counter name "{COUNTER_PREFIX}{route.name}"' for route in routes]
        count_out = [f'{_connection_match(route)} counter name "{COUNTER_PREFIX}{route.name}"' for route in routes]
        body += [
            _chain_lines("prerouting", "nat", "prerouting", PRIORITY_DSTNAT, dnat),
            _chain_lines("output", "nat", "output", PRIORITY_DSTNAT, dnat),
            _chain_lines("postrouting", "nat", "postrouting", PRIORITY_SRCNAT, masquerade),
            _chain_lines("count_in", "filter", "prerouting", PRIORITY_COUNT, count_in),
            _chain_lines("count_out", "filter", "output", PRIORITY_COUNT, count_out),
        ]
        for index, block in enumerate(body):
            if index:
                lines.append("")
            lines += block
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_delete(table: str = DEFAULT_TABLE) -> str:
    """Return the ``nft -f -`` script that removes ``table``; succeeds if it is absent."""
    head = f"table {TABLE_FAMILY} {_check_table(table)}"
    # Declaring the table first makes the delete idempotent in one transaction.
    return f"{head}\ndelete {head}\n"


# ----------------------------------------------------------------- apply layer


def _run_nft(args: list[str], binary: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run nft with list arguments (never a shell); raise NftError if it cannot start."""
    try:
        return subprocess.run(
            [binary, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise NftError(f"nft binary {binary!r} not found") from None
    except PermissionError:
        raise NftError(f"nft binary {binary!r} is not executable") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"nft {' '.join(args)} timed out after {NFT_TIMEOUT_S:g}s") from None


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else "no error output"


def nft_available(*, binary: str = NFT_BINARY) -> str | None:
    """Return None if nft can be used here, else a one-line reason.

    Probes with ``nft list tables``, which needs the binary and
    CAP_NET_ADMIN in the current network namespace.
    """
    try:
        result = _run_nft(["list", "tables"], binary)
    except NftError as exc:
        return str(exc)
    if result.returncode == 0:
        return None
    detail = _first_line(result.stderr)
    if "Operation not permitted" in result.stderr or "Permission denied" in result.stderr:
        return f"nft permission denied (needs root or CAP_NET_ADMIN): {detail}"
    return f"nft list tables failed: {detail}"


def apply(text: str, *, binary: str = NFT_BINARY) -> None:
    """Feed ``text`` to ``nft -f -`` as one transaction; raise NftError with nft's stderr."""
    result = _run_nft(["-f", "-"], binary, stdin=text)
    if result.returncode != 0:
        raise NftError(f"nft -f - failed (exit {result.returncode}): {result.stderr.strip()}")


def delete_table(table: str = DEFAULT_TABLE, *, binary: str = NFT_BINARY) -> None:
    """Remove ``table``; no error if it does not exist."""
    apply(render_delete(table), binary=binary)


def read_counters(table: str = DEFAULT_TABLE, *, binary: str = NFT_BINARY) -> dict[str, tuple[int, int]]:
    """Return route name -> (packets, bytes) from the table's route counters.

    Raises NftError if nft fails (e.g. the table does not exist) or its JSON
    is not understood.
    """
    table = _check_table(table)
    result = _run_nft(["-j", "list", "counters", "table", TABLE_FAMILY, table], binary)
    if result.returncode != 0:
        raise NftError(f"nft list counters failed (exit {result.returncode}): {result.stderr.strip()}")
    try:
        items = json.loads(result.stdout)["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise NftError(f"cannot parse nft JSON output: {exc}") from None
    counters: dict[str, tuple[int, int]] = {}
    for item in items:
        counter = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(counter, dict):
            continue  # metainfo and anything else nft may add
        name = counter.get("name")
        if counter.get("table") != table or not isinstance(name, str):
            continue
        if not name.startswith(COUNTER_PREFIX):
            continue
        packets, size = counter.get("packets"), counter.get("bytes")
        if type(packets) is not int or type(size) is not int:
            raise NftError(f"counter {name!r} has no integer packets/bytes in nft JSON")
        counters[name[len(COUNTER_PREFIX) :]] = (packets, size)
    return counters
