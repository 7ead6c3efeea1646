"""`sinkstream chat --server ADDR`: an endless conversation with the model, held in one server session.

The session id is remembered per server in `$XDG_CONFIG_HOME/sinkstream/chat.json` (default
`~/.config/sinkstream/chat.json`), so the next `sinkstream chat` continues the same conversation; the model
keeps seeing it through the session's bounded cache however long it gets.

Turn format (the small test models have no chat template; change it with --user / --assistant):

    User: <your message>
    Assistant: <reply, generated until the stop sequence "\\nUser:" or end-of-sequence>

Commands: /new (close this conversation, start another), /stats (tokens seen, cache state), /save (persist
the session on the server now; needs `serve --state-dir`), /help, /quit (or Ctrl-D; the session stays on the
server). Ctrl-C during a reply cancels the reply only; the conversation goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

import grpc

from sinkstream.clients.client import Session, SinkStreamClient
from sinkstream.clients.remote_runner import unreachable_hint
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError
from sinkstream.core.offload.config import add_offload_options  # torch-free

STREAM_ENDING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)
HELP = "commands: /new  /stats  /save  /help  /quit   (Ctrl-C stops a reply, Ctrl-D quits)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="endless chat with the model on a server (remembers the conversation)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default=os.environ.get("SINKSTREAM_SERVER"),
                   help="host:port of a sinkstream server (default: $SINKSTREAM_SERVER)")
    p.add_argument("--model", help="no server: run this model in-process (needs the server extra); "
                   "conversations persist under $XDG_STATE_HOME/sinkstream/chat")
    p.add_argument("--session", metavar="ID", help="conversation to continue or create (default: the "
                   "one remembered for this server)")
    p.add_argument("--new", action="store_true", help="start a new conversation")
    p.add_argument("--user", default="User:", help="turn prefix of your messages (default 'User:')")
    p.add_argument("--assistant", default="Assistant:", help="turn prefix of replies (default 'Assistant:')")
    p.add_argument("--system", default="", help="text placed before the first turn of a new conversation")
    p.add_argument("--max-new-tokens", type=int, default=200, help="longest reply in tokens (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--seed", type=int, default=None, help="seed of a new session's sampling")
    p.add_argument("--window", type=int, default=None, help="recent tokens kept (default: server's)")
    p.add_argument("--sink-tokens", type=int, default=None, help="attention sinks (default: server's)")
    add_offload_options(p)  # with --model only: the model runs in this process


# ---------------------------------------------------------------------- remembered sessions
def state_file() -> Path:
    """Where chat sessions are remembered (XDG_CONFIG_HOME respected)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.environ.get("APPDATA") or Path.home() / ".config"
    return Path(base) / "sinkstream" / "chat.json"


def load_state() -> dict:
    try:
        data = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {"sessions": {}}
    return data if isinstance(data.get("sessions"), dict) else {"sessions": {}}


def remember(server: str, session_id: str, open_turn: bool) -> None:
    """Record this server's conversation; open_turn: the stream ends with the user prefix already."""
    data = load_state()
    data["sessions"][server] = {"session_id": session_id, "open_turn": open_turn}
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------- the conversation
class Conversation:
    """One chat on one session: turn formatting, streaming replies, cancellation, commands."""

    def __init__(self, client: SinkStreamClient, args: argparse.Namespace, key: str, again: str) -> None:
        """key: what the session is remembered under; again: the command that continues it."""
        self.client, self.args, self.key, self.again = client, args, key, again
        self.params = GenerateParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
            stop_sequences=(f"\n{args.user}",), ignore_eos=args.ignore_eos)
        self.session: Session | None = None
        self.open_turn = False  # the stream already ends with "\n<user prefix>"
        self.fresh = True  # nothing said yet in this session

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
        self.session = self.client.open_session(settings, seed=self.args.seed, session_id=session_id)
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
            print(f"(the server failed: {result.error_message})", file=sys.stderr)
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


def _read_line(interactive: bool) -> str | None:
    """The next input line, None at end of input. Ctrl-C at the prompt only clears the line."""
    while True:
        try:
            return input("you> " if interactive else "")
        except EOFError:
            return None
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)")


def local_state_dir() -> Path:
    """Where `chat --model` persists its conversations (XDG_STATE_HOME respected)."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "sinkstream" / "chat"


@contextlib.contextmanager
def local_server(args: argparse.Namespace):
    """A server in this process on a free port for args.model (its layers offloaded as --offload asks),
    persisting sessions to local_state_dir() when it stops, so the next `sinkstream chat --model` resumes
    them. Imports torch (the server extra)."""
    from sinkstream.service import local_runner
    from sinkstream.service.server import ServerConfig, ServerThread

    config = ServerConfig(model=args.model, port=0, state_dir=local_state_dir(), session_ttl_s=0,
                          idle_evict_s=0, grace_s=0.5)
    server = ServerThread(config, local_runner.load(args))
    try:
        yield server.address
    finally:
        server.stop()


def run(args: argparse.Namespace) -> int:
    """The REPL; returns the exit status."""
    if args.model:
        try:
            import sinkstream.service.server  # noqa: F401  (the server extra: torch, transformers)
        except ImportError as exc:
            print(f"sinkstream chat: error: --model needs the server extra (pip install "
                  f"'sinkstream[server]'): {exc}", file=sys.stderr)
            return 2
        from sinkstream.core.offload.prefetch import OffloadError

        key = f"local:{Path(args.model).resolve() if Path(args.model).exists() else args.model}"
        try:
            with local_server(args) as address:
                return converse(args, address, key, f"sinkstream chat --model {args.model}")
        except (OSError, ValueError, OffloadError) as exc:  # model not found / not supported / bad shard
            print(f"sinkstream chat: error: {exc}", file=sys.stderr)
            return 2
    if args.offload != "none":
        print(f"sinkstream chat: error: --offload {args.offload} runs the model in this process: give "
              "--model PATH, or start the server with `sinkstream serve --offload ...`", file=sys.stderr)
        return 2
    if not args.server:
        print("sinkstream chat: error: give --server HOST:PORT (or set SINKSTREAM_SERVER; start a server "
              "with `sinkstream serve --model PATH`), or --model PATH to run the model in-process",
              file=sys.stderr)
        return 2
    return converse(args, args.server, args.server, f"sinkstream chat --server {args.server}")


def converse(args: argparse.Namespace, address: str, key: str, again: str) -> int:
    """The REPL against the server at `address`; returns the exit status."""
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input(), where available
            import readline  # noqa: F401
    try:
        with SinkStreamClient(address) as client:
            chat = Conversation(client, args, key, again)
            chat.start()
            if interactive:
                print(HELP)
            commands = {"/stats": chat.stats, "/save": chat.save, "/new": chat.new,
                        "/help": lambda: print(HELP)}
            while (line := _read_line(interactive)) is not None:
                message = line.strip()
                if not message:
                    continue
                if message in ("/quit", "/exit"):
                    break
                if message in commands:
                    try:
                        commands[message]()
                    except SinkStreamError as exc:
                        if exc.code in STREAM_ENDING:
                            raise
                        print(f"error: {exc}")
                    continue
                if message.startswith("/"):
                    print(f"unknown command {message}; {HELP}")
                    continue
                if not interactive:
                    print(f"you> {message}")
                print("model> ", end="", flush=True)
                chat.reply(message)
            chat.quit()
    except SinkStreamError as exc:
        print(f"\nsinkstream chat: error: {exc}{unreachable_hint(exc, address)}", file=sys.stderr)
        return 2
    return 0
