"""A fair share of each forward pass between tenants, then between a tenant's sessions.

When a pass has a token budget (`--max-batch-tokens`, or `--decode-input-budget` while sessions
generate), the input pieces that fit are chosen in turns: each tenant in turn gives its next piece, the
tenant served least recently first, and within a tenant its sessions go least recently served first. So a
tenant with one busy session gets a piece in every pass that has room for one piece per tenant, however
many busy sessions another tenant has, and a tenant's own sessions take turns.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

P = TypeVar("P")


class FairShare:
    """Chooses the pieces of a pass within a token budget (see the module docstring); remembers who was
    served when, across passes."""

    def __init__(self) -> None:
        self._pass = 0
        self._tenant_served: dict[str, int] = {}
        self._session_served: dict[Hashable, int] = {}

    def choose(self, pieces: Sequence[P], budget: int, *, tenant: Callable[[P], str],
               session: Callable[[P], Hashable], tokens: Callable[[P], int]) -> list[P]:
        """The pieces (each: `tenant(p)`, a session key `session(p)`, `tokens(p)` input tokens) that go
        into this pass: in turns as described, until the next one would take the pass over `budget`
        tokens (the first always goes: a piece larger than the budget still runs). Order of the result:
        the order chosen."""
        self._pass += 1
        queues: dict[str, list[P]] = {}
        for p in sorted(pieces, key=lambda p: self._session_served.get(session(p), 0)):  # stable
            queues.setdefault(tenant(p), []).append(p)
        order = sorted(queues, key=lambda t: (self._tenant_served.get(t, 0), t))
        chosen: list[P] = []
        used, depth = 0, 0
        while any(depth < len(queues[t]) for t in order):
            for t in order:
                if depth >= len(queues[t]):
                    continue
                p = queues[t][depth]
                if chosen and used + tokens(p) > budget:
                    return self._served(chosen, tenant, session)
                chosen.append(p)
                used += tokens(p)
            depth += 1
        return self._served(chosen, tenant, session)

    def _served(self, chosen: list[P], tenant: Callable[[P], str],
                session: Callable[[P], Hashable]) -> list[P]:
        for p in chosen:
            self._tenant_served[tenant(p)] = self._pass
            self._session_served[session(p)] = self._pass
        return chosen

    def prune(self, live: set) -> None:
        """Forget the sessions not in `live` (those gone)."""
        for key in [k for k in self._session_served if k not in live]:
            del self._session_served[key]
