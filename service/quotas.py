"""Per-tenant quotas: how many sessions a tenant may hold, and how many of them may be resident (own a
cache row) at once. Zero means no limit. A tenant over a quota is refused with RESOURCE_EXHAUSTED, which
says nothing of other tenants: they go on opening sessions."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from sinkstream.service.errors import Busy, RequestError


@dataclass(frozen=True)
class TenantQuotas:
    max_sessions: int = 0  # live sessions per tenant, resident or persisted
    max_rows: int = 0  # resident sessions (cache rows) per tenant

    def check_sessions(self, held: int) -> None:
        """RESOURCE_EXHAUSTED if a tenant holding `held` sessions may not open another."""
        if self.max_sessions and held >= self.max_sessions:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"this tenant holds its maximum of {self.max_sessions} sessions; delete or "
                               "close some first")

    def rows_full(self, resident: int) -> bool:
        """Whether a tenant with `resident` sessions holding a row must free one before taking another."""
        return bool(self.max_rows) and resident >= self.max_rows

    def rows_exhausted(self) -> Busy:
        """The refusal when a tenant's rows are all taken by sessions that cannot be evicted now (Busy: the
        scheduler waits for a row; an open or a resume is refused with RESOURCE_EXHAUSTED)."""
        return Busy(f"this tenant's {self.max_rows} resident sessions are all busy")



NO_QUOTAS = TenantQuotas()
