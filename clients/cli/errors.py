"""How the CLI reports a failure: one line on stderr, `sinkstream: error: ...`, and an exit code: 2 for a
usage error (bad option, missing file or model, a request the server refuses as invalid), 1 for a run
failure (unreachable server, failed generation, a fault mid-run). No torch here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc

from sinkstream.clients.results import SinkStreamError

USAGE = 2
RUN_FAILURE = 1
# Status codes that mean the request itself was wrong (the user can fix the command); others are failures.
USAGE_STATUS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)


class CliError(Exception):
    """A failure the command reports in one line (`message`) with exit code `code`."""

    def __init__(self, message: str, code: int = RUN_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def one_line(text: object) -> str:
    """`text` on one line (library messages may span several)."""
    return " ".join(str(text).split())


def report(message: object, code: int) -> int:
    """Print `sinkstream: error: message` (on one line) to stderr; returns `code`."""
    print(f"sinkstream: error: {one_line(message)}", file=sys.stderr, flush=True)
    return code


def warn(message: object) -> None:
    print(f"sinkstream: warning: {one_line(message)}", file=sys.stderr, flush=True)


def server_error(exc: SinkStreamError, server: str) -> CliError:
    """A failed call as a CliError, with a next step when no server answers at `server`."""
    hint = ""
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        hint = (f" (no sinkstream server answers at {server}: start one with "
                f"`sinkstream serve --model PATH --port {server.rpartition(':')[2]}`)")
    return CliError(f"{exc}{hint}", USAGE if exc.code in USAGE_STATUS else RUN_FAILURE)


def check_readable_file(path: str | Path) -> None:
    """Raise a usage CliError unless `path` is a file this process can read."""
    try:
        with open(path, "rb"):
            pass
    except IsADirectoryError:
        raise CliError(f"cannot read {path}: it is a directory, not a file", USAGE) from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", USAGE) from None


def check_writable_file(path: str | Path) -> None:
    """Raise a usage CliError unless `path` can be created or overwritten (checked before any work, for
    outputs written only at the end)."""
    target = Path(path)
    if target.is_dir():
        raise CliError(f"cannot write {path}: it is a directory", USAGE)
    if not target.parent.is_dir():
        raise CliError(f"cannot write {path}: No such file or directory", USAGE)
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        raise CliError(f"cannot write {path}: Permission denied", USAGE)
