"""Requests of one session's stream as the scheduler consumes them, in arrival order."""

from __future__ import annotations

from dataclasses import dataclass

from sinkstream.core.sampling import SamplingParams
from sinkstream.service.errors import RequestError


@dataclass
class AppendWork:
    """Ids to add to the stream; `flush` asks for a partial last chunk to be run and acknowledged."""

    request_id: str
    ids: list[int]
    flush: bool
    seq: int = 0  # StreamRequest.seq of its request (every slice of it)
    final: bool = True  # the request's last slice (a numbered request is acknowledged with it)
    text_state: dict | None = None  # the session's text input state right after these ids were made
    chat_changed: bool = False  # made by the session's conversation (its state is logged with them)
    upto: int = 0  # a numbered append's slice: where it ends in the request (characters or ids)


@dataclass
class GenerateWork:
    """A generation; `seq` numbers a stream's Generate requests (CancelGeneration cancels up to one)."""

    request_id: str
    params: SamplingParams
    time_limit_s: float | None
    arrived: float
    seq: int
    input_tokens: int = 0  # pending input run for this request before generating
    chat_reply: bool = False  # the assistant's turn of the session's conversation
    prompted: bool = False  # its generation prompt has been added to the pending input
    client_seq: int = 0  # StreamRequest.seq (0: unsequenced)
    text_state: dict | None = None  # the text input's state after it (text after it starts at a boundary)


@dataclass
class MessageWork:
    """A chat message, rendered when the scheduler reaches it: the conversation is rendered in stream
    order, after the replies requested before it have been generated."""

    request_id: str
    role: str
    content: str
    flush: bool
    seq: int = 0  # StreamRequest.seq (0: unsequenced)


@dataclass
class RepeatWork:
    """A numbered request received again (StreamRequest.seq <= the highest received): answered, never
    processed twice. `generate`: the repeated request, when it is a Generate."""

    request_id: str
    seq: int
    generate: GenerateWork | None = None


@dataclass
class CheckpointWork:
    request_id: str


@dataclass
class CloseWork:
    request_id: str


@dataclass
class DetachWork:
    """The client half-closed: finish what came before, then end the call; the session stays."""

    request_id: str = ""


@dataclass
class ErrorWork:
    """A request refused by the reader; reported in order with the other requests' answers. `seq`: the
    refused request's number, which it takes (answered `error`, then `ack` once that is durable)."""

    request_id: str
    error: RequestError
    seq: int = 0


Work = (AppendWork | MessageWork | GenerateWork | RepeatWork | CheckpointWork | CloseWork | DetachWork
        | ErrorWork)

