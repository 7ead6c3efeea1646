"""Backpressure: how much one session may hold, so a fast writer or a slow reader stalls only itself.

Input side: a session's inbox holds at most INBOX_LIMIT requests, and the reader waits while the input an
append would add takes the session (queued in the inbox + pending for a forward pass) over its token
budget; the server then stops reading that stream and HTTP/2 flow control holds the client back. A message
limit alone would let 16 big texts in, and one big message is admitted in slices (intake.py), each counted
against the budget, so no message bypasses it.

Output side: the scheduler produces nothing for a session whose attached call has OUTBOX_LIMIT replies
unsent (replies without a forward pass too, so its inbox fills and the reader stops), and is woken when the
call has sent enough of them. A call whose outbox stays full (a client that stopped reading) is ended after
a while (`Outbox.stalled_for`, see SessionManager.sweep): its session is detached, its state kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sinkstream.service.work import AppendWork, Work

INBOX_LIMIT = 16  # requests queued per session before the server stops reading its stream
OUTBOX_LIMIT = 256  # responses queued per session before the scheduler stops producing for it
INPUT_SLICE = 16384  # an append is admitted in pieces of at most this many characters or ids
INPUT_BUDGET_MIN = 4 * INPUT_SLICE  # input tokens a session may hold (queued + pending)


def input_budget(chunk: int) -> int:
    """Input tokens a session with this chunk size may hold (queued + pending)."""
    return max(4 * chunk, INPUT_BUDGET_MIN)


class Inbox(asyncio.Queue):
    """A session's requests not started yet, bounded in messages and in input tokens.

    `pending_tokens` tells how many input ids the session holds outside the inbox (waiting for a pass);
    the session calls `input_ran()` when some of those ran or were dropped.
    """

    def __init__(self, chunk: int, pending_tokens: Callable[[], int]) -> None:
        super().__init__(INBOX_LIMIT)
        self.chunk = chunk
        self.pending_tokens = pending_tokens
        self.queued_tokens = 0  # input ids of the AppendWork queued here
        self.input_room = asyncio.Event()  # set when input tokens ran or were dropped

    async def put_work(self, item: Work) -> None:
        """Queue a request; waits while the inbox is full or, for input, while adding its ids would take
        the session over its input budget. An item is let in over the budget only when the session holds
        less than a chunk (nothing could run to make room); slices of at most INPUT_SLICE ids never are."""
        if isinstance(item, AppendWork):
            while self._over_budget(len(item.ids)):
                self.input_room.clear()
                await self.input_room.wait()
            self.queued_tokens += len(item.ids)
        await self.put(item)

    def _over_budget(self, adding: int) -> bool:
        held = self.queued_tokens + self.pending_tokens()
        can_drain = self.queued_tokens > 0 or self.pending_tokens() >= self.chunk
        return held + adding > input_budget(self.chunk) and can_drain

    def take(self) -> Work:
        """The next queued request (the inbox must not be empty)."""
        item = self.get_nowait()
        if isinstance(item, AppendWork):
            self.queued_tokens -= len(item.ids)
        return item

    def drop_all(self) -> list[Work]:
        """Drop the requests not started yet; returns them, oldest first."""
        dropped = []
        while not self.empty():
            dropped.append(self.get_nowait())
        self.queued_tokens = 0
        self.input_room.set()
        return dropped

    def input_ran(self) -> None:
        self.input_room.set()


class Outbox:
    """One call's replies waiting to be sent. Unbounded as a queue: the scheduler checks `full()`."""

    def __init__(self) -> None:
        self._replies: asyncio.Queue = asyncio.Queue()
        self.full_since: float | None = None  # time.monotonic() since when it has been full
        self.end_call: Callable[[], object] = lambda: None  # ends the call (set by the servicer)

    def put(self, reply: Any) -> None:
        self._replies.put_nowait(reply)
        if self.full_since is None and self.full():
            self.full_since = time.monotonic()

    def stalled_for(self, now: float) -> float:
        """Seconds the outbox has been full without the call taking a reply (0 if it is not full)."""
        return 0.0 if self.full_since is None else now - self.full_since

    def full(self) -> bool:
        return self._replies.qsize() >= OUTBOX_LIMIT

    def qsize(self) -> int:
        return self._replies.qsize()

    async def get(self) -> tuple[Any, bool]:
        """The next reply, and whether taking it made room for a session held back by a full outbox."""
        reply = await self._replies.get()
        self.full_since = None  # the client reads
        return reply, self._replies.qsize() == OUTBOX_LIMIT - 1
