"""Recovering a logged session after a restart: which records of its write-ahead log count, which snapshot
to start from, and the replay of the records after that snapshot through the model.

Replay feeds the logged ids exactly as they ran: each "ran" record is one forward pass over the first n
pending ids (so chunk boundaries are the original ones), generated tokens are fed as logged (never
sampled again; batch composition could change a float and so a sample), and the sampler's RNG state is
set from the log, so a generation a crash interrupted continues as an uninterrupted one would have. A
speculative pass ("spec") is run again over the same ids, keeping the same prefix, once its tokens' records
are read; a log that ends before all of them (a crash between its records) feeds the ones it has as plain
steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sinkstream.core.config import StreamConfig, TierSpec
from sinkstream.core.generation import Generation
from sinkstream.service.chat_input import ChatInput
from sinkstream.service.options import AnalysisOptions
from sinkstream.service.replayed_results import ReplayedResults
from sinkstream.service.replies import ChunkReply, TokenReply
from sinkstream.service.sequencing import SeqState
from sinkstream.service.session import ActiveGeneration, KeptGeneration, Session
from sinkstream.service.session_journal import params_from_record, rng_from_text
from sinkstream.service.tenants import SessionKey
from sinkstream.service.text_input import TextInput
from sinkstream.service.work import AppendWork, GenerateWork


class RecoveryError(ValueError):
    """The log and snapshots of a session cannot rebuild it (damaged beyond the last good record)."""


def snapshot_lsn(meta: dict[str, Any]) -> int | None:
    """The log position a snapshot covers (None: made without a log, never a base for a replay)."""
    wal = meta.get("session", {}).get("wal")
    return int(wal["lsn"]) if isinstance(wal, dict) else None


def covers(lsn: int | None, records: list[dict[str, Any]]) -> bool:
    """Whether a snapshot at `lsn` plus `records` is the whole history (no record missing in between)."""
    if lsn is None:
        return False
    return not records or int(records[0]["lsn"]) <= lsn + 1


def session_from_open(key: SessionKey, record: dict[str, Any], tokenizer) -> Session:
    """The fresh session `key` whose log opens with `record` (not resident yet)."""
    config = dict(record["config"])
    config["tiers"] = tuple(TierSpec(**t) for t in config["tiers"])
    meta = record["meta"]
    text = TextInput(tokenizer, meta["text"]) if tokenizer is not None else None
    session = Session(key, StreamConfig(**config), AnalysisOptions(**record["analysis"]), text,
                      created=record["created"])
    if meta.get("chat") is not None:
        session.chat = ChatInput(tokenizer, meta["chat"])
    if meta["pending"]:
        session.add_input(AppendWork("", list(meta["pending"]), False))
    return session


def restore_bookkeeping(session: Session, meta: dict[str, Any]) -> None:
    """A snapshot's durability state: sequence numbers (everything it covers is durable), the kept
    generation, a flush still to answer."""
    info = meta["session"]
    wal = info["wal"]
    seqs = SeqState.from_state(wal["seqs"])
    session.seqs = SeqState(seqs.applied, seqs.applied, seqs.applied)
    session.kept_generation = KeptGeneration.from_state(wal["kept"]) if wal.get("kept") else None
    session.flush_request = info.get("flush")
    session.applied_text_state = info.get("text")


@dataclass
class Replay:
    """Replays log records into a resident session whose journal is not set (so nothing is logged), and
    keeps the results the replay produces in `session.replayed` (see replayed_results.py)."""

    session: Session
    tokenizer: Any
    results: ReplayedResults = field(default_factory=ReplayedResults)
    speculative: tuple[list[int], int] | None = None  # a "spec" record's (ids, kept) whose tokens are read
    held: list[dict[str, Any]] = field(default_factory=list)  # its tok records read so far

    def run(self, records: list[dict[str, Any]]) -> None:
        """Worker thread (the scheduler's compute thread): apply every record in order."""
        with torch.inference_mode():
            for record in records:
                if self.speculative is not None and record["k"] != "tok":
                    self._release(False)
                getattr(self, "_" + record["k"])(record)
            if self.speculative is not None:
                self._release(False)
        s = self.session
        s.replayed = self.results
        if s.generation is not None:  # interrupted: continued when its Generate comes again
            s.suspended, s.generation = s.generation, None

    def _open(self, record: dict[str, Any]) -> None:
        pass  # the session was built from it

    def _base(self, record: dict[str, Any]) -> None:
        pass  # the snapshot the log continues was restored

    def _in(self, record: dict[str, Any]) -> None:
        s = self.session
        if record.get("chat") is not None:
            s.chat = ChatInput(self.tokenizer, record["chat"])
        if record.get("text") is not None and self.tokenizer is not None:
            s.text = TextInput(self.tokenizer, record["text"])
        seq, part = int(record["seq"]), int(record.get("part", 0))
        s.add_input(AppendWork(record["rid"], list(record["ids"]), bool(record["flush"]), seq or part,
                               final=bool(seq) or not part, text_state=record.get("text"),
                               upto=int(record.get("upto", 0))))

    def _ran(self, record: dict[str, Any]) -> None:
        s, n = self.session, int(record["n"])
        analysis = s.analysis
        result = s.engine.step({s.row: s.pending[:n]}, top_k=analysis.top_k,
                               embeddings=analysis.embeddings)[s.row]
        request_id = s.consume_pending(n)
        self.results.chunk(ChunkReply.of(request_id, n, result, analysis, s.row_stats()))

    def _drop(self, record: dict[str, Any]) -> None:
        self.session.consume_pending(int(record["n"]), ran=False)

    def _flushed(self, record: dict[str, Any]) -> None:
        self.session.flush_request = None

    def _gen(self, record: dict[str, Any]) -> None:
        s = self.session
        params = params_from_record(record["params"])
        chat_reply = bool(record["chat_reply"])
        work = GenerateWork(record["rid"], params, None, time.perf_counter(), 0,
                            input_tokens=int(record["input_tokens"]), chat_reply=chat_reply, prompted=True,
                            client_seq=int(record["seq"]), text_state=record.get("text"))
        if record.get("text") is not None and self.tokenizer is not None:
            s.text = TextInput(self.tokenizer, record["text"])
        stop_ids = s.chat.end_of_turn if chat_reply and s.chat is not None else ()
        gen = Generation(s.engine, s.row, params, self.tokenizer, stop_ids)
        if record.get("rng"):
            gen.sampler.generator.set_state(rng_from_text(record["rng"]))
        s.start_generation(ActiveGeneration(work, gen, input_tokens=work.input_tokens))
        self.results.generation_started()

    def _spec(self, record: dict[str, Any]) -> None:
        self.speculative = (list(record["ids"]), int(record["n"]))

    def _release(self, whole: bool) -> None:
        """The held tok records of a speculative pass: `whole` (all of them came): run the pass again and
        accept them; else feed them as plain steps."""
        (ids, kept), held = self.speculative, self.held
        self.speculative, self.held = None, []
        if whole:
            s = self.session
            s.engine.step_prefix(s.row, ids, lambda _: kept)
        for record in held:
            self._token(record, fed=whole)

    def _tok(self, record: dict[str, Any]) -> None:
        if self.speculative is None:
            self._token(record, fed=False)
            return
        self.held.append(record)
        if len(self.held) == self.speculative[1]:
            self._release(True)

    def _token(self, record: dict[str, Any], fed: bool) -> None:
        """A generated token (`fed`: already in the stream, by its speculative pass)."""
        s = self.session
        g = s.generation
        token_id, logprob = int(record["id"]), float(record["lp"])
        if not fed:
            s.engine.step({s.row: [token_id]})
        token = g.gen.accept(token_id, logprob)
        g.record_token(token.text, time.perf_counter())
        if record.get("rng"):
            g.gen.sampler.generator.set_state(rng_from_text(record["rng"]))
        reply = TokenReply(g.work.request_id, token_id, token.text, logprob, len(g.gen.generated) - 1)
        s.record_token(reply)
        self.results.token(reply)

    def _done(self, record: dict[str, Any]) -> None:
        complete = self.session.finish_generation(record["reason"], record.get("error", ""), close_chat=False)
        self.results.generation_ended(complete)

    def _seq(self, record: dict[str, Any]) -> None:
        self.session.answered(int(record["seq"]), "")
