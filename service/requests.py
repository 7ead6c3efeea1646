"""A stream's requests as plain values, decoded and validated from the wire (see convert.py)."""

from __future__ import annotations

from dataclasses import dataclass

from sinkstream.core.config import StreamConfig
from sinkstream.core.sampling import SamplingParams
from sinkstream.service.options import AnalysisOptions


@dataclass(frozen=True)
class OpenRequest:
    """Open a new session; an empty `session_id` lets the server choose one."""

    request_id: str
    session_id: str
    config: StreamConfig
    analysis: AnalysisOptions
    seed: int | None
    system_message: str | None = None
    pin_system: bool = True


@dataclass(frozen=True)
class ResumeRequest:
    """Attach to an existing session; `analysis` replaces its analysis options when given;
    `results_after`: send the results of a recovered log past this stream position again (None: not)."""

    request_id: str
    session_id: str
    analysis: AnalysisOptions | None
    results_after: int | None = None


@dataclass(frozen=True)
class AppendText:
    request_id: str
    text: str
    flush: bool
    seq: int = 0


@dataclass(frozen=True)
class AppendTokens:
    request_id: str
    ids: list[int]
    flush: bool
    seq: int = 0


@dataclass(frozen=True)
class AppendMessage:
    """One chat message, rendered with the model's chat template."""

    request_id: str
    role: str
    content: str
    flush: bool
    seq: int = 0


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    params: SamplingParams
    time_limit_s: float | None
    chat_reply: bool = False
    seq: int = 0


@dataclass(frozen=True)
class CheckpointRequest:
    request_id: str


@dataclass(frozen=True)
class CloseRequest:
    request_id: str


@dataclass(frozen=True)
class CancelRequest:
    """Cancel the stream's Generate requests received so far."""


@dataclass(frozen=True)
class MisplacedStart:
    """An open or resume request after the stream already has its session."""

    kind: str


StartRequest = OpenRequest | ResumeRequest
StreamRequest = (AppendText | AppendTokens | AppendMessage | GenerateRequest | CheckpointRequest
                 | CloseRequest | CancelRequest | MisplacedStart)
