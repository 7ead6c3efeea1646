"""Tenants: who a call acts for. With `--auth-tokens`, a call's tenant is its token's (set by auth.py);
without, every call acts for DEFAULT_TENANT. Sessions are keyed by (tenant, session id), so a tenant only
ever sees its own sessions and two tenants may both use the id "chat-1"."""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

DEFAULT_TENANT = "default"
# Tenant names are also directory names in the state directory (see session_store.SessionStore.path).
TENANT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")

# The tenant of the call being served; the auth interceptor sets it around each handler.
current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("sinkstream_tenant",
                                                                    default=DEFAULT_TENANT)


def is_valid_tenant(name: str) -> bool:
    """Whether `name` can name a tenant (1-64 of [A-Za-z0-9._-], not starting with . or -)."""
    return TENANT_NAME.fullmatch(name) is not None


@dataclass(frozen=True, order=True)
class SessionKey:
    """A session's identity on the server: its tenant and the id that tenant knows it by."""

    tenant: str
    id: str

    @property
    def label(self) -> str:
        """How logs and shutdown reports name the session: its id, prefixed by its tenant unless that is
        the default tenant."""
        return self.id if self.tenant == DEFAULT_TENANT else f"{self.tenant}/{self.id}"
