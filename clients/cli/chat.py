"""`sinkstream chat --server ADDR`: an endless conversation with the model, held in one server session.

The session id is remembered per server in `$XDG_CONFIG_HOME/sinkstream/chat.json` (default
`~/.config/sinkstream/chat.json`), so the next `sinkstream chat` continues the same conversation; the model
keeps seeing it through the session's bounded cache however long it gets.

A model with a chat template (e.g. SmolLM2-Instruct) chats on the server's chat protocol: each line is
one user message rendered with the template, each reply is the assistant's turn, generated until the
template's end of turn. --system gives a new conversation's system message, kept in the cache for the whole
conversation (--no-pin-system lets it be evicted like other text).

A model without a template (the small test models) gets plain-text turns instead, and chat says so once
on stdout (change the prefixes with --user / --assistant):

    User: <your message>
    Assistant: <reply, generated until the stop sequence "\\nUser:" or end-of-sequence>

When stdin is not a terminal, each input line is one user message and each reply is printed on stdout, so
a chat can be scripted.

Commands: /new (close this conversation, start another), /stats (tokens seen, cache state), /save (persist
the session on the server now; needs `serve --state-dir`), /help, /quit (or Ctrl-D; the session stays on the
server). Ctrl-C during a reply cancels the reply only; the conversation goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import grpc

from sinkstream.clients.cli.conversation import Conversation
from sinkstream.clients.cli.errors import RUN_FAILURE, USAGE, CliError, report, server_error
from sinkstream.clients.cli.options import (
    add_cache_shape_options,
    add_dtype_option,
    add_offload_options,
    add_server_option,
    add_speculate_option,
    add_weights_dtype_option,
    connection_options,
    resume_policy,
)
from sinkstream.clients.cli.profile_options import PROFILE_SETTINGS_ATTR, add_profile_option
from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import SinkStreamError
from sinkstream.core.config import StreamConfig, TierSpec  # torch-free

STREAM_ENDING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)
HELP = "commands: /new  /stats  /save  /help  /quit   (Ctrl-C stops a reply, Ctrl-D quits)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="endless chat with the model on a server (remembers the conversation)",
                       description=__doc__.split("\n\n")[0])
    add_server_option(p, "host:port of a sinkstream server (default: $SINKSTREAM_SERVER)")
    p.add_argument("--model", help="no server: run this model in-process (needs the server extra); "
                   "conversations persist under $XDG_STATE_HOME/sinkstream/chat")
    p.add_argument("--session", metavar="ID", help="conversation to continue or create (default: the "
                   "one remembered for this server)")
    p.add_argument("--new", action="store_true", help="start a new conversation")
    p.add_argument("--user", default="User:", help="turn prefix of your messages (default 'User:')")
    p.add_argument("--assistant", default="Assistant:", help="turn prefix of replies (default 'Assistant:')")
    p.add_argument("--system", default="", help="system message of a new conversation (without a chat "
                   "template: text placed before its first turn)")
    p.add_argument("--no-pin-system", dest="pin_system", action="store_false",
                   help="let the system message leave the cache like other text (default: it is pinned in "
                   "the sink region for the whole conversation)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="longest reply in tokens (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--seed", type=int, default=None, help="seed of a new session's sampling")
    add_cache_shape_options(p, names=("window", "sink_tokens"), server_default=True)
    add_dtype_option(p)  # with --model only: the model runs in this process
    add_weights_dtype_option(p)
    add_speculate_option(p, "with --model only; a server's is `serve --speculate`")
    add_profile_option(p)
    add_offload_options(p)


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
    from sinkstream.clients.cli import local_runner
    from sinkstream.service.server import ServerConfig, ServerThread

    profile = {}
    if (settings := getattr(args, PROFILE_SETTINGS_ATTR, None)) is not None:  # --profile: its cache shape
        profile["defaults"] = StreamConfig(sink_tokens=settings.sink_tokens, window=settings.window,
                                           chunk=settings.chunk, tiers=TierSpec.parse(settings.tiers),
                                           kv_dtype=settings.kv_dtype,
                                           keep_rotated_keys=settings.keep_rotated_keys)
    config = ServerConfig(model=args.model, port=0, state_dir=local_state_dir(), session_ttl_s=0,
                          idle_evict_s=0, grace_s=0.5, speculate=args.speculate, **profile)
    server = ServerThread(config, local_runner.load(args))
    try:
        yield server.address
    finally:
        server.stop()


def run(args: argparse.Namespace) -> int:
    """The REPL; returns the exit status (1 if a reply failed or the server did, 2 for a usage error)."""
    try:
        return _run(args)
    except CliError as exc:
        return report(exc, exc.code)


def _run(args: argparse.Namespace) -> int:
    if args.model:
        try:
            from sinkstream.clients.cli import local_runner  # the server extra: torch, transformers
        except ImportError as exc:
            raise CliError(f"--model needs the server extra (pip install 'sinkstream[server]'): {exc}",
                           USAGE) from None
        key = f"local:{Path(args.model).resolve() if Path(args.model).exists() else args.model}"
        try:
            with local_server(args) as address:
                return converse(args, address, key, f"sinkstream chat --model {args.model}")
        except (*local_runner.USAGE_ERRORS, OSError, ValueError) as exc:  # not found / not supported
            raise CliError(str(exc), USAGE) from None
        except local_runner.RUN_ERRORS as exc:
            raise CliError(str(exc), RUN_FAILURE) from None
    if args.offload != "none":
        raise CliError(f"--offload {args.offload} runs the model in this process: give --model PATH, or "
                       "start the server with `sinkstream serve --offload ...`", USAGE)
    if args.weights_dtype is not None:
        raise CliError(f"--weights-dtype {args.weights_dtype} sets the weights of a model run in this "
                       "process: give --model PATH, or start the server with "
                       "`sinkstream serve --weights-dtype ...`", USAGE)
    if args.speculate:
        raise CliError(f"--speculate {args.speculate} sets the decoding of a model run in this process: give "
                       "--model PATH, or start the server with `sinkstream serve --speculate ...`", USAGE)
    if not args.server:
        raise CliError("give --server HOST:PORT (or set SINKSTREAM_SERVER; start a server with "
                       "`sinkstream serve --model PATH`), or --model PATH to run the model in-process", USAGE)
    return converse(args, args.server, args.server, f"sinkstream chat --server {args.server}",
                    connection_options(args))


def converse(args: argparse.Namespace, address: str, key: str, again: str,
             connection: dict | None = None) -> int:
    """The REPL against the server at `address` (`connection`: SinkStreamClient's token and TLS
    arguments); returns the exit status (1 if a reply failed: the conversation goes on, but a script
    reading the exit code learns of it)."""
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input(), where available
            import readline  # noqa: F401
    try:
        with SinkStreamClient(address, resume=resume_policy(args), **(connection or {})) as client:
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
        print(flush=True)  # end a partly printed line, so the error stands on its own
        raise server_error(exc, address) from None
    return RUN_FAILURE if chat.failed_replies else 0
