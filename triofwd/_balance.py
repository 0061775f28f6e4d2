"""Target selection: round-robin, least-connections, random, first.

A Balancer gives the order in which a connection tries a route's targets (the first
pick, then the retries) and counts connections held per target for least-connections.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

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

    def order(self, attempts: int) -> list[int]:
        """Indexes of the targets to try, `attempts` long; it cycles when there are fewer targets."""
        n = len(self.targets)
        if n == 0 or attempts <= 0:
            return []
        if self.mode == "first":
            seq = list(range(n))
        elif self.mode == "random":
            seq = self._rng.sample(range(n), n)
        elif self.mode == "least-connections":
            # The least busy first; among equals, take turns, so ties are shared out evenly.
            fewest = min(self.active)
            ties = [i for i in range(n) if self.active[i] == fewest]
            first = ties[self._next % len(ties)]
            self._next += 1
            seq = sorted(range(n), key=lambda i: (i != first, self.active[i], (i - first) % n))
        else:
            start = self._next
            self._next = (start + 1) % n
            seq = [(start + i) % n for i in range(n)]
        return [seq[i % n] for i in range(attempts)]

    def hold(self, index: int) -> Held:
        """Count one connection on target `index` for as long as the block runs."""
        self.active[index] += 1
        return Held(self._release, index)

    def _release(self, index: int) -> None:
        self.active[index] -= 1
