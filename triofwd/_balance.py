"""Target selection: round-robin, least-connections, random, first.

A Balancer gives the order in which a connection tries a route's targets (the first
pick, then the retries) and counts connections held per target for least-connections.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from ._limits import Held

__all__ = ["Balancer"]


class Balancer:
    """Picks targets for one route."""

    def __init__(self, targets: Sequence[tuple[str, int]], mode: str, rng: random.Random | None = None) -> None:
        self.targets = tuple(targets)
        self.mode = mode
        self.active = [0] * len(self.targets)
        self._next = 0
        self._rng = rng or random.Random()

    def order(self, attempts: int, usable: Collection[int] | None = None) -> list[int]:
        """Indexes of the targets to try, `attempts` long; it cycles when there are fewer targets.

        `usable` (default: all) are the targets that may take a connection now (health
        checks, circuit breakers): the others are left out of the order.
        """
        n = len(self.targets)
        pool = range(n) if usable is None else [i for i in range(n) if i in usable]
        if not pool or attempts <= 0:
            return []
        if self.mode == "first":
            seq = list(pool)
        elif self.mode == "random":
            seq = self._rng.sample(pool, len(pool))
        elif self.mode == "least-connections":
            # The least busy first; among equals, take turns, so ties are shared out evenly.
            fewest = min(self.active[i] for i in pool)
            ties = [i for i in pool if self.active[i] == fewest]
            first = ties[self._next % len(ties)]
            self._next += 1
            seq = sorted(pool, key=lambda i: (i != first, self.active[i], (i - first) % n))
        else:
            start = self._next
            seq = sorted(pool, key=lambda i: (i - start) % n)
            self._next = (seq[0] + 1) % n  # past the one picked, so a skipped target's share is spread evenly
        return [seq[i % len(seq)] for i in range(attempts)]

    def hold(self, index: int) -> Held:
        """Count one connection on target `index` for as long as the block runs."""
        self.active[index] += 1
        return Held(Balancer._release, self, index)

    def _release(self, index: int) -> None:
        self.active[index] -= 1
