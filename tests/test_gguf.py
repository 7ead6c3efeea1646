"""`--model file.gguf`: a GGUF file loads through `load_model` (weights de-quantised and cached as
safetensors, tokenizer and chat template from the file) and reproduces the published references of
../shared/models/README.md: stories260K.gguf equals the stories260K folder's model, SmolLM2-135M-Instruct
gives the plain-text and chat references in-process and from the command line. Every test uses its own
cache directory ($SINKSTREAM_CACHE_DIR), never ~/.cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from test_core_streaming import REFERENCE_CONTINUATION
from transformers import AutoTokenizer

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams
from sinkstream.core import gguf_loading
from sinkstream.core.chat import ChatRenderer, template_is_local
from sinkstream.core.config import StreamConfig
from sinkstream.core.generation import generate
from sinkstream.core.gguf_loading import (
    CACHE_ENV,
    MANIFEST,
    GgufCacheError,
    cache_root,
    file_sha256,
    gguf_checkpoint,
    load_gguf_tokenizer,
)
from sinkstream.core.model_loading import LoadedModel, load_model
from sinkstream.core.offload.config import OffloadConfig
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.streaming import StreamingInference
from sinkstream.service.server import ServerConfig, ServerThread

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PLAIN_PROMPT = "The capital of France is"
PLAIN_PROMPT_IDS = [504, 3575, 282, 4649, 314]
PLAIN_REFERENCE = " Paris.\n\nThe answer is: 2018-01-22 "  # 20 greedy tokens
CHAT_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_PROMPT_START = [1, 9690, 198, 2683, 359]
CHAT_REPLY_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]
TEXTS = ["Once upon a time", "  two  spaces\n\nand lines", "Lily's dog, \"Max\", said: 123!", "ünïcödé 😀"]


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "gguf-cache"
    monkeypatch.setenv(CACHE_ENV, str(path))
    return path


@pytest.fixture(scope="session")
def stories_gguf(shared_dir) -> Path:
    path = shared_dir / "models" / "stories260K.gguf"
    if not path.is_file():
        pytest.skip(f"stories260K.gguf not found at {path}")
    return path


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="module")
def smollm2(shared_dir, smollm2_cache) -> LoadedModel:
    """SmolLM2 de-quantised once for this module (about 20 s), into a cache the CLI test then reuses."""
    path = shared_dir / "models" / SMOLLM2
    if not path.is_file():
        pytest.skip(f"{SMOLLM2} not found at {path}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(smollm2_cache))
        loaded = load_model(str(path))
    assert loaded.gguf is not None and not loaded.gguf.cache_hit
    return loaded


def greedy(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation through the streaming engine (window large enough that nothing is evicted)."""
    engine = StreamingInference(loaded.model, StreamConfig(sink_tokens=4, window=252, chunk=64),
                                tokenizer=loaded.tokenizer)
    row = engine.open_row()
    list(engine.append(row, prompt_ids))
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return [t.token_id for t in generate(engine, row, params, loaded.tokenizer)]


def chat_prompt_ids(tokenizer) -> list[int]:
    """The chat template applied to CHAT_QUESTION, with the assistant's generation prompt."""
    encoded = tokenizer.apply_chat_template(CHAT_QUESTION, add_generation_prompt=True, tokenize=True)
    return encoded["input_ids"]


# ------------------------------------------------------------------ stories260K.gguf = the stories260K folder
def test_stories_gguf_logits_equal_the_folder_model(stories_gguf, model_dir, cache_dir):
    from_gguf, from_folder = load_model(str(stories_gguf)), load_model(str(model_dir))
    text = "Once upon a time, there was a big dog named Max."
    ids = torch.tensor([from_folder.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        ours, reference = from_gguf.model(ids).logits, from_folder.model(ids).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert from_gguf.model.config.pad_token_id is None  # the file's 2^32-1 means "none"


def test_stories_gguf_tokenizer_equals_the_folder_tokenizer(stories_gguf, model_dir, cache_dir):
    """transformers' own GGUF tokenizer loader fails on this file (IndexError on padding id 2^32-1)."""
    ours, reference = load_model(str(stories_gguf)).tokenizer, AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token) == (1, 2, None)
    assert ours.chat_template is None


def test_stories_gguf_greedy_reproduces_the_published_continuation(stories_gguf, cache_dir):
    loaded = load_model(str(stories_gguf))
    prompt = loaded.tokenizer("Once upon a time")["input_ids"]
    assert prompt == [1, 403, 407, 261, 378]
    engine = StreamingInference(loaded.model, StreamConfig(sink_tokens=4, window=200, chunk=32),
                                tokenizer=loaded.tokenizer)
    row = engine.open_row()
    list(engine.append(row, prompt))
    params = SamplingParams(max_new_tokens=57, stop_on_eos=False)
    text = "Once upon a time" + "".join(t.text for t in generate(engine, row, params, loaded.tokenizer))
    assert text == REFERENCE_CONTINUATION


def test_stories_gguf_with_offloaded_layers(stories_gguf, model_dir, cache_dir):
    """--offload reads the decoder layers from the cache entry, as from any local checkpoint folder."""
    offloaded = load_model(str(stories_gguf), offload=OffloadConfig("disk", 2, 1))
    dense = load_model(str(model_dir))
    assert offloaded.gguf.cache_hit is False
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        torch.testing.assert_close(offloaded.model(ids).logits, dense.model(ids).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the cache
def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "sinkstream" / "gguf"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_root() == tmp_path / "home" / ".cache" / "sinkstream" / "gguf"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "sinkstream" / "gguf"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_second_load_hits_the_cache(stories_gguf, cache_dir):
    first = load_model(str(stories_gguf))
    second = load_model(str(stories_gguf))
    assert (first.gguf.cache_hit, second.gguf.cache_hit) == (False, True)
    assert first.gguf.folder == second.gguf.folder == cache_dir / f"{file_sha256(stories_gguf)}-float32"
    assert sorted(p.name for p in cache_dir.iterdir()) == [first.gguf.folder.name]  # no temporaries left
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST} <= {
        p.name for p in first.gguf.folder.iterdir()}
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)


def test_the_key_is_the_content_not_the_path(stories_gguf, cache_dir, tmp_path):
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(stories_gguf.read_bytes())
    assert not gguf_checkpoint(stories_gguf).cache_hit
    assert gguf_checkpoint(copy).cache_hit


def test_another_dtype_is_another_entry(stories_gguf, cache_dir):
    fp32 = load_model(str(stories_gguf))
    bf16 = load_model(str(stories_gguf), dtype=torch.bfloat16)
    assert not bf16.gguf.cache_hit and bf16.gguf.folder != fp32.gguf.folder
    assert bf16.gguf.folder.name.endswith("-bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert load_model(str(stories_gguf), dtype=torch.bfloat16).gguf.cache_hit
    for fp32_param, bf16_param in zip(fp32.model.parameters(), bf16.model.parameters(), strict=True):
        assert torch.equal(fp32_param.to(torch.bfloat16), bf16_param)  # this file's weights are fp32


def _reference_logits(loaded: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(torch.tensor([[1, 403, 407, 261, 378]])).logits


def _replace(file: Path, data: bytes) -> None:
    """A new file in place of `file`: the loaded model still maps the old one (truncating it would SIGBUS)."""
    file.unlink()
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated weights", "flipped byte", "no manifest", "manifest of another",
                                    "missing tokenizer"])
def test_a_damaged_entry_is_rebuilt_not_trusted(stories_gguf, cache_dir, damage):
    built = load_model(str(stories_gguf))
    reference = _reference_logits(built)
    entry = built.gguf.folder
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated weights":
        _replace(weights, data[: len(data) // 2])
    elif damage == "flipped byte":
        data[-100] ^= 0x40  # inside the tensor data: the file still parses, the model would be wrong
        _replace(weights, data)
    elif damage == "no manifest":
        (entry / MANIFEST).unlink()
    elif damage == "manifest of another":
        manifest = json.loads((entry / MANIFEST).read_text())
        (entry / MANIFEST).write_text(json.dumps({**manifest, "gguf_sha256": "0" * 64}))
    else:
        (entry / "tokenizer.json").unlink()
    rebuilt = load_model(str(stories_gguf))
    assert not rebuilt.gguf.cache_hit and rebuilt.gguf.folder == entry
    assert torch.equal(_reference_logits(rebuilt), reference)
    assert load_model(str(stories_gguf)).gguf.cache_hit
    assert sorted(p.name for p in cache_dir.iterdir()) == [entry.name]


def test_a_crash_while_building_leaves_nothing_trusted(stories_gguf, cache_dir, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_loading, "_write_manifest", disk_full)
    with pytest.raises(GgufCacheError, match="No space left"):
        load_model(str(stories_gguf))
    assert list(cache_dir.iterdir()) == []  # the half-built folder is removed, nothing was renamed in
    monkeypatch.undo()
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    assert not load_model(str(stories_gguf)).gguf.cache_hit


def test_a_file_that_is_not_gguf_is_a_clear_error(cache_dir, tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(gguf_loading.GgufFileError, match="cannot read .*model.gguf as a GGUF model"):
        load_model(str(bogus))
    assert [p.name for p in cache_dir.iterdir()] == []


# ------------------------------------------------------------------ SmolLM2-135M-Instruct (Q4_1)
def test_smollm2_file_is_the_published_one(shared_dir):
    path = shared_dir / "models" / SMOLLM2
    if not path.is_file():
        pytest.skip(f"{SMOLLM2} not found")
    assert file_sha256(path) == SMOLLM2_SHA256


def test_smollm2_tokenizer_equals_transformers_gguf_loader(smollm2, shared_dir):
    """On a file without the 2^32-1 trap, our GGUF tokenizer (saved and reloaded from the cache) is
    transformers' own: the same ids for text and for the chat template."""
    reference = AutoTokenizer.from_pretrained(shared_dir / "models", gguf_file=SMOLLM2)
    ours = smollm2.tokenizer
    for text in [*TEXTS, PLAIN_PROMPT, "<|im_start|>user\nhi<|im_end|>"]:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    assert ours.chat_template == reference.chat_template
    assert chat_prompt_ids(ours) == chat_prompt_ids(reference)
    assert load_gguf_tokenizer(shared_dir / "models" / SMOLLM2).get_vocab() == reference.get_vocab()


def test_smollm2_plain_text_greedy_reference(smollm2):
    tok = smollm2.tokenizer
    prompt = tok(PLAIN_PROMPT)["input_ids"]
    assert prompt == PLAIN_PROMPT_IDS  # no BOS for plain text
    out = greedy(smollm2, prompt, 20)
    assert len(out) == 20
    assert tok.decode(out) == PLAIN_REFERENCE


def test_smollm2_chat_greedy_reference(smollm2):
    tok = smollm2.tokenizer
    assert tok.chat_template  # from the GGUF file
    prompt = chat_prompt_ids(tok)
    assert len(prompt) == 37 and prompt[:5] == CHAT_PROMPT_START
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(prompt)
    assert greedy(smollm2, prompt, 64) == CHAT_REPLY_IDS  # stops at <|im_end|> (id 2)
    assert tok.decode(CHAT_REPLY_IDS) == "The capital of France is Paris.<|im_end|>"


def test_smollm2_template_renders_long_conversations_from_two_messages(smollm2):
    """SmolLM2's template is local (core/chat.py): a long conversation is rendered after its first and
    last message only, and the ids are still the template applied to the whole conversation."""
    tok = smollm2.tokenizer
    assert template_is_local(tok)
    renderer, ids, conversation = ChatRenderer(tok), [], []
    for k in range(12):
        conversation.append({"role": ("user", "assistant")[k % 2], "content": f"Turn {k}: hello again."})
        ids += renderer.append(**conversation[-1])
    ids += renderer.generation_prompt()
    assert len(renderer.messages) == 2
    assert ids == list(tok.apply_chat_template(conversation, tokenize=True, return_dict=False,
                                               add_generation_prompt=True))


def test_smollm2_cli_generate_prints_the_reference(smollm2, shared_dir, smollm2_cache, tmp_path):
    """`python -m sinkstream generate --model X.gguf` in a fresh process, which finds the module's entry."""
    weights = smollm2.gguf.folder / "model.safetensors"
    before = weights.stat().st_ino
    env = {**os.environ, CACHE_ENV: str(smollm2_cache), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("SINKSTREAM_SERVER", None)
    args = ["generate", "--model", str(shared_dir / "models" / SMOLLM2), "--prompt", PLAIN_PROMPT,
            "--max-new-tokens", "20", "--dtype", "float32"]
    proc = subprocess.run([sys.executable, "-m", "sinkstream", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PLAIN_PROMPT + PLAIN_REFERENCE + "\n"
    assert sorted(p.name for p in smollm2_cache.iterdir()) == [f"{SMOLLM2_SHA256}-float32"]
    assert weights.stat().st_ino == before  # the same entry was read, not rebuilt


def test_smollm2_references_over_grpc(smollm2, shared_dir):
    """`serve --model X.gguf` serves what load_model gives: both references over a real gRPC server."""
    config = ServerConfig(model=str(shared_dir / "models" / SMOLLM2), port=0, grace_s=0.5)
    server = ServerThread(config, smollm2)
    try:
        with SinkStreamClient(server.address, timeout=120) as client:
            with client.open_session() as session:
                session.append_tokens(PLAIN_PROMPT_IDS)
                plain = session.generate(GenerateParams(max_new_tokens=20))
            with client.open_session() as session:
                session.append_tokens(chat_prompt_ids(smollm2.tokenizer))
                chat = session.generate(GenerateParams(max_new_tokens=64))
    finally:
        server.stop()
    assert (plain.text, plain.generated_tokens) == (PLAIN_REFERENCE, 20)
    assert [t.token_id for t in chat.tokens] == CHAT_REPLY_IDS
    assert chat.stop_reason == "EOS_TOKEN"


# ------------------------------------------------------------------ the command line
def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, CACHE_ENV: str(cache)}
    env.pop("SINKSTREAM_SERVER", None)
    return subprocess.run([sys.executable, "-m", "sinkstream", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def test_cli_missing_gguf_is_a_usage_error(tmp_path):
    absent = tmp_path / "absent.gguf"
    proc = run_cli("generate", "--model", str(absent), "--prompt", "x", cache=tmp_path / "c")
    assert proc.returncode == 2
    assert "model not found" in proc.stderr and "absent.gguf" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bogus_gguf_is_a_usage_error(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"\0" * 64)
    proc = run_cli("generate", "--model", str(bogus), "--prompt", "x", cache=tmp_path / "c")
    assert proc.returncode == 2
    assert "as a GGUF model" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_dtype_reaches_the_loader(stories_gguf, tmp_path):
    """--dtype bfloat16 de-quantises into a -bfloat16 entry (the only one in the cache)."""
    cache = tmp_path / "c"
    proc = run_cli("generate", "--model", str(stories_gguf), "--prompt", "Once upon a time",
                   "--max-new-tokens", "3", "--dtype", "bfloat16", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in cache.iterdir()] == [f"{file_sha256(stories_gguf)}-bfloat16"]


def test_every_model_command_takes_dtype():
    from sinkstream.clients.cli.main import build_parser
    from sinkstream.clients.cli.serve import build_parser as serve_parser

    parser = build_parser()
    for command in (["generate", "--prompt", "x"], ["analyze", "f.txt"], ["chat"]):
        assert parser.parse_args([*command, "--model", "m.gguf", "--dtype", "bfloat16"]).dtype == "bfloat16"
        assert parser.parse_args([*command, "--model", "m.gguf"]).dtype == "float32"
    assert serve_parser().parse_args(["--model", "m.gguf", "--dtype", "bfloat16"]).dtype == "bfloat16"
