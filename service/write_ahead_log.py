"""Write-ahead log files: append-only, length-prefixed JSON records with a CRC32, group-committed with fsync.

One file per session (its path comes from the session store). A record on disk is

    <u32 payload length, little endian> <u32 zlib.crc32(payload)> <payload: UTF-8 JSON object>

JSON and struct only: nothing read back from disk is ever unpickled. A crash can leave a torn last record
(short header, short payload, wrong CRC, unparsable JSON); `read_log` stops at the first bad record and
`recover_log` cuts the file back to the last good one.

`GroupCommitter` is the one background thread that writes every session's records: it takes everything
queued since its last round, writes it, fsyncs each touched file once (several sessions share one round)
and then reports each record durable through the `notify` callback the owner supplies (the server posts
them to its event loop). The event loop never waits on a disk.

Only files holding a record someone waits for (a `done`) are fsynced in a round: the other records (e.g.
a chunk having run) are written at once, so they survive the process being killed, and made durable
against a power loss by the next fsync of their file, which covers everything written before it. What
an acknowledgement promises (its record and every record before it in the file) is unchanged; records
nobody waits for cost a write, not an fsync each, and are gathered for a few milliseconds first (see
LAZY_WRITE_S; a kill -9 can lose those, which no acknowledgement covers, and recovery then holds their
input as pending again).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("sinkstream.wal")
HEADER = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 30  # a longer length field is damage, not a record
OPEN_FILES = 256  # log files kept open between rounds (more sessions: the least recent are closed)
# Records nobody waits for are gathered for up to LAZY_WRITE_S (or LAZY_BATCH of them) and written in one
# round: a wake-up of the committer thread per record (one per chunk run) contends for the GIL with the
# forward passes; one that someone waits for (an ack) starts a round at once.
LAZY_WRITE_S = 0.02
LAZY_BATCH = 256

Done = Callable[[BaseException | None], None]  # told once a record is durable (None) or failed (its error)


def encode_record(record: dict[str, Any]) -> bytes:
    """One record as it is stored: header (length, CRC32) + compact UTF-8 JSON."""
    payload = json.dumps(record, separators=(",", ":")).encode()
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass
class LogContents:
    """What a log file holds: its good records with their byte offsets, where the good part ends, and why
    the rest (if any) was not read."""

    records: list[dict[str, Any]]
    offsets: list[int]
    good_bytes: int
    damage: str | None


def read_log(path: Path) -> LogContents:
    """Every record of a log up to the first damaged one (a missing file holds none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LogContents([], [], 0, None)
    records, offsets, pos, damage = [], [], 0, None
    while pos < len(data):
        if len(data) - pos < HEADER.size:
            damage = f"short record header at byte {pos}"
            break
        length, crc = HEADER.unpack_from(data, pos)
        start = pos + HEADER.size
        if length > MAX_RECORD_BYTES or start + length > len(data):
            damage = f"record at byte {pos} claims {length} bytes, {len(data) - start} left"
            break
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            damage = f"CRC mismatch in the record at byte {pos}"
            break
        try:
            record = json.loads(payload)
        except ValueError:
            damage = f"unparsable record at byte {pos}"
            break
        if not isinstance(record, dict):
            damage = f"record at byte {pos} is not an object"
            break
        records.append(record)
        offsets.append(pos)
        pos = start + length
    return LogContents(records, offsets, pos, damage)


def truncate_log(path: Path, size: int) -> None:
    """Cut a log file to `size` bytes, durably."""
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        _sync(f.fileno())


def recover_log(path: Path) -> LogContents:
    """Read a log and cut off a torn or corrupt tail (logged), so later appends follow good records."""
    contents = read_log(path)
    if contents.damage is not None:
        log.warning("write-ahead log tail cut off", extra={"path": str(path), "error": contents.damage,
                                                          "kept_records": len(contents.records)})
        truncate_log(path, contents.good_bytes)
    return contents


def _sync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def sync_dir(directory: Path) -> None:
    """fsync a directory, so a rename or a new file in it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class _Append:
    path: Path
    data: bytes
    done: Done | None


@dataclass
class _Rewrite:
    """Replace a log with the records `keep` selects (atomically: temp file, fsync, rename, fsync dir)."""

    path: Path
    keep: Callable[[dict[str, Any]], bool]


@dataclass
class _Delete:
    path: Path


class GroupCommitter:
    """The background thread that makes log records durable, many sessions per fsync round.

    `notify(callbacks)` is called from the thread with the round's (done, error) pairs; it must hand them
    to their owner's thread (e.g. loop.call_soon_threadsafe) quickly.
    """

    def __init__(self, notify: Callable[[list[tuple[Done, BaseException | None]]], None],
                 sync: bool = True) -> None:
        self.notify = notify
        self.sync = sync
        self._ops: list[_Append | _Rewrite | _Delete] = []
        self._urgent = False  # something queued is waited for: write it now
        self._cv = threading.Condition()
        self._stopping = False
        self._files: OrderedDict[Path, int] = OrderedDict()
        self._unsynced: set[Path] = set()  # open files written since their last fsync
        self.rounds = 0  # fsync rounds done (for tests and benchmarks)
        self._thread = threading.Thread(target=self._run, name="sinkstream-wal", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called from any thread
    def append(self, path: Path, record: dict[str, Any], done: Done | None = None) -> None:
        """Queue one record for `path`; `done` is told once it is on disk."""
        self._put(_Append(path, encode_record(record), done), urgent=done is not None)

    def rewrite(self, path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Queue dropping the records of `path` that `keep` refuses (after every record queued before)."""
        self._put(_Rewrite(path, keep))

    def delete(self, path: Path) -> None:
        """Queue removing the log (after every record queued before)."""
        self._put(_Delete(path))

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(30)
        for path in list(self._files):
            self._close(path)

    def _put(self, op, urgent: bool = True) -> None:
        with self._cv:
            first = not self._ops
            self._ops.append(op)
            if urgent or len(self._ops) >= LAZY_BATCH:
                self._urgent = True
                self._cv.notify()
            elif first:
                self._cv.notify()  # the thread starts gathering

    # ------------------------------------------------------------------ the thread
    def _next_round(self) -> list:
        """Wait for ops: at once when one is waited for, else after LAZY_WRITE_S of gathering."""
        with self._cv:
            while not self._stopping and not self._urgent:
                if not self._ops:
                    self._cv.wait()
                elif not self._cv.wait(LAZY_WRITE_S):
                    break  # nobody waits: write what gathered
            ops, self._ops, self._urgent = self._ops, [], False
            return ops

    def _run(self) -> None:
        while True:
            ops = self._next_round()
            if not ops and self._stopping:
                return
            self._round(ops)

    def _round(self, ops: list) -> None:
        """Write one round of ops in order, fsync each touched file once, then report them."""
        touched: dict[Path, BaseException | None] = {}
        buffers: dict[Path, list[bytes]] = {}
        callbacks: list[tuple[Done, Path | None]] = []
        for op in ops:
            if isinstance(op, _Append):
                if op.data:
                    buffers.setdefault(op.path, []).append(op.data)
                if op.done is not None:
                    callbacks.append((op.done, op.path if op.data else None))
                continue
            self._write(op.path, buffers.pop(op.path, []), touched)
            try:
                self._close(op.path, sync=False)  # rewritten (fsync'd) or removed next
                if isinstance(op, _Rewrite):
                    self._rewrite(op)
                else:
                    op.path.unlink(missing_ok=True)
                touched.pop(op.path, None)
            except OSError as exc:
                log.error("write-ahead log maintenance failed: %r", exc, extra={"path": str(op.path)})
        for path, chunks in buffers.items():
            self._write(path, chunks, touched)
        waited = {path for _, path in callbacks if path is not None}
        for path, error in list(touched.items()):
            # a file nobody waits on stays unsynced until the next record someone waits for (or its close)
            if error is None and path in waited and path in self._unsynced:
                try:
                    self._sync(path)
                except OSError as exc:
                    touched[path] = exc
        self.rounds += 1
        results = [(done, touched.get(path) if path is not None else None) for done, path in callbacks]
        for _, error in results:
            if error is not None:
                log.error("write-ahead log write failed: %r", error)
        if results:
            self.notify(results)

    def _write(self, path: Path, chunks: list[bytes], touched: dict[Path, BaseException | None]) -> None:
        if not chunks:
            return
        try:
            fd = self._open(path)
            data = b"".join(chunks)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            touched.setdefault(path, None)
            if self.sync:
                self._unsynced.add(path)
        except OSError as exc:
            touched[path] = exc
            self._close(path, sync=False)

    def _open(self, path: Path) -> int:
        fd = self._files.get(path)
        if fd is not None:
            self._files.move_to_end(path)
            return fd
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if new and self.sync:
            sync_dir(path.parent)  # the new file's directory entry must survive too
        self._files[path] = fd
        if len(self._files) > OPEN_FILES:
            self._close(next(iter(self._files)))
        return fd

    def _sync(self, path: Path) -> None:
        self._unsynced.discard(path)
        _sync(self._files[path])

    def _close(self, path: Path, sync: bool = True) -> None:
        """Close a log file, first making what was written to it durable (unless `sync` is False)."""
        if sync and path in self._unsynced:
            try:
                self._sync(path)
            except OSError as exc:
                log.error("write-ahead log sync failed: %r", exc, extra={"path": str(path)})
        self._unsynced.discard(path)
        fd = self._files.pop(path, None)
        if fd is not None:
            os.close(fd)

    def _rewrite(self, op: _Rewrite) -> None:
        contents = read_log(op.path)
        tmp = op.path.with_name(op.path.name + ".tmp")
        with open(tmp, "wb") as f:
            for record in contents.records:
                if op.keep(record):
                    f.write(encode_record(record))
            f.flush()
            if self.sync:
                _sync(f.fileno())
        os.replace(tmp, op.path)
        if self.sync:
            sync_dir(op.path.parent)
