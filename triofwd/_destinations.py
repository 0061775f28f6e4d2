"""The destination allow-list of `socks5` and `http_connect` routes: parsing and matching.

Pure code: no I/O, no DNS. The caller resolves names itself; this module says what may be
asked for (:meth:`Destinations.allows_name`, before resolution) and what may be dialled
(:meth:`Destinations.allows_address`, for every resolved address, after).

Entry syntax, ``HOST:PORTS``:

- ``HOST`` is one of
  - an IPv4 address or CIDR: ``"192.0.2.7:443"``, ``"10.0.0.0/8:443"``;
  - an IPv6 address or CIDR in brackets: ``"[2001:db8::/32]:443"``, ``"[::1]:22"``
    (brackets always, so the colons of the address never mix with the port's);
  - an exact name: ``"db.internal:5432"`` (ASCII; IDNs as ``xn--`` A-labels; case and a
    trailing dot do not matter);
  - a name pattern ``"*.example.com:443"``: any name *below* example.com, at any depth
    (``a.example.com``, ``a.b.example.com``), not example.com itself. (Route `domains`
    match one label only, as TLS certificates do; an allow-list names a zone.)
  - ``"*"``: any name and any address, e.g. ``"*:443"`` is "the internet on port 443".
- ``PORTS`` is required: ``"443"``, a range ``"8000-8100"``, ``"*"`` (1-65535), or a comma
  list of those, ``"80,443,8000-8100"``.

The rules, in the order they apply:

1. A *name* is allowed when an exact entry, a pattern or ``*`` matches it with the port. A
   CIDR entry never allows a name: clients that send names need name entries (or ``*``).
   An IP *literal* (what a client sends as an address, or as a name that is an address) is
   checked as an address, rule 2, without a name.
2. Every *address* a name resolves to is checked again, and only the addresses that pass
   may be dialled: resolving once and dialling what was checked is what keeps DNS
   rebinding out. Addresses in these ranges are denied by default:

   ============  =========================================================================
   unspecified   0.0.0.0/8, ::              (connecting to 0.0.0.0 reaches this host)
   loopback      127.0.0.0/8, ::1
   link-local    169.254.0.0/16, fe80::/10  (cloud metadata endpoints live here)
   private       10/8, 172.16/12, 192.168/16, 100.64.0.0/10 (CGNAT), fc00::/7 (ULA),
                 fec0::/10 (site-local)
   multicast     224.0.0.0/4, ff00::/8
   reserved      240.0.0.0/4 (with 255.255.255.255), ::/96 (IPv4-compatible)
   own           the forwarder's own listening addresses, given to
                 :func:`compile_destinations`
   ============  =========================================================================

   IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64
   ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by that IPv4 address, and CIDR entries
   match either form.
3. A default-denied address is allowed only when it is *listed explicitly*: a CIDR entry
   with the port whose network lies within the denied range (``10.0.0.0/8``,
   ``10.1.2.3/32`` lift the deny on 10.1.2.3; ``0.0.0.0/0`` does not: "everything" is not
   an explicit listing of loopback). An own address needs its exact ``/32`` or ``/128``.
4. An *exact name* entry counts as an explicit listing of the **private** addresses that
   name resolves to: an operator who writes ``"db.internal:5432"`` means the internal
   database, and having to repeat its address as a CIDR (and keep the two in step) is not
   what anyone expects. Loopback, link-local, unspecified, multicast, reserved and own
   addresses still need a CIDR entry even then: no name should lead there unannounced, and
   that is where rebinding attacks aim. Patterns and ``*`` get no such trust: what
   ``*.example.com`` resolves to is not the operator's to vouch for.

An empty list allows nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from ._addresses import IPAddress, IPNetwork, merge_ranges

__all__ = [
    "Destination",
    "Destinations",
    "address_class",
    "compile_destinations",
    "normalize_host",
    "parse_authority",
    "parse_destination",
    "parse_port_spec",
]

MIN_PORT = 1
MAX_PORT = 65535
#: DNS limits (RFC 1035 §2.3.4) for the text form without a trailing dot.
MAX_NAME_CHARS = 253
#: Letters, digits, hyphen; underscore too, as real zones use it (_dmarc, srv labels).
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")

_net = ipaddress.ip_network
#: Denied unless listed explicitly (rule 3), most specific first: "::" and "::1" before
#: the IPv4-compatible ::/96 they sit in.
DEFAULT_DENY: tuple[tuple[str, IPNetwork], ...] = (
    ("unspecified", _net("0.0.0.0/8")),
    ("loopback", _net("127.0.0.0/8")),
    ("link-local", _net("169.254.0.0/16")),
    ("private", _net("10.0.0.0/8")),
    ("private", _net("172.16.0.0/12")),
    ("private", _net("192.168.0.0/16")),
    ("private", _net("100.64.0.0/10")),
    ("multicast", _net("224.0.0.0/4")),
    ("reserved", _net("240.0.0.0/4")),
    ("unspecified", _net("::/128")),
    ("loopback", _net("::1/128")),
    ("reserved", _net("::/96")),
    ("link-local", _net("fe80::/10")),
    ("private", _net("fc00::/7")),
    ("private", _net("fec0::/10")),
    ("multicast", _net("ff00::/8")),
)
#: The classes an exact name entry vouches for (rule 4).
NAME_TRUSTED_CLASSES = frozenset({"private"})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

Kind = Literal["network", "name", "suffix", "any"]
PortRanges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Destination:
    """One parsed allow-list entry."""

    #: The entry as written, for messages.
    text: str
    #: "network" (CIDR or address), "name" (exact), "suffix" ("*.example.com") or "any" ("*").
    kind: Kind
    #: The ports, as sorted, merged, inclusive ``(low, high)`` ranges.
    ports: PortRanges
    network: IPNetwork | None = None
    #: The exact name, or for a suffix the zone without "*." ("example.com").
    name: str | None = None

    def allows_port(self, port: int) -> bool:
        return any(low <= port <= high for low, high in self.ports)

    def matches_name(self, name: str) -> bool:
        """Whether this entry allows the normalized ``name`` (any port)."""
        if self.kind == "any":
            return True
        if self.kind == "name":
            return name == self.name
        if self.kind == "suffix":
            return self.name is not None and name.endswith("." + self.name)
        return False


# --- Parsing -----------------------------------------------------------------------


def parse_port_spec(text: str) -> PortRanges:
    """Ports for "443", "8000-8100", "*" or a comma list of those; ValueError otherwise."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        if part == "*":
            ranges.append((MIN_PORT, MAX_PORT))
            continue
        low, dash, high = part.partition("-")
        if not _is_port(low) or (dash and not _is_port(high)):
            raise ValueError(f'invalid ports {text!r}: expected a port, LOW-HIGH or "*" (comma-separated), each within 1-65535')
        first, last = int(low), int(high) if dash else int(low)
        if first > last:
            raise ValueError(f"invalid ports {text!r}: range {part!r} runs backwards")
        ranges.append((first, last))
    return merge_ranges(ranges)


def _is_port(text: str) -> bool:
    # isdigit() alone would let "²" and other Unicode digits through.
    return text.isascii() and text.isdigit() and len(text) <= 5 and MIN_PORT <= int(text) <= MAX_PORT


def parse_destination(text: str) -> Destination:
    """One allow-list entry ("10.0.0.0/8:443", "[2001:db8::/32]:443", "db.internal:5432",
    "*.example.com:443", "*:443"); ValueError with what is wrong otherwise."""
    entry = text.strip()
    if entry.startswith("["):
        host, sep, ports = entry[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid destination {text!r}: expected [IPv6 address or CIDR]:PORTS, e.g. [2001:db8::/32]:443")
        network = _parse_network(host, text)
        if network is None or (network.version == 4 and ":" not in host):
            raise ValueError(f"invalid destination {text!r}: brackets are for IPv6 only, {host!r} is not an IPv6 address or CIDR")
        return Destination(text=text, kind="network", ports=_ports(ports, text), network=network)
    host, sep, ports = entry.rpartition(":")
    if not sep or not host:
        raise ValueError(
            f'invalid destination {text!r}: expected HOST:PORTS, e.g. "10.0.0.0/8:443", "db.internal:5432" or "*.example.com:443" (ports are required: ":*" for any)'
        )
    if ":" in host:
        raise ValueError(f"invalid destination {text!r}: write an IPv6 address or CIDR in brackets, e.g. [2001:db8::/32]:443")
    port_ranges = _ports(ports, text)
    if host == "*":
        return Destination(text=text, kind="any", ports=port_ranges)
    if host.startswith("*."):
        zone = _entry_name(host[2:], text)
        return Destination(text=text, kind="suffix", ports=port_ranges, name=zone)
    if "*" in host:
        raise ValueError(f'invalid destination {text!r}: a wildcard is "*" alone or "*." at the start of a name')
    network = _parse_network(host, text)
    if network is not None:
        return Destination(text=text, kind="network", ports=port_ranges, network=network)
    return Destination(text=text, kind="name", ports=port_ranges, name=_entry_name(host, text))


def _ports(spec: str, entry: str) -> PortRanges:
    try:
        return parse_port_spec(spec)
    except ValueError as exc:
        raise ValueError(f"invalid destination {entry!r}: {exc}") from None


def _parse_network(host: str, entry: str) -> IPNetwork | None:
    """The network for an address or CIDR; None when ``host`` is not one (a name)."""
    if "/" not in host and not _looks_numeric(host):
        return None
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        raise ValueError(f"invalid destination {entry!r}: {host!r} is not an address or CIDR") from None
    # "[::ffff:10.0.0.0/104]" names IPv4 addresses: keep it as the IPv4 network, which is
    # what the addresses it should match are unwrapped to.
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _looks_numeric(host: str) -> bool:
    # A host that is all digits and dots is meant as an address (and a bad one, such as
    # "10.0.0.256", is an error, not a name); anything with ":" is IPv6.
    return ":" in host or all(c.isdigit() or c == "." for c in host)


def _entry_name(name: str, entry: str) -> str:
    try:
        return _dns_name(name)
    except ValueError as exc:
        raise ValueError(f"invalid destination {entry!r}: {exc}") from None


def _dns_name(text: str) -> str:
    name = text.lower()
    # A trailing dot (fully qualified) names the same host.
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        raise ValueError(f"{text!r} is not an ASCII host name (write an IDN as its xn-- form)")
    if not 0 < len(name) <= MAX_NAME_CHARS or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{text!r} is not a host name")
    return name


def normalize_host(text: str) -> str:
    """A destination host as a client names it, in one canonical form: a DNS name
    lower-cased without its trailing dot, or an IP address in canonical text (IPv6 without
    brackets or scope). ValueError when it is neither."""
    if "%" in text:
        # A zone ("fe80::1%eth0") picks one of this host's interfaces: not the client's to choose.
        raise ValueError(f"{text!r}: an address with a zone is not a destination")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv6 address") from None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    return _dns_name(text)


def parse_authority(text: str) -> tuple[str, int]:
    """(host, port) for the authority form of a CONNECT target: "example.com:443",
    "192.0.2.7:443", "[2001:db8::1]:443". The port is required (RFC 9110 §9.3.6)."""
    if text.startswith("["):
        host, sep, port = text.partition("]:")
        host += "]"
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: an IPv6 address must be in brackets, e.g. [2001:db8::1]:443")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= MAX_PORT):
        raise ValueError(f"{text!r}: port must be 0-65535")
    return normalize_host(host), int(port)


# --- Addresses ---------------------------------------------------------------------


def _ip(address: str | IPAddress) -> IPAddress:
    # getaddrinfo gives link-local IPv6 with a scope ("fe80::1%eth0"): the scope does not
    # change which address it is.
    return ipaddress.ip_address(str(address).partition("%")[0])


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms that do."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _judged(ip: IPAddress) -> IPAddress:
    """The address the default deny judges: the IPv4 one an IPv6 form carries, if any."""
    return _embedded_ipv4(ip) or ip


def _deny_range(ip: IPAddress) -> tuple[str, IPNetwork] | None:
    judged = _judged(ip)
    for name, network in DEFAULT_DENY:
        if network.version == judged.version and judged in network:
            return name, network
    return None


def address_class(address: str | IPAddress) -> str | None:
    """Which default-denied range an address is in ("loopback", "private", ...), or None
    for an ordinary public address. IPv6 forms of IPv4 addresses are judged as IPv4."""
    found = _deny_range(_ip(address))
    return found[0] if found else None


def _within(network: IPNetwork, outer: IPNetwork) -> bool:
    return network.version == outer.version and network.subnet_of(outer)  # type: ignore[arg-type]


def _covers(network: IPNetwork, ip: IPAddress) -> bool:
    return network.version == ip.version and ip in network


# --- The compiled matcher ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destinations:
    """A compiled allow-list: one per route, made once per start or reload."""

    entries: tuple[Destination, ...]
    #: The forwarder's own listening addresses, as (ip, port).
    own: frozenset[tuple[IPAddress, int]] = frozenset()

    def allows_name(self, host: str, port: int) -> bool:
        """Before resolution: whether a client may ask for ``host`` (a name or an IP
        literal, as :func:`normalize_host` gives it) on ``port``. An IP literal is judged
        as :meth:`allows_address` judges it; a name's addresses still have to pass
        :meth:`allows_address` once resolved."""
        try:
            literal = _ip(host)
        except ValueError:
            return bool(self._name_entries(host, port))
        return self.why_denied(literal, port, via_name=None) is None

    def allows_address(self, address: str | IPAddress, port: int, *, via_name: str | None) -> bool:
        """After resolution: whether ``address`` may be dialled on ``port``. ``via_name``
        is the name it was resolved from, or None when the client gave the address itself.
        Check every resolved address and dial only those that pass."""
        return self.why_denied(address, port, via_name=via_name) is None

    def why_denied(self, address: str | IPAddress, port: int, *, via_name: str | None) -> str | None:
        """None when :meth:`allows_address` would allow it, otherwise why not, for logs."""
        ip = _ip(address)
        judged = _judged(ip)
        shown = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        covering = [e.network for e in self.entries if e.network is not None and e.allows_port(port) and (_covers(e.network, ip) or _covers(e.network, judged))]
        if self._is_own(judged, port):
            host = ipaddress.ip_network(judged)
            if not any(_within(network, host) for network in covering):
                return f"{shown} is one of the forwarder's own listening addresses"
        denied = _deny_range(ip)
        if denied is not None:
            name, deny_range = denied
            if any(_within(network, deny_range) for network in covering):
                return None
            if via_name is not None and name in NAME_TRUSTED_CLASSES and any(e.kind == "name" for e in self._name_entries(via_name, port)):
                return None
            return f"{shown} is {name} and no entry lists it"
        if covering:
            return None
        if via_name is None:
            if any(e.kind == "any" and e.allows_port(port) for e in self.entries):
                return None
            return f"{shown} is not in the allowed destinations"
        if self._name_entries(via_name, port):
            return None
        return f"{via_name}:{port} is not in the allowed destinations"

    def with_own(self, addresses: Iterable[tuple[str, int]]) -> Destinations:
        """The same list with more of the forwarder's own addresses: a listener on port 0
        has its port only once it is bound."""
        return replace(self, own=self.own | {(_judged(_ip(ip)), port) for ip, port in addresses})

    def _name_entries(self, name: str, port: int) -> list[Destination]:
        try:
            name = _dns_name(name)
        except ValueError:
            return []
        return [e for e in self.entries if e.allows_port(port) and e.matches_name(name)]

    def _is_own(self, ip: IPAddress, port: int) -> bool:
        if (ip, port) in self.own:
            return True
        # A listener on 0.0.0.0 or :: is reached through every local address; those this
        # module can know without asking the host are loopback and unspecified. (A caller
        # may pass the host's interface addresses as well.)
        if address_class(ip) in ("loopback", "unspecified"):
            return any(own_port == port and own_ip.is_unspecified and (own_ip.version == ip.version or own_ip.version == 6) for own_ip, own_port in self.own)
        return False


def compile_destinations(entries: Iterable[str], *, own_addresses: Iterable[tuple[str, int]] = ()) -> Destinations:
    """Parse a route's `destinations` into a matcher. ``own_addresses`` are the
    forwarder's listening (ip, port) pairs, denied as destinations (rule 3). Raises
    ValueError naming the first bad entry."""
    own = frozenset((_judged(_ip(ip)), port) for ip, port in own_addresses)
    return Destinations(entries=tuple(parse_destination(text) for text in entries), own=own)
