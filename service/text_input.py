"""One session's text input: core.text.IncrementalEncoder plus a JSON-able state for session snapshots."""

from __future__ import annotations

import asyncio
from typing import Any

from sinkstream.core.text import IncrementalEncoder
from sinkstream.service.backpressure import INPUT_SLICE


class TextInput:
    """Turns a session's text pieces and raw ids into the ids to feed, in order; BOS once per session.

    The encoder's state (held-back text, left context, pending UTF-8 bytes) is saved with the session so
    a session restored from disk tokenizes later text exactly as if it had never left memory.
    """

    def __init__(self, tokenizer, state: dict[str, Any] | None = None) -> None:
        self.encoder = IncrementalEncoder(tokenizer)
        if state:
            self.encoder.load_state(state)

    def push(self, text: str) -> list[int]:
        """Ids made final by `text` (a partial last word is held back)."""
        return self.encoder.push(text)

    def flush(self) -> list[int]:
        """Ids of all held-back text (BOS first if the stream has no token yet)."""
        return self.encoder.flush()

    def push_ids(self, ids: list[int]) -> list[int]:
        """Held-back text (flushed) followed by raw `ids`; later text starts at a token boundary."""
        return self.encoder.push_ids(ids)

    @property
    def needs_flush(self) -> bool:
        """Whether flush() would return ids: held text, or the BOS of a stream with no token yet."""
        return self.holds_text or not self.encoder.started

    @property
    def holds_text(self) -> bool:
        """Whether text received is still held back (a partial word or UTF-8 character)."""
        return self.encoder.holds_text

    def state(self) -> dict[str, Any]:
        """The encoder's JSON-able state, saved with the session."""
        return self.encoder.state()


async def tokenize(tokenizer, text: str, add_bos: bool,
                   return_pieces: bool) -> tuple[list[int], list[str] | None]:
    """Ids of a whole text, as a session would feed them (BOS only if `add_bos`), and their token pieces
    when asked for. Tokenized in slices of INPUT_SLICE characters with the event loop free between them,
    so a big text never stalls other calls."""
    text_input = TextInput(tokenizer)
    ids = []
    for start in range(0, len(text), INPUT_SLICE):
        ids += text_input.push(text[start:start + INPUT_SLICE])
        await asyncio.sleep(0)
    ids += text_input.flush()
    bos = tokenizer.bos_token_id
    if not add_bos and ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    return ids, tokenizer.convert_ids_to_tokens(ids) if return_pieces else None
