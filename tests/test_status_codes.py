"""Status codes as the .proto documents them: state-directory failures are RESOURCE_EXHAUSTED, out-of-range
settings and ids are INVALID_ARGUMENT naming the field, ids are quoted bounded, an unwritable state
directory is refused at start."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from service_support import start_server

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import SessionSettings, SinkStreamError, TierSpec
from sinkstream.service.errors import shown_id
from sinkstream.service.session_store import SessionStore
from sinkstream.service.tenants import DEFAULT_TENANT, SessionKey

U32_MAX = 2**32 - 1


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, state_dir=tmp_path_factory.mktemp("state"))
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with SinkStreamClient(server.address, timeout=30) as c:
        yield c


def refused(call) -> SinkStreamError:
    with pytest.raises(SinkStreamError) as err:
        call()
    return err.value


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS],
                         ids=errno.errorcode.get)
def test_state_dir_write_failures_are_resource_exhausted(client, server, monkeypatch, code):
    def failing_save(*args) -> int:
        raise OSError(code, os.strerror(code))

    with client.open_session() as session:
        session.append_text("Once upon a time")
        monkeypatch.setattr(server.server.manager.store, "save", failing_save)
        err = refused(session.checkpoint)
        assert (err.code, err.field) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "checkpoint")
        assert os.strerror(code) in err.message
        session.close()


@pytest.mark.parametrize(("settings", "field"), [
    (SessionSettings(window=60, chunk=16, tiers=(TierSpec(8, U32_MAX),)), "open.settings.tiers"),
    (SessionSettings(window=60, chunk=16, tiers=(TierSpec(4, 2**31),)), "open.settings.tiers"),
    (SessionSettings(window=60, chunk=16, tiers=(TierSpec(U32_MAX, 2),)), "open.settings.tiers"),
    (SessionSettings(window=60, chunk=16, tiers=(TierSpec(8, 4), TierSpec(2, U32_MAX))),
     "open.settings.tiers"),
    (SessionSettings(sink_tokens=U32_MAX, window=60, chunk=16), "open.settings.sink_tokens"),
    (SessionSettings(window=U32_MAX, chunk=16), "open.settings.window"),
    (SessionSettings(window=60, chunk=U32_MAX), "open.settings.chunk"),
    (SessionSettings(window=60, chunk=61), "open.settings.chunk"),  # the .proto says 1..window
])
def test_out_of_range_shapes_are_invalid_argument_naming_the_field(client, settings, field):
    err = refused(lambda: client.open_session(settings))
    assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, field)


def test_chunk_equal_to_window_is_accepted(client):
    with client.open_session(SessionSettings(window=16, chunk=16)) as session:
        assert session.append_tokens([1, 403, 407])[-1].tokens_seen == 3
        session.close()


@pytest.mark.parametrize("session_id", [".", "..", "-rf", ".hidden", "a/b", "x" * 129, "x" * 100_000])
def test_unsafe_or_long_session_ids_are_refused_and_quoted_bounded(client, session_id):
    for call, field in [(lambda: client.open_session(session_id=session_id), "open.session_id"),
                        (lambda: client.resume_session(session_id), "resume.session_id"),
                        (lambda: client.get_session(session_id), "session_id"),
                        (lambda: client.delete_session(session_id), "session_id")]:
        err = refused(call)
        assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, field)
        assert len(err.message) < 200  # the id is quoted cut to 64 characters


def test_valid_session_ids_still_work(client):
    for session_id in ("a", "_x", "A.b-c_9", "x" * 128):
        with client.open_session(session_id=session_id) as session:
            assert session.id == session_id
            session.close()


def test_quoted_ids_are_cut_with_an_ellipsis():
    assert shown_id("abc") == "'abc'"
    assert shown_id("x" * 64) == repr("x" * 64)
    assert shown_id("x" * 65) == repr("x" * 64) + "..."


def test_store_never_builds_a_path_from_an_unsafe_id(tmp_path):
    store = SessionStore(tmp_path)
    for bad in (".", "..", "-rf", "../escape", ""):
        with pytest.raises(ValueError):
            store.path(SessionKey(DEFAULT_TENANT, bad))
        with pytest.raises(ValueError):
            store.path(SessionKey(bad, "ok-1"))
    assert store.path(SessionKey(DEFAULT_TENANT, "ok-1")).parent == tmp_path
    assert store.path(SessionKey("acme", "ok-1")).parent == tmp_path / "tenants" / "acme"


def can_create_files_in(path: Path) -> bool:
    try:
        (path / "probe").write_bytes(b"")
    except OSError:
        return False
    (path / "probe").unlink()
    return True


def unwritable_dir(tmp_path: Path) -> Path:
    """An existing directory this process cannot create files in (root ignores permission bits)."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o500)
    if can_create_files_in(path):
        path = Path("/sys/kernel")  # sysfs: not writable even for root
        if not path.is_dir() or can_create_files_in(path):
            pytest.skip("no unwritable directory available")
    return path


def test_unwritable_state_dir_is_refused_at_start(model_dir, tmp_path):
    state = unwritable_dir(tmp_path)
    done = subprocess.run([sys.executable, "-m", "sinkstream", "serve", "--model", str(model_dir),
                           "--port", "0", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0] and str(state) in lines[0], done.stdout
    assert "Traceback" not in done.stdout + done.stderr
