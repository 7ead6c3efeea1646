"""`sinkstream chat` driven through stdin: turns, a new process resuming the remembered session, /new,
/save, and Ctrl-C cancelling only the reply."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO_ROOT
from service_support import start_server

from sinkstream.clients.client import SinkStreamClient

STATS = re.compile(r"session (\S+): tokens_seen=(\d+) .* cache=(\d+)/(\d+)")
GREEDY = ["--temperature", "0", "--max-new-tokens", "24"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, state_dir=tmp_path_factory.mktemp("state"))
    yield srv
    srv.stop()


def chat_cmd(server, *args: str) -> list[str]:
    return [sys.executable, "-m", "sinkstream", "chat", "--server", server.address, *args]


def chat(server, config_dir, lines: list[str], *args: str) -> str:
    proc = subprocess.run(chat_cmd(server, *GREEDY, *args), input="".join(f"{x}\n" for x in lines),
                          cwd=REPO_ROOT, env={**os.environ, "XDG_CONFIG_HOME": str(config_dir)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def stats(out: str) -> list[tuple[str, int, int, int]]:
    return [(m[1], int(m[2]), int(m[3]), int(m[4])) for m in STATS.finditer(out)]


def test_two_turns_then_a_new_process_continues_the_conversation(server, tmp_path):
    first = chat(server, tmp_path, ["Hello, who are you?", "Tell me about the park.", "/stats", "/quit"])
    assert first.count("model> ") == 2
    replies = re.findall(r"model> (.*)", first)
    assert all(r.strip() for r in replies)
    (session_id, tokens_1, used_1, capacity), = stats(first)
    remembered = json.loads((tmp_path / "sinkstream" / "chat.json").read_text())
    assert remembered["sessions"][server.address]["session_id"] == session_id

    second = chat(server, tmp_path, ["/stats", "And then what happened?", "/stats", "/save", "/quit"])
    assert f"resumed session {session_id} ({tokens_1:,} tokens so far)" in second
    (id_a, tokens_a, used_a, _), (id_b, tokens_b, used_b, _) = stats(second)
    assert id_a == id_b == session_id
    assert (tokens_a, used_a) == (tokens_1, used_1)  # the cache carried over between processes
    assert tokens_b > tokens_a and used_b >= used_a
    assert f"saved session {session_id}: {tokens_b:,} tokens" in second
    with SinkStreamClient(server.address, timeout=30) as client:
        info = client.get_session(session_id)
    assert info.tokens_seen == tokens_b and not info.attached

    third = chat(server, tmp_path, ["/new", "/stats", "/quit"])
    (new_id, new_tokens, new_used, _), = stats(third)
    assert new_id != session_id and new_tokens == new_used == 0
    assert f"closed session {session_id} ({tokens_b:,} tokens)" in third
    remembered = json.loads((tmp_path / "sinkstream" / "chat.json").read_text())
    assert remembered["sessions"][server.address]["session_id"] == new_id


def test_ctrl_c_cancels_the_reply_but_not_the_session(server, tmp_path):
    proc = subprocess.Popen(chat_cmd(server, "--temperature", "0.8", "--seed", "1", "--max-new-tokens",
                                     "4000", "--ignore-eos", "--user", "QQQ:"),
                            cwd=REPO_ROOT, env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()

    def wait_for(predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "".join(out)
            assert proc.poll() is None, "".join(out) + proc.stderr.read()
            time.sleep(0.02)

    try:
        proc.stdin.write("Tell me a long story.\n")
        proc.stdin.flush()
        wait_for(lambda: len("".join(out).partition("model> ")[2]) > 20)  # the reply is streaming
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "[cancelled]" in "".join(out))
        proc.stdin.write("/stats\n/quit\n")
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    reader.join(10)
    text = "".join(out)
    (session_id, tokens, _, _), = stats(text)
    assert tokens < 4000  # the reply stopped early
    with SinkStreamClient(server.address, timeout=30) as client:
        assert client.get_session(session_id).tokens_seen == tokens  # the session lives on


def test_in_process_chat_persists_the_conversation_between_runs(model_dir, tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_STATE_HOME": str(tmp_path / "state")}

    def run(lines: list[str]) -> str:
        command = [sys.executable, "-m", "sinkstream", "chat", "--model", str(model_dir), *GREEDY]
        proc = subprocess.run(command, input="".join(f"{x}\n" for x in lines), cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    first = run(["Hello, who are you?", "/stats", "/quit"])
    (session_id, tokens, used, _), = stats(first)
    assert (tmp_path / "state" / "sinkstream" / "chat" / f"{session_id}.safetensors").is_file()
    second = run(["/stats", "What next?", "/stats", "/quit"])
    (id_a, tokens_a, used_a, _), (_, tokens_b, _, _) = stats(second)
    assert (id_a, tokens_a, used_a) == (session_id, tokens, used) and tokens_b > tokens_a


def test_in_process_chat_speculating_gives_the_same_replies(model_dir, tmp_path):
    """chat --model --speculate 4 (greedy, no repetition penalty: the settings that speculate) replies as
    without; a repetitive conversation, so drafts are found. --speculate without --model is a usage error."""
    lines = ["Tom had a red ball. Tom had a red ball. Tom had a red ball.", "Tom had a red ball. Tom had",
             "/quit"]
    outputs = []
    for name, extra in (("plain", ()), ("speculating", ("--speculate", "4"))):
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / name / "config"),
               "XDG_STATE_HOME": str(tmp_path / name / "state")}
        command = [sys.executable, "-m", "sinkstream", "chat", "--model", str(model_dir), "--temperature",
                   "0", "--repetition-penalty", "1", "--max-new-tokens", "40", *extra]
        proc = subprocess.run(command, input="".join(f"{x}\n" for x in lines), cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append([line for line in proc.stdout.splitlines() if line.startswith("model> ")])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2
    proc = subprocess.run([sys.executable, "-m", "sinkstream", "chat", "--server", "127.0.0.1:1",
                           "--speculate", "4"], input="", cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "--speculate 4 sets the decoding of a model run in this process" in proc.stderr
