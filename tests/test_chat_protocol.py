"""The chat protocol over gRPC: append_message renders the conversation with the model's chat template
incrementally, Generate.chat_reply takes the assistant's turn, the system message given at open is pinned
in the sink region, and snapshots carry both. stories260K with a ChatML-style template on its tokenizer."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import grpc
import pytest
import torch
from conftest import REPO_ROOT
from service_support import start_server
from test_chat_template_incremental import CHATML

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import SessionSettings, SinkStreamError
from sinkstream.core.chat import end_of_turn_ids
from sinkstream.core.config import StreamConfig
from sinkstream.core.generation import Generation
from sinkstream.core.model_loading import load_model
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.snapshot import load_snapshot
from sinkstream.core.streaming import StreamingInference
from sinkstream.service.server import ServerConfig, ServerThread

SYSTEM = "You are a storyteller. Tell short, happy stories about a little dog named Tim."
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play in the park with her "
         "friends. One day, she saw a big red ball under a tree and ran to get it. ")


@pytest.fixture(scope="module")
def chat_model(model_dir):
    loaded = load_model(str(model_dir))
    loaded.tokenizer.chat_template = CHATML
    return loaded


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(chat_model, model_dir, state_dir):
    config = ServerConfig(model=str(model_dir), port=0, grace_s=0.5, idle_evict_s=0, state_dir=state_dir)
    srv = ServerThread(config, chat_model)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def plain_server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


def template_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                              add_generation_prompt=add_generation_prompt))


def stream_ids(chunks, replies=()) -> list[int]:
    """The session's stream: chunk results' ids, and the replies' generated ids, each at its position."""
    at: dict[int, int] = {}
    for start, ids in [(c.tokens_seen - c.num_tokens, c.token_ids) for c in chunks] + \
            [(r.tokens_seen - r.generated_tokens, [t.token_id for t in r.tokens]) for r in replies]:
        at.update(zip(range(start, start + len(ids)), ids, strict=True))
    assert sorted(at) == list(range(len(at)))
    return [at[k] for k in range(len(at))]


SETTINGS = SessionSettings(sink_tokens=4, window=128, chunk=16, token_ids=True)


def test_messages_and_replies_are_the_template_applied_to_the_whole_conversation(server, chat_model):
    tok = chat_model.tokenizer
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a story."}]
    with SinkStreamClient(server.address, timeout=60) as client:
        assert client.model_info().has_chat_template
        with client.open_session(SETTINGS, system_message=SYSTEM) as session:
            sinks = session.opened.settings.sink_tokens  # pinned: the system message fits in the sinks
            chunks = session.append_message("user", "Tell me a story.")
            reply = session.generate(chat_reply=True, max_new_tokens=60)
            chunks += session.append_message("user", "And then?")
            second = session.generate(chat_reply=True, max_new_tokens=3)  # cut short: the turn is closed
            chunks += session.append_message("user", "Bye")
            chunks += session.flush()
    generated = [t.token_id for t in reply.tokens]
    # the reply is what the model generates greedily after the template's generation prompt
    engine = StreamingInference(chat_model.model, StreamConfig(sink_tokens=sinks, window=128, chunk=16),
                                tokenizer=tok)
    row = engine.open_row()
    list(engine.append(row, template_ids(tok, conversation, add_generation_prompt=True)))
    gen = Generation(engine, row, SamplingParams(max_new_tokens=60), tok, end_of_turn_ids(tok))
    reference = []
    while not gen.finished:
        token, logprob = gen.choose()
        engine.step({row: [token]})
        reference.append(gen.accept(token, logprob).token_id)
    assert generated == reference
    # stories260K never ends a reply by itself (test_chat_template_incremental covers a reply that ends
    # at the end-of-turn token): both replies are cut short and the server closes their turns
    assert reply.stop_reason == second.stop_reason == "MAX_TOKENS"
    assert (reply.generated_tokens, second.generated_tokens) == (60, 3)
    content = tok.decode(generated, skip_special_tokens=False)
    assert reply.text == content
    conversation += [{"role": "assistant", "content": content}, {"role": "user", "content": "And then?"},
                     {"role": "assistant", "content": second.text}, {"role": "user", "content": "Bye"}]
    assert stream_ids(chunks, [reply, second]) == template_ids(tok, conversation)


def test_a_message_sent_during_a_reply_follows_the_reply(server, chat_model):
    """Requests are rendered in stream order: a message pipelined behind a chat_reply comes after the
    reply in the conversation, whenever the reader gets to it."""
    with (SinkStreamClient(server.address, timeout=60) as client,
          client.open_session(SETTINGS, system_message=SYSTEM) as session):
        session.send_message("user", "Tell me a story.")
        tokens = session.generate_stream(chat_reply=True, max_new_tokens=30)
        next(tokens)  # the Generate request is sent
        session.send_message("user", "And then?")
        list(tokens)
        reply = session.last_generation
        chunks = session.flush()
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a story."},
                    {"role": "assistant", "content": reply.text}, {"role": "user", "content": "And then?"}]
    assert stream_ids(chunks, [reply]) == template_ids(chat_model.tokenizer, conversation)


def test_without_a_template_chat_requests_are_failed_precondition(plain_server):
    with SinkStreamClient(plain_server.address, timeout=30) as client:
        assert not client.model_info().has_chat_template
        with client.open_session() as session:
            with pytest.raises(SinkStreamError) as err:
                session.append_message("user", "Hi")
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "chat template" in str(err.value)
            with pytest.raises(SinkStreamError) as err:
                session.generate(chat_reply=True)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert session.append_text("Once upon a time")  # the stream is still usable
        with pytest.raises(SinkStreamError) as err:
            client.open_session(system_message="Be nice.")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "system_message" in str(err.value)


def test_bad_roles_and_early_replies_are_refused_and_change_nothing(server, chat_model):
    with SinkStreamClient(server.address, timeout=30) as client, client.open_session(SETTINGS) as session:
        with pytest.raises(SinkStreamError) as err:
            session.generate(chat_reply=True)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no message" in str(err.value)
        with pytest.raises(SinkStreamError) as err:
            session.append_message("tool", "x")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "append_message.role" in str(err.value)
        chunks = session.append_message("user", "Hi")
    assert stream_ids(chunks) == template_ids(chat_model.tokenizer, [{"role": "user", "content": "Hi"}])


def test_the_system_message_is_pinned_in_the_sink_region(server, chat_model):
    system_ids = template_ids(chat_model.tokenizer, [{"role": "system", "content": SYSTEM}])
    pinned = -(-len(system_ids) // 16) * 16
    with SinkStreamClient(server.address, timeout=30) as client:
        with client.open_session(SETTINGS, system_message=SYSTEM) as session:
            assert session.opened.settings.sink_tokens == pinned > 4
        with client.open_session(SETTINGS, system_message=SYSTEM, pin_system=False) as session:
            assert session.opened.settings.sink_tokens == 4
        with pytest.raises(SinkStreamError) as err:  # 512 positions: sinks + window + chunk must fit
            client.open_session(SessionSettings(sink_tokens=4, window=400, chunk=16),
                                system_message=SYSTEM * 3)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "open.system_message" in str(err.value)


def snapshot(state_dir, session) -> tuple[dict, dict]:
    """The session's snapshot file, written now."""
    session.checkpoint()
    return load_snapshot(state_dir / f"{session.id}.safetensors")


@pytest.mark.parametrize("pin", [True, False])
def test_after_10k_tokens_the_pinned_system_message_is_unchanged_in_the_cache(server, state_dir, chat_model,
                                                                              pin):
    system_ids = template_ids(chat_model.tokenizer, [{"role": "system", "content": SYSTEM}])
    n = len(system_ids)
    with (SinkStreamClient(server.address, timeout=300) as client,
          client.open_session(SETTINGS, system_message=SYSTEM, pin_system=pin) as session):
        session.flush()
        start, meta = snapshot(state_dir, session)
        ring = meta["config"]["sink_tokens"]  # no tiers: the window's ring starts after the sinks
        assert start["token_ids"][ring:ring + n].tolist() == system_ids
        turn = 0
        while (tokens := session.last_flush.tokens_seen if session.last_flush else 0) < 10_000:
            session.append_message("user", f"{turn}: {STORY * 4}")
            if turn % 10 == 0:
                session.generate(chat_reply=True, max_new_tokens=32)
            turn += 1
        end, meta = snapshot(state_dir, session)
    assert tokens >= 10_000 and meta["tokens_seen"] >= 10_000
    if pin:
        assert end["token_ids"][:n].tolist() == system_ids
        assert torch.equal(end["keys"][:, :, :n], start["keys"][:, :, ring:ring + n])
        assert torch.equal(end["values"][:, :, :n], start["values"][:, :, ring:ring + n])
    else:  # the control: unpinned, only the first 4 tokens are left
        assert end["token_ids"][:4].tolist() == system_ids[:4]
        assert end["token_ids"][4:n].tolist() != system_ids[4:]


def test_a_restarted_server_continues_the_conversation_and_its_pinned_sinks(chat_model, model_dir, tmp_path):
    """Sessions persisted at shutdown carry the conversation and the enlarged sink region."""
    tok = chat_model.tokenizer
    config = ServerConfig(model=str(model_dir), port=0, grace_s=0.5, state_dir=tmp_path)
    first = ServerThread(config, chat_model)
    with (SinkStreamClient(first.address, timeout=60) as client,
          client.open_session(SETTINGS, system_message=SYSTEM) as session):
        chunks = session.append_message("user", "Hi")
        session_id, sinks = session.id, session.opened.settings.sink_tokens
    first.stop()
    second = ServerThread(dataclasses.replace(config), chat_model)
    try:
        with (SinkStreamClient(second.address, timeout=60) as client,
              client.resume_session(session_id, SETTINGS) as session):
            assert session.opened.settings.sink_tokens == sinks > 4
            chunks += session.append_message("assistant", "Hello")
            chunks += session.append_message("user", "Bye")
    finally:
        second.stop()
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert stream_ids(chunks) == template_ids(tok, conversation)


def run_chat(args: list[str], lines: list[str], tmp_path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, "-m", "sinkstream", "chat", *args],
                          input="".join(f"{x}\n" for x in lines), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_cli_chat_scripted_over_the_chat_protocol(server, tmp_path):
    """Each stdin line is one user message; each reply (greedy) is the one the client library gets on the
    chat protocol with the same system message and settings."""
    args = ["--server", server.address, "--system", SYSTEM, "--temperature", "0", "--max-new-tokens", "12",
            "--repetition-penalty", "1", "--window", "128", "--sink-tokens", "4"]
    proc = run_chat(args, ["Tell me a story.", "And then?"], tmp_path)
    assert "no chat template" not in proc.stdout
    replies = re.findall(r"model> (.*)", proc.stdout)
    settings = SessionSettings(sink_tokens=4, window=128)
    with (SinkStreamClient(server.address, timeout=60) as client,
          client.open_session(settings, system_message=SYSTEM) as session):
        assert session.opened.settings.sink_tokens > 4  # pinned
        expected = []
        for message in ["Tell me a story.", "And then?"]:
            session.send_message("user", message)
            expected.append(session.generate(chat_reply=True, max_new_tokens=12).text.strip())
    assert [r.strip() for r in replies] == expected and all(expected)
    session_id = re.search(r"new session (\S+)", proc.stdout)[1]
    with SinkStreamClient(server.address, timeout=30) as client:
        assert client.get_session(session_id).settings.sink_tokens == session.opened.settings.sink_tokens

    unpinned = run_chat([*args, "--new", "--no-pin-system"], ["Hi"], tmp_path)
    session_id = re.search(r"new session (\S+)", unpinned.stdout)[1]
    with SinkStreamClient(server.address, timeout=30) as client:
        assert client.get_session(session_id).settings.sink_tokens == 4


def test_cli_chat_without_a_template_keeps_plain_turns_and_says_so_once(model_dir, tmp_path):
    proc = run_chat(["--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "8"],
                    ["Hello", "Again"], tmp_path)
    assert proc.stdout.count("no chat template") == 1 and not proc.stderr
    assert proc.stdout.count("model> ") == 2
