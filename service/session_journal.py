"""One session's write-ahead log: the records that rebuild its state after a crash, numbered (lsn) and
queued on the server's group committer in the order they change the session.

Records are written when a change is APPLIED to the session (input taken into its pending ids, a chunk
run, a token generated), not when a request is read, so the log's order is the order of the session's
state changes and a snapshot covers exactly the records up to its lsn. Record kinds ("k"):

- open: the session's creation (config, analysis, created, session meta, sampling RNG state);
- base: the log continues a snapshot taken at lsn 0 (a session that had state before it was logged);
- in: input ids joining the pending input (request id, flush, seq of its request on its last slice,
  the text input's state after it, the conversation's state after it when it changed);
- ran / drop: the first n pending ids were run as one forward pass / dropped after a failed pass;
- flushed: no flush is waiting any more (answered, or dropped when the call ended);
- gen: a generation started (request id, seq, sampling parameters, chat_reply, the sampler's RNG state);
- spec: a speculative decoding pass (core/speculative.py) ran over ids and kept the first n: the next n
  tok records are its tokens, fed by that pass (replayed as the same pass, so their keys and values are
  the ones it computed, bit for bit);
- tok: a generated token (id, logprob, the sampler's RNG state after drawing it when it samples);
- done: the generation ended (stop reason, error);
- seq: a numbered request was answered without changing the state (refused by the scheduler).
"""

from __future__ import annotations

import base64
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sinkstream.core.sampling import SamplingParams
from sinkstream.service.write_ahead_log import Done, GroupCommitter


def rng_to_text(generator: torch.Generator) -> str:
    """A torch generator's state as base64 text."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()

def rng_from_text(text: str) -> torch.Tensor:
    """The generator state (uint8 tensor) rng_to_text wrote."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

def params_to_record(params: SamplingParams) -> dict[str, Any]:
    return asdict(params)

def params_from_record(record: dict[str, Any]) -> SamplingParams:
    fields = dict(record)
    fields["stop_sequences"] = tuple(fields["stop_sequences"])
    return SamplingParams(**fields)

class SessionJournal:
    """Numbers a session's records and queues them on the committer; `lsn` is the last record's number."""

    def __init__(self, committer: GroupCommitter, path: Path, lsn: int = 0) -> None:
        self.committer, self.path, self.lsn = committer, path, lsn

    def write(self, record: dict[str, Any], done: Done | None = None) -> int:
        """Queue one record (its lsn is added); `done` runs once it is durable. Returns its lsn."""
        self.lsn += 1
        record["lsn"] = self.lsn
        self.committer.append(self.path, record, done)
        return self.lsn

    def drop_through(self, lsn: int) -> None:
        """Rotate the log: drop the records a snapshot at `lsn` (and every newer one) covers."""
        self.committer.rewrite(self.path, lambda record: int(record.get("lsn", 0)) > lsn)

    def delete(self) -> None:
        self.committer.delete(self.path)

    # ------------------------------------------------------------------ records
    def opened(self, config: dict, analysis: dict, created: float, meta: dict, rng: str) -> None:
        self.write({"k": "open", "config": config, "analysis": analysis, "created": created, "meta": meta,
                    "rng": rng})

    def based(self) -> None:
        self.write({"k": "base"})

    def input(self, request_id: str, ids: list[int], flush: bool, seq: int, text: dict | None,
              chat: dict | None, done: Done | None, part: int = 0, upto: int = 0) -> None:
        """`seq`: the numbered request this completes (0: none); `part`, `upto`: the numbered request
        these ids belong to and where their slice ends in it (a request applied in part is completed,
        not applied again, when it is sent again)."""
        record: dict[str, Any] = {"k": "in", "rid": request_id, "ids": ids, "flush": flush, "seq": seq,
                                  "part": part, "upto": upto}
        if text is not None:
            record["text"] = text
        if chat is not None:
            record["chat"] = chat
        self.write(record, done)

    def ran(self, n: int) -> None:
        self.write({"k": "ran", "n": n})

    def dropped(self, n: int) -> None:
        self.write({"k": "drop", "n": n})

    def flushed(self) -> None:
        self.write({"k": "flushed"})

    def generation_started(self, request_id: str, seq: int, params: SamplingParams, chat_reply: bool,
                           input_tokens: int, rng: str | None, text: dict | None) -> None:
        self.write({"k": "gen", "rid": request_id, "seq": seq, "params": params_to_record(params),
                    "chat_reply": chat_reply, "input_tokens": input_tokens, "rng": rng, "text": text})

    def speculated(self, ids: list[int], kept: int) -> None:
        self.write({"k": "spec", "ids": ids, "n": kept})

    def token(self, token_id: int, logprob: float, rng: str | None) -> None:
        self.write({"k": "tok", "id": token_id, "lp": logprob, "rng": rng})

    def generation_done(self, reason: str, error: str, done: Done | None) -> None:
        self.write({"k": "done", "reason": reason, "error": error}, done)

    def answered(self, seq: int, done: Done | None) -> None:
        self.write({"k": "seq", "seq": seq}, done)
