"""The most surprising passages of an analysed document, and where they are in the file.

Finding: the mean surprisal (negative log-likelihood, nats/token) over every `span`-token window, sampled
every span/4 tokens; the best windows that do not overlap win.

Locating: the stream reports token ids, not character offsets, so a passage is found again in the file by
tokenizing a stretch of text around where it should be (estimated from the bytes-per-token ratio) with the
same tokenizer (in-process: the tokenizer itself; over gRPC: the server's `Tokenize` call), finding the
passage's ids in it, then bisecting on prefix lengths for the character where its first and last tokens
start. Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

Tokenize = Callable[[str], Sequence[int]]  # text -> token ids, without a beginning-of-sequence token

NEEDLE_TOKENS = 12  # ids that identify a passage's start in a re-tokenized stretch of text
EXCERPT_CHARS = 160


@dataclass
class Passage:
    """A stretch of `token_end - token_start` tokens with a high mean surprisal. Location fields stay None
    when the passage could not be found in the file."""

    rank: int
    token_start: int
    token_end: int
    mean_nll: float
    byte_start: int | None = None
    byte_end: int | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based, in characters
    excerpt: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def location(self) -> str:
        return f"line {self.line}:{self.column}" if self.line is not None else "location unknown"


def find_passages(token_nll: Sequence[float], count: int = 5, span: int = 32) -> list[Passage]:
    """Up to `count` non-overlapping windows of `span` tokens with the highest mean NLL (NaN = unscored,
    left out of the mean), best first. token_nll: [tokens] floats."""
    n = len(token_nll)
    if n == 0 or count <= 0:
        return []
    span = max(1, min(span, n))
    sums = [0.0, *accumulate(0.0 if math.isnan(x) else x for x in token_nll)]
    counts = [0, *accumulate(0 if math.isnan(x) else 1 for x in token_nll)]
    stride = max(1, span // 4)
    starts = list(range(0, n - span + 1, stride))
    if starts[-1] != n - span:
        starts.append(n - span)
    scored = [((sums[s + span] - sums[s]) / (counts[s + span] - counts[s]), s)
              for s in starts if counts[s + span] > counts[s]]
    scored.sort(reverse=True)
    chosen: list[tuple[float, int]] = []
    for mean, start in scored:
        if all(abs(start - other) >= span for _, other in chosen):
            chosen.append((mean, start))
            if len(chosen) == count:
                break
    return [Passage(rank=i + 1, token_start=s, token_end=s + span, mean_nll=m)
            for i, (m, s) in enumerate(chosen)]


def _first_prefix_with_more_than(tokenize: Tokenize, text: str, tokens: int) -> int:
    """Smallest p with len(tokenize(text[:p])) > tokens (len(text) + 1 if none): the character just after
    the start of token `tokens` of `text`."""
    lo, hi = 0, len(text) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if mid <= len(text) and len(tokenize(text[:mid])) > tokens:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int:
    n = len(needle)
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i:i + n]) == list(needle):
            return i
    return -1


def _read_text(path: Path, start: int, end: int) -> tuple[int, str]:
    """The text of bytes [start, end) widened to whole UTF-8 characters; returns (byte start, text)."""
    with path.open("rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    cut = 0
    while cut < min(4, len(raw)) and (raw[cut] & 0xC0) == 0x80:  # continuation bytes of a cut character
        cut += 1
    return start + cut, raw[cut:].decode("utf-8", errors="ignore")


def locate(passages: list[Passage], path: str | Path, token_ids: Sequence[int], tokenize: Tokenize,
           radius_bytes: int = 4096, max_radius_bytes: int = 1 << 18) -> None:
    """Fill byte offsets, line:column and an excerpt of each passage in place. token_ids: [tokens] the
    stream's ids (index = token offset; the first may be a beginning-of-sequence token)."""
    path = Path(path)
    size = path.stat().st_size
    total = len(token_ids)
    if not passages or total == 0 or size == 0:
        return
    for p in passages:
        needle = token_ids[p.token_start:p.token_start + min(NEEDLE_TOKENS, p.token_end - p.token_start)]
        estimate = int(size * p.token_start / total)
        radius = radius_bytes
        while True:
            lo, hi = max(0, estimate - radius), min(size, estimate + radius)
            base, text = _read_text(path, lo, hi)
            ids = list(tokenize(text))
            at = _find(ids, needle)
            if at >= 0 or radius >= max_radius_bytes or (lo == 0 and hi == size):
                break
            radius *= 4
        if at < 0:
            continue
        first = _first_prefix_with_more_than(tokenize, text, at) - 1
        last = _first_prefix_with_more_than(tokenize, text, at + (p.token_end - p.token_start)) - 1
        last = min(max(last, first + 1), len(text))
        p.byte_start = base + len(text[:first].encode("utf-8"))
        p.byte_end = base + len(text[:last].encode("utf-8"))
        excerpt = text[_word_start(text, first):_word_end(text, last)]
        if len(excerpt) > EXCERPT_CHARS:
            excerpt = excerpt[:EXCERPT_CHARS - 1] + "\u2026"
        p.excerpt = " ".join(excerpt.split())
    _fill_lines(passages, path)


def _word_start(text: str, i: int, reach: int = 24) -> int:
    """i moved left to the start of its word (at most `reach` characters): passages may start mid-word."""
    j = i
    while j > 0 and i - j < reach and not text[j - 1].isspace():
        j -= 1
    return j if j == 0 or text[j - 1].isspace() else i


def _word_end(text: str, i: int, reach: int = 24) -> int:
    j = i
    while j < len(text) and j - i < reach and not text[j].isspace():
        j += 1
    return j


def _fill_lines(passages: list[Passage], path: Path) -> None:
    """line:column of each located passage's first byte, in one pass over the file."""
    todo = sorted((p for p in passages if p.byte_start is not None), key=lambda p: p.byte_start)
    if not todo:
        return
    line_no, offset = 1, 0
    with path.open("rb") as f:
        for raw in f:
            end = offset + len(raw)
            while todo and todo[0].byte_start < end:
                p = todo.pop(0)
                p.line = line_no
                p.column = len(raw[:p.byte_start - offset].decode("utf-8", errors="ignore")) + 1
            if not todo:
                return
            line_no, offset = line_no + 1, end
