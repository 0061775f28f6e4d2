"""A route's targets while it serves: balancing, health, warm connections.

The forwarder keeps one RouteTargets per route that dials targets (forward, bridge).
The dial asks it for an order of usable targets and reports every outcome back;
its background task (only when the route asks for health checks or warm sockets)
runs one checker and one warm-pool filler per target, inside a scope the forwarder
cancels at reload or shutdown. A target whose address survives a reload keeps its
Target object, so its health, circuit and warm sockets go on as they were.

With worker processes the checks run once per target, in the supervisor (a registry
without warm pools, `warm=False`); each worker's registry runs none and follows the
supervisor's verdicts (`verdicts=`, then `follow`). The circuit breaker and the warm
pools stay in each worker: they are about the connections that worker makes.
"""

from __future__ import annotations

import collections
import errno
import logging
import select
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from ._addresses import format_address
from ._balance import Balancer
from ._connect import connect_failed, connect_failure, literal_family, open_target
from ._health import CheckPolicy, Circuit, TargetHealth
from ._reasons import Reason

if TYPE_CHECKING:
    from ._table import CompiledRoute

__all__ = ["RouteTargets", "Target", "TargetRegistry", "probe"]

log = logging.getLogger("triofwd.targets")

# A warm socket older than this is replaced, not handed out: targets close idle
# connections of their own accord (HTTP servers after a minute or so).
WARM_MAX_AGE = 30.0
# How often a full warm pool is looked over for sockets the target closed; also the wait
# after a warm connect fails, or while the target may not be used.
WARM_RETRY = 1.0
# How much of a health check's reply is searched for `expect`.
EXPECT_WINDOW = 65536

_HUNG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


def alive(sock: socket.socket) -> bool:
    """A connected socket the peer has not closed or reset (bytes waiting are fine:
    a server that speaks first has simply spoken)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    return not any(events & _HUNG_UP for _, events in poller.poll(0))


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


class Target:
    """One target of a route: its address, health and warm sockets."""

    __slots__ = ("address", "health", "literal", "taken", "warm")

    def __init__(self, address: tuple[str, int], route: CompiledRoute) -> None:
        self.address = address
        # AF_INET or AF_INET6 for an IP address (connected to as it is), None for a name to resolve
        self.literal = literal_family(address[0])
        self.health = TargetHealth(route.circuit)
        self.warm: collections.deque[tuple[float, socket.socket]] = collections.deque()
        self.taken = trio.Event()  # set (and replaced) whenever a warm socket leaves the pool

    @property
    def name(self) -> str:
        return format_address(self.address)

    def take_warm(self, now: float) -> socket.socket | None:
        """A warm socket that passed its liveness check now, or None."""
        if not self.warm:
            return None
        found = None
        while self.warm and found is None:
            born, candidate = self.warm.popleft()
            if now - born < WARM_MAX_AGE and alive(candidate):
                found = candidate
            else:
                _close(candidate)
        self.taken.set()  # the filler tops the pool up (and sweeps the rest)
        self.taken = trio.Event()
        return found

    def drop_stale(self, now: float) -> None:
        """Close warm sockets that aged out or that the target closed."""
        keep: collections.deque[tuple[float, socket.socket]] = collections.deque()
        for born, sock in self.warm:
            if now - born < WARM_MAX_AGE and alive(sock):
                keep.append((born, sock))
            else:
                _close(sock)
        self.warm = keep

    def trim_warm(self, size: int) -> None:
        """Keep at most `size` warm sockets (the newest)."""
        while len(self.warm) > size:
            _close(self.warm.popleft()[1])

    def close_warm(self) -> None:
        self.trim_warm(0)


class RouteTargets:
    """The targets of one route, in the route's order, with the balancer over them."""

    def __init__(
        self,
        route: CompiledRoute,
        previous: RouteTargets | None = None,
        *,
        resolved: Iterable[tuple[str, int]] | None = None,
        checks: bool = True,
        warm: bool = True,
        on_verdict: Callable[[], object] = lambda: None,
    ) -> None:
        """`resolved`: instead of the route's targets, the addresses one client's destination
        resolved to (socks5, http_connect), tried in the resolver's order, each once.
        `checks`, `warm`: whether this process runs the route's health checks and keeps its
        warm sockets; `on_verdict` is called whenever a check turns a target."""
        self.route = route
        self.checks = checks
        self.warms = warm
        self.on_verdict = on_verdict
        addresses = route.targets if resolved is None else tuple(resolved)
        self.cycles = resolved is None  # retries go round the targets again when there are fewer
        carried: dict[tuple[str, int], Target] = {t.address: t for t in previous.targets} if previous is not None else {}
        self.targets: list[Target] = [carried.pop(address) if address in carried else Target(address, route) for address in addresses]
        for target in self.targets:
            # Carried state lasts only while its policy does: a route that no longer checks
            # (or breaks circuits) must not keep a target out on the strength of old checks.
            target.health.adopt(route.health, route.circuit)
            target.trim_warm(route.warm)
        same = previous is not None and previous.route.targets == route.targets and previous.route.balance == route.balance
        # An unchanged balancer keeps its turn and the holds of connections still open.
        self.balancer: Balancer = previous.balancer if same and previous is not None else Balancer(addresses, route.balance if resolved is None else "first")
        self.dropped = list(carried.values())  # targets the new list no longer has
        self.scope = trio.CancelScope()

    @property
    def watched(self) -> bool:
        """Anything for the background task to do: health checks or warm sockets."""
        return (self.checks and self.route.health is not None) or (self.warms and self.route.warm > 0)

    def order(self, attempts: int, now: float) -> list[int]:
        """Indexes of targets to try; only the usable ones (empty: every target is down)."""
        if not self.cycles:
            attempts = min(attempts, len(self.targets))
        if len(self.targets) == 1:  # the common case, without the lists
            return [0] * attempts if self.targets[0].health.usable(now) else []
        usable = [i for i, target in enumerate(self.targets) if target.health.usable(now)]
        return self.balancer.order(attempts, None if len(usable) == len(self.targets) else usable)

    def close(self) -> None:
        """Stop the background work and close every warm socket."""
        self.scope.cancel()
        for target in self.targets:
            target.close_warm()

    async def run(self) -> None:
        """Health checks and warm pools, until `scope` is cancelled (reload, shutdown)."""
        with self.scope:
            async with trio.open_nursery() as nursery:
                for target in self.targets:
                    if self.checks and self.route.health is not None:
                        nursery.start_soon(self._check, target, self.route.health)
                    if self.warms and self.route.warm:
                        nursery.start_soon(self._keep_warm, target)

    async def _check(self, target: Target, policy: CheckPolicy) -> None:
        while True:
            began = trio.current_time()
            why = await probe(target.address, policy)
            if why == Reason.CAPACITY:
                log.info("route %s: no health check of %s: out of file descriptors here", self.route.name, target.name)
            elif why is None:
                if target.health.check_passed(policy):
                    log.warning("route %s: target %s is up again (%d checks passed)", self.route.name, target.name, policy.rise)
                    self.on_verdict()
            elif target.health.check_failed(policy, why):
                log.warning("route %s: target %s is down (%d checks failed, last: %s)", self.route.name, target.name, policy.fall, why)
                target.close_warm()
                self.on_verdict()
            await trio.sleep_until(began + policy.interval)

    async def _keep_warm(self, target: Target) -> None:
        """Keep up to `warm` connected sockets ready while the target may be used."""
        host, port = target.address
        while True:
            now = trio.current_time()
            target.drop_stale(now)
            health = target.health
            if not (health.usable(now) and health.circuit is Circuit.CLOSED):
                target.close_warm()
                await trio.sleep(WARM_RETRY)
                continue
            if len(target.warm) < self.route.warm:
                try:
                    sock = await open_target(host, port, self.route.policy.connect_timeout)
                except (trio.TooSlowError, OSError) as exc:
                    connect_failed(health, connect_failure(exc))
                    await trio.sleep(WARM_RETRY)
                else:
                    if self.scope.cancel_called:  # closed while the connect finished: not ours to keep
                        _close(sock)
                        return
                    target.warm.append((trio.current_time(), sock))
                continue
            # Full: wake when one is taken, the oldest ages out, or to look for ones the target closed.
            taken = target.taken
            with trio.move_on_at(min(target.warm[0][0] + WARM_MAX_AGE, now + WARM_RETRY)):
                await taken.wait()

    def describe(self, now: float) -> list[dict[str, Any]]:
        """Each target's state, as `routes`, `stats` and metrics show it."""
        active = self.balancer.active
        return [{"target": target.name, "active": active[i], "warm": len(target.warm), **target.health.describe(now)} for i, target in enumerate(self.targets)]


async def probe(address: tuple[str, int], policy: CheckPolicy) -> str | None:
    """One health check: None if the target passed, else why it did not (a few words).

    Connect within `timeout`; then, if the policy says so, send its bytes and read until
    the expected bytes arrive — all within the same `timeout`. A UDP check is a datagram
    and its reply instead (`_probe_datagram`).
    """
    if policy.udp:
        return await _probe_datagram(address, policy)
    host, port = address
    stage = "connect"
    try:
        with trio.fail_after(policy.timeout):
            async with trio.SocketStream(trio.socket.from_stdlib_socket(await open_target(host, port, policy.timeout))) as stream:
                if policy.send:
                    stage = "send"
                    await stream.send_all(policy.send)
                if policy.expect:
                    stage = "reply"
                    seen = b""
                    while policy.expect not in seen:
                        data = await stream.receive_some(EXPECT_WINDOW)
                        if not data:
                            return "closed before the expected reply"
                        seen = (seen + data)[-EXPECT_WINDOW:]
    except trio.TooSlowError:
        return "connect_timeout" if stage == "connect" else f"no {stage} within {policy.timeout:g}s"
    except trio.BrokenResourceError:
        return "target_reset"
    except OSError as exc:
        return connect_failure(exc).value if stage == "connect" else "target_reset"
    return None


async def _probe_datagram(address: tuple[str, int], policy: CheckPolicy) -> str | None:
    """A UDP check: the policy's `send` bytes in one datagram on a connected socket, and a
    reply within `timeout` (one containing `expect`, when given; others are read past). A
    closed port answers with ICMP port unreachable, which the connected socket reports as
    ECONNREFUSED; a fresh socket per check, so no late reply to an earlier one is taken."""
    host, port = address
    stage = "reply"
    try:
        with trio.fail_after(policy.timeout):
            family, kind, proto, _, target = (await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM))[0]
            with trio.socket.socket(family, kind, proto) as sock:
                await sock.connect(target)
                await sock.send(policy.send)
                while policy.expect not in await sock.recv(EXPECT_WINDOW):  # b"" is in any reply
                    stage = "expected reply"
    except trio.TooSlowError:
        return f"no {stage} within {policy.timeout:g}s"
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return "connect_refused (ICMP port unreachable)"
        return connect_failure(exc).value  # dns_error, target_unreachable; capacity: no verdict
    return None


class TargetRegistry:
    """One RouteTargets per route that dials targets, kept across reloads."""

    def __init__(self, *, verdicts: Mapping[str, Iterable[str]] | None = None, warm: bool = True, on_verdict: Callable[[], object] = lambda: None) -> None:
        """`verdicts`: the health checks run elsewhere (a worker's supervisor) and none here;
        the targets they found down so far, route name -> "ip:port"s (later ones: `follow`).
        `warm`: keep the routes' warm sockets (a supervisor does not: its workers dial).
        `on_verdict`: called whenever a check run here turns a target up or down."""
        self._by_route: dict[str, RouteTargets] = {}
        self._checks = verdicts is None
        self._down = {} if verdicts is None else {route: frozenset(names) for route, names in verdicts.items()}
        self._warm = warm
        self._on_verdict = on_verdict

    def for_route(self, route: CompiledRoute) -> RouteTargets:
        """The targets a connection on `route` dials."""
        found = self._by_route.get(route.name)
        if found is not None and found.route.targets == route.targets:
            return found
        # The route was removed or its targets changed since this connection arrived: it
        # dials the targets it was routed to, plainly (no health state is kept for them).
        return RouteTargets(route)

    def get(self, name: str) -> RouteTargets | None:
        """The targets the registry keeps for the route named `name` (None: it dials none)."""
        return self._by_route.get(name)

    def update(self, routes: Iterable[CompiledRoute], start_soon: Callable[[Callable[[], Awaitable[None]]], object]) -> None:
        """Follow a new table. A route whose spec did not change keeps its RouteTargets; a
        changed one gets a new one that carries over the state (health, circuit, warm
        sockets) of every target it still has; `start_soon` runs the background work."""
        before, self._by_route = self._by_route, {}
        for route in routes:
            if not route.dials or not route.targets:
                continue
            prior = before.pop(route.name, None)
            if prior is not None and prior.route.spec == route.spec:
                prior.route = route
                self._by_route[route.name] = prior
                continue
            targets = self._by_route[route.name] = RouteTargets(route, prior, checks=self._checks, warm=self._warm, on_verdict=self._on_verdict)
            if not self._checks:
                self._follow(targets)
            for target in targets.dropped:
                target.close_warm()
            if prior is not None:
                prior.scope.cancel()
            if targets.watched:
                start_soon(targets.run)
        for gone in before.values():
            gone.close()

    def follow(self, down: Mapping[str, Iterable[str]]) -> None:
        """The verdicts of the health checks run elsewhere: these targets (route name ->
        "ip:port"s) are down now, every other checked target is up."""
        self._down = {route: frozenset(names) for route, names in down.items()}
        for targets in self._by_route.values():
            self._follow(targets)

    def _follow(self, targets: RouteTargets) -> None:
        if targets.route.health is None:
            return  # not checked (any more): up, whatever was said of it before a reload
        down = self._down.get(targets.route.name, frozenset())
        for target in targets.targets:
            up = target.name not in down
            if target.health.follow(up):
                log.info("route %s: target %s is %s, as the supervisor's checks say", targets.route.name, target.name, "up" if up else "down")
                if not up:
                    target.close_warm()

    def down(self) -> dict[str, list[str]]:
        """Route name -> its targets that health checks hold down now (routes with any)."""
        found = {name: [t.name for t in targets.targets if not t.health.up] for name, targets in self._by_route.items()}
        return {name: names for name, names in found.items() if names}

    def close(self) -> None:
        """Health checks stop, warm sockets close: none outlives the forwarder."""
        for targets in self._by_route.values():
            targets.close()
        self._by_route.clear()

    def describe(self, now: float) -> dict[str, list[dict[str, Any]]]:
        """Route name -> each target's health, circuit, active and warm counts."""
        return {name: targets.describe(now) for name, targets in self._by_route.items()}
