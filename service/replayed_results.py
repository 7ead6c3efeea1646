"""The results of a recovered session's replayed log, kept to be sent again on the call that resumes it.

Results that were in flight when the server died (produced, not yet read by the client) are lost with the
process. Recovery replays the log through the model anyway, so it produces those results again; they are
kept here, by the stream position each belongs to, and the resuming call gets the ones past the position
the client says it has received (ResumeSession.results_after). A generation's tokens belong to the
position where it ended, so a generation the client saw complete is skipped whole, and one it did not is
sent whole (the client drops the tokens whose index it has).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from sinkstream.service.replies import ChunkReply, GenerationReply, Reply, TokenReply

UNENDED = sys.maxsize  # the position of a generation the log leaves unfinished: always sent


@dataclass
class ReplayedResults:
    """(stream position, reply) of every result the replay produced, in stream order."""

    entries: list[tuple[int, Reply]] = field(default_factory=list)
    _generation_from: int | None = None  # index of the running generation's first entry

    def chunk(self, reply: ChunkReply) -> None:
        self.entries.append((reply.tokens_seen, reply))

    def generation_started(self) -> None:
        self._generation_from = len(self.entries)

    def token(self, reply: TokenReply) -> None:
        self.entries.append((UNENDED, reply))

    def generation_ended(self, complete: GenerationReply) -> None:
        """The running generation ended with `complete`: its tokens belong to where it ended."""
        start = len(self.entries) if self._generation_from is None else self._generation_from
        self.entries[start:] = [(complete.tokens_seen, reply) for _, reply in self.entries[start:]]
        self.entries.append((complete.tokens_seen, complete))
        self._generation_from = None

    def after(self, position: int) -> list[Reply]:
        """The replies a client that has received results up to stream `position` has not seen."""
        return [reply for at, reply in self.entries if at > position]
