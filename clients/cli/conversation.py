"""One `sinkstream chat` conversation on one server session: chat messages (or plain-text turns for a model
without a chat template), streamed replies that Ctrl-C cancels, and the /stats, /save, /new and /quit
commands."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import threading

import grpc

from sinkstream.clients.cli.chat_memory import load_state, remember
from sinkstream.clients.cli.errors import RUN_FAILURE, report
from sinkstream.clients.client import Session, SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError


class Conversation:
    """One chat on one session: turn formatting, streaming replies, cancellation, commands."""

    def __init__(self, client: SinkStreamClient, args: argparse.Namespace, key: str, again: str) -> None:
        """key: what the session is remembered under; again: the command that continues it."""
        self.client, self.args, self.key, self.again = client, args, key, again
        self.params = GenerateParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
            stop_sequences=(f"\n{args.user}",), ignore_eos=args.ignore_eos)
        # a chat template on the server: messages and assistant turns; else plain-text turns
        self.templated = client.model_info().has_chat_template
        if self.templated:
            self.params = dataclasses.replace(self.params, stop_sequences=(), chat_reply=True)
        else:
            # on stdout with the other session notes: stderr is for errors only
            print("note: the model has no chat template; turns are framed as plain text "
                  f"({args.user!r} / {args.assistant!r})")
        self.session: Session | None = None
        self.open_turn = False  # the stream already ends with "\n<user prefix>"
        self.fresh = True  # nothing said yet in this session
        self.failed_replies = 0

    def start(self) -> None:
        remembered = load_state()["sessions"].get(self.key, {})
        wanted = self.args.session or (None if self.args.new else remembered.get("session_id"))
        if wanted:
            try:
                self.session = self.client.resume_session(wanted)
                same = wanted == remembered.get("session_id")
                self.open_turn = bool(remembered.get("open_turn")) if same else False
                self.fresh = self.session.opened.tokens_seen == 0
                print(f"resumed session {wanted} ({self.session.opened.tokens_seen:,} tokens so far)")
            except SinkStreamError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
                if not self.args.session:
                    print(f"session {wanted} is gone from the server; starting a new conversation")
                    wanted = None
        if self.session is None:
            self._open(wanted)
        self._remember()

    def _open(self, session_id: str | None) -> None:
        settings = SessionSettings(sink_tokens=self.args.sink_tokens, window=self.args.window)
        system = self.args.system if self.templated and self.args.system else None
        self.session = self.client.open_session(settings, seed=self.args.seed, session_id=session_id,
                                                system_message=system, pin_system=self.args.pin_system)
        self.open_turn, self.fresh = False, True
        print(f"new session {self.session.id}")

    def _remember(self) -> None:
        remember(self.key, self.session.id, self.open_turn)

    def turn_text(self, message: str) -> str:
        a = self.args
        if self.open_turn:
            return f" {message}\n{a.assistant}"
        if self.fresh:
            return (f"{a.system}\n" if a.system else "") + f"{a.user} {message}\n{a.assistant}"
        return f"\n{a.user} {message}\n{a.assistant}"

    def reply(self, message: str) -> None:
        """Send one user message and stream the reply to stdout; Ctrl-C cancels the reply."""
        if self.templated:
            self.session.send_message("user", message)
        else:
            self.session.send_text(self.turn_text(message))
        self.fresh = False
        first = True
        with self._cancel_on_sigint():
            for token in self.session.generate_stream(self.params):
                text = token.text.lstrip() if first else token.text
                first = first and not text
                print(text, end="", flush=True)
        result = self.session.last_generation
        print(" [cancelled]" if result.stop_reason == "CANCELLED" else "", flush=True)
        if result.stop_reason == "ERROR":
            self.failed_replies += 1
            report(f"reply failed: {result.error_message}", RUN_FAILURE)
        self.open_turn = result.stop_reason == "STOP_SEQUENCE"
        self._remember()

    @contextlib.contextmanager
    def _cancel_on_sigint(self):
        """While a reply streams, Ctrl-C sends CancelGeneration (from a helper thread: a signal handler
        must not block on the session's send queue) instead of raising KeyboardInterrupt."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum, frame) -> None:
            threading.Thread(target=self.session.cancel_generation, daemon=True).start()

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def stats(self) -> None:
        info = self.client.get_session(self.session.id)
        line = (f"session {info.session_id}: tokens_seen={info.tokens_seen} "
                f"pending={info.pending_tokens} perplexity={info.perplexity:.2f} state={info.state}")
        if info.cache is not None:
            c = info.cache
            tiers = f" tiers={c.tier_used}" if c.tier_used else ""
            line += (f" cache={c.used}/{c.capacity} (sinks {c.sink_used}, window {c.window_used}{tiers}, "
                     f"{c.cache_bytes:,} bytes)")
        print(line)

    def save(self) -> None:
        saved = self.session.checkpoint()
        print(f"saved session {saved.session_id}: {saved.tokens_seen:,} tokens, {saved.bytes:,} bytes")

    def new(self) -> None:
        closed = self.session.close()
        print(f"closed session {closed.session_id} ({closed.tokens_seen:,} tokens)")
        self._open(None)
        self._remember()

    def quit(self) -> None:
        self.session.detach()
        print(f"bye. `{self.again}` continues session {self.session.id}")
