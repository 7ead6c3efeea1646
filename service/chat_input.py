"""One session's conversation: core.chat.ChatRenderer with its errors as request errors, its JSON-able
state for session snapshots, and the pinned system message's cache shape."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc

from sinkstream.core.chat import ChatRenderer, ChatTemplateError, end_of_turn_ids, has_chat_template
from sinkstream.core.config import ConfigError, StreamConfig
from sinkstream.service.errors import RequestError, invalid

PIN_ALIGN = 16  # pinned sink regions are rounded up to this, so few distinct cache shapes (engines) arise


class ChatInput:
    """Renders a session's chat messages and assistant turns to the ids to feed (see core/chat.py)."""

    def __init__(self, tokenizer, state: dict[str, Any] | None = None, field: str = "append_message") -> None:
        if tokenizer is None or not has_chat_template(tokenizer):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "the model has no chat template: use append_text", field)
        self.renderer = ChatRenderer(tokenizer, state)
        self.end_of_turn = frozenset(end_of_turn_ids(tokenizer))

    def append(self, role: str, content: str, field: str = "append_message") -> list[int]:
        """Ids of one message; RequestError (nothing changed) if it cannot be appended now."""
        try:
            return self.renderer.append(role, content)
        except ChatTemplateError as exc:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(exc), field) from exc
        except ValueError as exc:
            raise invalid(f"{field}.role", str(exc)) from exc

    def open_reply(self) -> list[int]:
        """Ids of the generation prompt that opens the assistant's turn."""
        try:
            return self.renderer.generation_prompt()
        except ChatTemplateError as exc:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(exc), "generate.chat_reply") from exc

    @property
    def reply_open(self) -> bool:
        return self.renderer.reply_open

    def close_reply(self, generated: list[int], stop_reason: str) -> list[int]:
        """Record the reply (the ids generated, possibly none) as the assistant message; the ids that
        complete its rendering."""
        ended = stop_reason == "EOS_TOKEN" and bool(generated) and generated[-1] in self.end_of_turn
        return self.renderer.finish_reply(generated, stopped_at_end_of_turn=ended)

    def state(self) -> dict[str, Any]:
        return self.renderer.state()


def pinned_config(config: StreamConfig, system_tokens: int, max_positions: int) -> StreamConfig:
    """`config` with a sink region covering the first `system_tokens` tokens of the stream (rounded up to
    PIN_ALIGN); INVALID_ARGUMENT "open.system_message" if that no longer fits the trained context."""
    aligned = -(-system_tokens // PIN_ALIGN) * PIN_ALIGN
    pinned = dataclasses.replace(config, sink_tokens=max(config.sink_tokens, aligned))
    try:
        pinned.validate(max_positions, chunk_within_window=True)
    except ConfigError as exc:
        raise invalid("open.system_message",
                      f"the pinned system message ({system_tokens} tokens, sink_tokens {pinned.sink_tokens}) "
                      f"does not fit: {exc.message}") from exc
    return pinned
