"""Snapshots carry a checksum over their tensors and metadata: any damage is SnapshotError in the core and
DATA_LOSS naming the session in the service, never NaN log-probs and never NOT_FOUND (issue 12,
finding 4)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file
from service_support import start_server, stories

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import SessionSettings, SinkStreamError
from sinkstream.core.config import StreamConfig
from sinkstream.core.snapshot import SnapshotError, load_snapshot, save_snapshot
from sinkstream.core.streaming import StreamingInference

CONFIG = StreamConfig(sink_tokens=4, window=40, chunk=8)
SETTINGS = SessionSettings(sink_tokens=4, window=40, chunk=8)
TEXT = "Once upon a time there was a little girl named Lily. She loved to play outside."


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    """File offsets [begin, end) of tensor `name`'s bytes in a safetensors file (its header is JSON)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def flip_key_bit(path: Path) -> None:
    begin, end = tensor_span(path, "keys")
    raw = bytearray(path.read_bytes())
    raw[(begin + end) // 2] ^= 0x40  # one exponent bit of one stored key
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])


def truncate_to_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:20])


def change_metadata(path: Path) -> None:
    """Change one digit of tokens_seen inside the metadata JSON: still valid JSON, same length."""
    raw = path.read_bytes()
    key = b'\\"tokens_seen\\": '
    at = raw.index(key) + len(key)
    digit = raw[at:at + 1]
    path.write_bytes(raw[:at] + (b"1" if digit != b"1" else b"2") + raw[at + 1:])


def break_metadata_json(path: Path) -> None:
    raw = path.read_bytes()
    at = raw.index(b'{\\"format\\"')
    path.write_bytes(raw[:at] + b"x" + raw[at + 1:])


def delete(path: Path) -> None:
    path.unlink()


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "flipped key bit": flip_key_bit, "truncated": truncate, "truncated to its header": truncate_to_header,
    "metadata changed": change_metadata, "metadata unparsable": break_metadata_json, "deleted": delete,
}


@pytest.fixture(scope="module")
def snapshot(model_dir) -> tuple[dict[str, torch.Tensor], dict]:
    loaded = stories(model_dir)
    engine = StreamingInference(loaded.model, CONFIG, tokenizer=loaded.tokenizer)
    row = engine.open_row(1)
    list(engine.append(row, loaded.tokenizer.encode(TEXT)))
    return engine.snapshot(row)


def test_snapshot_round_trip_keeps_every_tensor_and_the_metadata(snapshot, tmp_path):
    tensors, meta = snapshot
    save_snapshot(tmp_path / "s.safetensors", tensors, meta)
    got_tensors, got_meta = load_snapshot(tmp_path / "s.safetensors")
    assert got_meta == json.loads(json.dumps(meta))
    assert got_tensors.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(got_tensors[name], t), name


@pytest.mark.parametrize("damage", CORRUPTIONS)
def test_every_damaged_snapshot_is_refused(snapshot, tmp_path, damage):
    path = tmp_path / "s.safetensors"
    save_snapshot(path, *snapshot)
    CORRUPTIONS[damage](path)
    with pytest.raises(SnapshotError):
        load_snapshot(path)


def test_a_snapshot_without_checksum_is_refused(snapshot, tmp_path):
    tensors, meta = snapshot
    path = tmp_path / "s.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"sinkstream": json.dumps(meta)})
    with pytest.raises(SnapshotError, match="sha256"):
        load_snapshot(path)


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def assert_lost(client: SinkStreamClient, session_id: str) -> None:
    """Resume and GetSession are DATA_LOSS naming the session, again and again, until it is deleted."""
    for _ in range(2):
        err = pytest.raises(SinkStreamError, client.resume_session, session_id).value
        assert err.code == grpc.StatusCode.DATA_LOSS, err
        assert session_id in err.message
        err = pytest.raises(SinkStreamError, client.get_session, session_id).value
        assert err.code == grpc.StatusCode.DATA_LOSS, err
    assert client.health() == "SERVING"
    client.delete_session(session_id)
    err = pytest.raises(SinkStreamError, client.get_session, session_id).value
    assert err.code == grpc.StatusCode.NOT_FOUND


def test_damaged_snapshot_of_a_persisted_session_is_data_loss(model_dir, tmp_path):
    server = start_server(model_dir, state_dir=tmp_path, idle_evict_s=0.2)
    try:
        with SinkStreamClient(server.address, timeout=60) as client:
            ids = {}
            for damage in CORRUPTIONS:
                with client.open_session(SETTINGS) as session:
                    session.append_text(TEXT)
                    ids[damage] = session.id
            for damage, session_id in ids.items():
                wait_for(lambda sid=session_id: client.get_session(sid).state == "PERSISTED")
                CORRUPTIONS[damage](tmp_path / f"{session_id}.safetensors")
            for session_id in ids.values():
                assert_lost(client, session_id)
    finally:
        server.stop()


def persisted_then_damaged(model_dir, tmp_path, damage: str, durability: bool) -> tuple[str, int]:
    """A session persisted at shutdown whose snapshot is then damaged: its id and tokens seen."""
    server = start_server(model_dir, state_dir=tmp_path, durability=durability)
    try:
        with SinkStreamClient(server.address, timeout=60) as client, client.open_session(SETTINGS) as session:
            tokens = session.append_text(TEXT)[-1].tokens_seen
            session_id = session.id
    finally:
        server.stop()  # persists the session
    CORRUPTIONS[damage](tmp_path / f"{session_id}.safetensors")
    return session_id, tokens


@pytest.mark.parametrize("damage", ["truncated to its header", "metadata unparsable", "flipped key bit"])
def test_damaged_snapshot_found_at_start_is_data_loss_not_not_found(model_dir, tmp_path, damage):
    # without a write-ahead log the snapshot is all there is
    session_id, _ = persisted_then_damaged(model_dir, tmp_path, damage, durability=False)
    server = start_server(model_dir, state_dir=tmp_path, durability=False)
    try:
        with SinkStreamClient(server.address, timeout=60) as client:
            assert_lost(client, session_id)
            assert not list(tmp_path.glob("*.safetensors"))
    finally:
        server.stop()


@pytest.mark.parametrize("damage", ["truncated to its header", "flipped key bit"])
def test_damaged_snapshot_found_at_start_is_rebuilt_from_the_log(model_dir, tmp_path, damage):
    # the session's log still reaches back to its opening (its first snapshot cut nothing): it is replayed
    session_id, tokens = persisted_then_damaged(model_dir, tmp_path, damage, durability=True)
    server = start_server(model_dir, state_dir=tmp_path)
    try:
        with SinkStreamClient(server.address, timeout=60) as client:
            assert client.get_session(session_id).tokens_seen == tokens
            with client.resume_session(session_id) as resumed:
                assert resumed.opened.tokens_seen == tokens
    finally:
        server.stop()
