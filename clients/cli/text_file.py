"""A document read as text blocks for `sinkstream analyze`, whatever its bytes.

Decision (issue 12): analyze accepts any bytes. A surprisal analysis of a log with a stray Latin-1 byte is
still useful, and refusing would waste the work done before that byte; so invalid UTF-8 is read as U+FFFD
(one per invalid sequence, as Python's "replace" does) and the command warns once at the end, saying how
many sequences were replaced and where the first was. Reads are bounded blocks; memory stays flat."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

BLOCK_BYTES = 1 << 16


class TextBlocks:
    """Iterate a file as str blocks (UTF-8, invalid sequences as U+FFFD); counts bytes read and replaced
    sequences. A multi-byte character cut by a block boundary is carried to the next block."""

    def __init__(self, path: str | Path, block_bytes: int = BLOCK_BYTES) -> None:
        self.path = Path(path)
        self.block_bytes = block_bytes
        self.bytes_read = 0
        self.invalid_sequences = 0
        self.first_invalid_byte: int | None = None

    def __iter__(self) -> Iterator[str]:
        carry = b""
        with self.path.open("rb") as f:
            while True:
                raw = f.read(self.block_bytes)
                final = not raw
                data, offset = carry + raw, self.bytes_read - len(carry)
                self.bytes_read += len(raw)
                text, used = self._decode(memoryview(data), offset, final)
                carry = data[used:]
                if text:
                    yield text
                if final:
                    return

    def _decode(self, data: memoryview, offset: int, final: bool) -> tuple[str, int]:
        """Text of `data` (which starts at file byte `offset`) and the bytes used; an incomplete trailing
        sequence is left unused unless `final`."""
        pieces, pos = [], 0
        while True:
            try:
                text, used = codecs.utf_8_decode(data[pos:], "strict", final)
            except UnicodeDecodeError as exc:
                pieces.append(str(data[pos:pos + exc.start], "utf-8"))
                pieces.append("\ufffd")
                if self.first_invalid_byte is None:
                    self.first_invalid_byte = offset + pos + exc.start
                self.invalid_sequences += 1
                pos += exc.end
                continue
            pieces.append(text)
            return "".join(pieces), pos + used

    def warning(self) -> str | None:
        """What to tell the user about replaced bytes, or None when the file was valid UTF-8."""
        if not self.invalid_sequences:
            return None
        return (f"{self.path} is not valid UTF-8: {self.invalid_sequences} invalid byte sequences (first at "
                f"byte {self.first_invalid_byte}) were read as U+FFFD")
