"""Refusals and failures as the server reports them: a gRPC status code, the request field at fault, why."""

from __future__ import annotations

import errno

import grpc
import torch


class RequestError(Exception):
    """A request the server refuses: a gRPC status code, the request field at fault, why, and trailing
    metadata to send with the status (e.g. the replica that holds a session)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "", *,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code, self.field, self.message, self.trailers = code, field, message, trailers


class Busy(RequestError):
    """No row or cache shape is free now; the scheduler waits for one instead of failing the session."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message, field)


SHOWN_ID_CHARS = 64


def shown_id(identifier: str) -> str:
    """An id as error messages quote it: repr'd, cut to SHOWN_ID_CHARS characters with an ellipsis."""
    if len(identifier) <= SHOWN_ID_CHARS:
        return repr(identifier)
    return repr(identifier[:SHOWN_ID_CHARS]) + "..."


def invalid(field: str, message: str) -> RequestError:
    """An INVALID_ARGUMENT refusal of `field`."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, field)


# Disk full or over quota, and a state directory the server may not write to: resources the server ran
# out of, not server bugs (the .proto documents both as RESOURCE_EXHAUSTED).
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def is_exhaustion(exc: BaseException) -> bool:
    """Out of memory (host or device; torch.cuda.OutOfMemoryError is torch.OutOfMemoryError), disk full or
    a state directory that cannot be written."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def server_failure(exc: BaseException, what: str, field: str = "") -> RequestError:
    """An unexpected failure as a RequestError: RESOURCE_EXHAUSTED when memory or disk ran out or the state
    directory is not writable, INTERNAL otherwise (never UNKNOWN); a RequestError passes through
    unchanged."""
    if isinstance(exc, RequestError):
        return exc
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if is_exhaustion(exc) else grpc.StatusCode.INTERNAL
    return RequestError(code, f"{what}: {type(exc).__name__}: {exc}", field)
