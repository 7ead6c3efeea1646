"""Bearer-token authentication: the tokens file, and the server interceptor that admits a call only with a
valid `authorization: Bearer TOKEN` metadata entry and runs its handler as the token's tenant.

The tokens file holds one `TOKEN TENANT` per line; blank lines and `#` comments are ignored (so a token
cannot contain `#`). Tokens are
kept only as their SHA-256 digests: a call's token is hashed and its digest compared with every known one
by hmac.compare_digest, so the time taken does not depend on the secrets. Tokens are never
logged. `TokenTable.reload()` (SIGHUP) swaps in a new file atomically; a file that does not parse leaves
the current tokens in force and says why.

The standard health service (grpc.health.v1) needs no token: orchestrators probe it without credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from sinkstream.service.tenants import current_tenant, is_valid_tenant

log = logging.getLogger("sinkstream.auth")
OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # method prefixes callable without a token
BEARER = "bearer "
MIN_TOKEN_CHARS = 16  # short tokens can be guessed


class TokenFileError(ValueError):
    """A tokens file that cannot be used (its line number and why; never the token)."""


def parse_tokens(text: str, source: str = "tokens file") -> dict[bytes, str]:
    """sha256(token) -> tenant for each `TOKEN TENANT` line of `text` (TokenFileError if any line is
    malformed, a tenant name is invalid, a token is too short or listed twice)."""
    table: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenFileError(f"{source}:{number}: expected `TOKEN TENANT`, got {len(parts)} fields")
        token, tenant = parts
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenFileError(f"{source}:{number}: tokens need at least {MIN_TOKEN_CHARS} characters")
        if not is_valid_tenant(tenant):
            raise TokenFileError(f"{source}:{number}: tenant {tenant!r} is not a valid name "
                                 "(1-64 of A-Z a-z 0-9 . _ -, not starting with . or -)")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in table:
            raise TokenFileError(f"{source}:{number}: this token is listed twice")
        table[digest] = tenant
    if not table:
        raise TokenFileError(f"{source}: no tokens")
    return table


class TokenTable:
    """The tokens in force, read from `path` (TokenFileError at construction if it cannot be used)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._table = self._read()

    def _read(self) -> dict[bytes, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"cannot read tokens file {str(self.path)!r}: {exc}") from exc
        return parse_tokens(text, str(self.path))

    def reload(self) -> bool:
        """Read the file again; on any problem keep the current tokens and log why. True if reloaded."""
        try:
            table = self._read()
        except TokenFileError as exc:
            log.error("tokens not reloaded, the previous ones stay in force: %s", exc)
            return False
        self._table = table  # one reference swap: a call sees the old table or the new one
        log.info("tokens reloaded", extra={"tenants": len(set(table.values())), "tokens": len(table)})
        return True

    def tenant_of(self, token: str) -> str | None:
        """The tenant of a valid token, None otherwise. Compared with every known digest in constant
        time, so how long this takes says nothing about which token, or how much of one, matched."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, tenant in self._table.items():
            if hmac.compare_digest(known, digest):
                found = tenant
        return found


def bearer_token(metadata) -> str | None:
    """The token of an `authorization: Bearer TOKEN` metadata entry, if there is exactly one."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str) or not values[0].lower().startswith(BEARER):
        return None
    return values[0][len(BEARER):].strip() or None


UNAUTHENTICATED = "a valid `authorization: Bearer TOKEN` metadata entry is required"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid token (UNAUTHENTICATED, before any handler code runs) and runs the
    others' handlers with `current_tenant` set to their token's tenant."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                               Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        token = bearer_token(details.invocation_metadata)
        tenant = self.tokens.tenant_of(token) if token is not None else None
        if tenant is None:
            return _refusing(handler)
        return _as_tenant(handler, tenant)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with its behavior replaced by an UNAUTHENTICATED abort (same streaming kind)."""
    async def refuse_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

    async def refuse_streaming(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        yield  # an async generator, as a streaming handler is

    return _replace_behavior(handler, refuse_unary, refuse_streaming)


def _as_tenant(handler: grpc.RpcMethodHandler, tenant: str) -> grpc.RpcMethodHandler:
    """The handler with its behavior run as `tenant` (the context variable set around it)."""
    def wrap_unary(behavior):
        async def run(request_or_iterator, context):
            current_tenant.set(tenant)  # the handler runs in this call's own task and context
            return await behavior(request_or_iterator, context)
        return run

    def wrap_streaming(behavior):
        async def run(request_or_iterator, context):
            current_tenant.set(tenant)
            async for response in behavior(request_or_iterator, context):
                yield response
        return run

    return _replace_behavior(handler, wrap_unary, wrap_streaming, wrap=True)


def _replace_behavior(handler: grpc.RpcMethodHandler, unary, streaming, wrap: bool = False):
    """`handler` with its behavior replaced by `unary` / `streaming` (or wrapped by them if `wrap`),
    according to whether the response is streamed."""
    for kind in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is None:
            continue
        streamed = kind.endswith("_stream")
        new = (streaming if streamed else unary)
        return handler._replace(**{kind: new(behavior) if wrap else new})
    return handler
