"""Offload routes: nftables rules that live exactly as long as the forwarder's scope.

The ruleset text comes from the pure renderer in `_nft`; this module decides when it is
installed (start, reload), removed (every exit: normal, signal, exception, cancelled
embedding nursery) and what happens where nft cannot be used (`offload_fallback`).
The nft calls are blocking subprocesses, run in a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

import trio

from . import _nft
from ._errors import OffloadError
from ._table import RouteTable, offload_rules, with_routes

__all__ = ["ForeignRules", "KernelRules", "OffloadError", "forwarded_instead", "kernel_rules", "ruleset_text"]

log = logging.getLogger("triofwd.offload")

# Removing the rules at exit is shielded from cancellation (it must happen) but bounded.
REMOVE_TIMEOUT = 10.0


def ruleset_text(table: RouteTable) -> str:
    """The nftables ruleset for the table's offload routes (what `check --show-nft` prints)."""
    return _nft.render_ruleset(offload_rules(table.routes))


class KernelRules:
    """The `triofwd` nftables table, owned by one forwarder."""

    def __init__(self) -> None:
        self.installed = False
        self.counters: dict[str, tuple[int, int]] = {}
        self._first = True
        self._rules: list[_nft.OffloadRule] = []  # what is in the kernel now, when installed

    async def prepare(self, table: RouteTable) -> RouteTable:
        """Install the table's offload rules (one transaction), or fall back, or raise OffloadError.

        Returns the table to serve: where nft cannot be used, routes with
        offload_fallback = "forward" are forwarded in user space instead.
        """
        offload = [r for r in table.routes if r.action == "offload"]
        first, self._first = self._first, False
        if not offload:
            if self.installed:
                await self.remove()
            elif first and await trio.to_thread.run_sync(_nft.nft_available) is None:
                # A table left by a run that was killed still redirects its ports: the
                # table is ours by name, so it goes even if no route offloads now.
                await self.remove()
            return table
        problem = await trio.to_thread.run_sync(_nft.nft_available)
        if problem is None:
            rules = offload_rules(offload)
            try:
                await self._apply(rules)
            except _nft.NftError as exc:
                problem = str(exc)
            else:
                self.installed, self._rules = True, rules
                return table
        stuck = [r.name for r in offload if r.spec.offload_fallback != "forward"]
        if stuck:
            raise OffloadError(f"cannot install nftables rules for offload routes {', '.join(stuck)}: {problem}")
        for route in offload:
            log.warning("route %s: nftables unavailable (%s): forwarding in user space instead", route.name, problem)
        if self.installed:
            await self.remove()
        return with_routes(table, [dataclasses.replace(r, action="forward", kind="forward") if r.kind == "offload" else r for r in table.routes])

    async def _apply(self, rules: list[_nft.OffloadRule]) -> None:
        if self.installed and self._rules:
            # Ours is installed (a reload): update it in place, so its chains stay hooked.
            try:
                await trio.to_thread.run_sync(_nft.apply, _nft.render_ruleset(rules, previous=self._rules))
                return
            except _nft.NftError as exc:  # e.g. someone else changed the table: replace it whole
                log.warning("cannot update the nftables table in place (%s): replacing it whole", exc)
        await trio.to_thread.run_sync(_nft.apply, _nft.render_ruleset(rules))

    async def read_counters(self) -> dict[str, tuple[int, int]]:
        """Packets and bytes per offload route, from the kernel; {} when nothing is installed."""
        if not self.installed:
            self.counters = {}
        else:
            try:
                self.counters = await trio.to_thread.run_sync(_nft.read_counters)
            except _nft.NftError as exc:
                log.warning("cannot read nftables counters: %s", exc)
        return self.counters

    async def remove(self) -> None:
        with trio.move_on_after(REMOVE_TIMEOUT, shield=True) as scope:
            try:
                await trio.to_thread.run_sync(_nft.delete_table, abandon_on_cancel=False)
            except _nft.NftError as exc:
                log.error("cannot remove the nftables table: %s", exc)
            else:
                self.installed, self._rules = False, []
        if scope.cancelled_caught:
            log.error("removing the nftables table took more than %.0fs", REMOVE_TIMEOUT)


class ForeignRules(KernelRules):
    """Offload rules another process owns: the supervisor of worker processes installs and
    removes them once for all workers. Nothing is installed or removed here; the routes it
    could not offload and forwards in user space instead (offload_fallback) are `forwarded`."""

    def __init__(self, forwarded: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.forwarded = forwarded

    async def prepare(self, table: RouteTable) -> RouteTable:
        if not self.forwarded:
            return table
        return with_routes(table, [dataclasses.replace(r, action="forward", kind="forward") if r.name in self.forwarded else r for r in table.routes])

    async def read_counters(self) -> dict[str, tuple[int, int]]:
        return {}  # the supervisor reads them

    async def remove(self) -> None:
        pass


def forwarded_instead(asked: RouteTable, served: RouteTable) -> frozenset[str]:
    """The offload routes of `asked` that `served` (what prepare returned) forwards in user space."""
    kinds = {r.name: r.kind for r in served.routes}
    return frozenset(r.name for r in asked.routes if r.kind == "offload" and kinds.get(r.name) != "offload")


@contextlib.asynccontextmanager
async def kernel_rules(rules: KernelRules | None = None) -> AsyncIterator[KernelRules]:
    """Kernel rules owned by the block (`rules`, or new ones): whatever was installed is removed when it exits."""
    rules = KernelRules() if rules is None else rules
    try:
        yield rules
    finally:
        if rules.installed:
            await rules.remove()
