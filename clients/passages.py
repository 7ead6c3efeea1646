"""The most surprising passages of an analysed document, and where they are in the file.

Finding: the mean surprisal (negative log-likelihood, nats/token) over every `span`-token window, sampled
every span/4 tokens (and the window ending at the last token); the best windows that do not overlap win.
PassageFinder does it as tokens stream by, in memory independent of the stream's length.

Locating: the stream reports token ids, not character offsets, so a passage is found again in the file by
tokenizing a stretch of text around where it should be (estimated from the bytes-per-token ratio) with the
same tokenizer (in-process: the tokenizer itself; over gRPC: the server's `Tokenize` call), finding the
passage's ids in it, then bisecting on prefix lengths for the character where its first and last tokens
start. Pure Python, no torch.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
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


class PassageFinder:
    """The most surprising passages of a stream of per-token NLL, in memory independent of its length: the
    last `span` values (and ids), and a min-heap of the best `keep` windows scored so far.

    Same result as scoring every window and choosing greedily over all of them (find_passages' definition):
    a chosen window conflicts with at most 2*ceil(span/stride) others, so the i-th window the greedy choice
    takes ranks at most i * 2*ceil(span/stride) among all windows, and keeping count * (that + 1) suffices."""

    def __init__(self, count: int = 5, span: int = 32) -> None:
        self.count, self.span = count, max(1, span)
        self.stride = max(1, self.span // 4)
        self.keep = max(0, count) * (2 * math.ceil(self.span / self.stride) + 1)
        self.tokens = 0
        self._nll: deque[float] = deque(maxlen=self.span)
        self._ids: deque[int] = deque(maxlen=self.span)
        self._best: list[tuple[float, int, tuple[int, ...]]] = []  # min-heap of (mean, start, needle ids)

    def add(self, nll: Sequence[float], ids: Sequence[int] | None = None) -> None:
        """Append tokens: nll [n] (NaN = unscored), ids [n] or None (then passages cannot be located)."""
        for i, x in enumerate(nll):
            self._nll.append(x)
            if ids is not None:
                self._ids.append(ids[i])
            self.tokens += 1
            start = self.tokens - self.span
            if start >= 0 and start % self.stride == 0:
                self._offer(self._score(start), self._best)

    def _score(self, start: int) -> tuple[float, int, tuple[int, ...]] | None:
        """The window of the last len(self._nll) tokens, starting at token `start` (None: nothing scored)."""
        scored = [x for x in self._nll if not math.isnan(x)]
        if not scored:
            return None
        needle = tuple(islice(self._ids, NEEDLE_TOKENS)) if len(self._ids) == len(self._nll) else ()
        return sum(scored) / len(scored), start, needle

    def _offer(self, window: tuple[float, int, tuple[int, ...]] | None, heap: list) -> None:
        if window is None or self.keep == 0:
            return
        if len(heap) < self.keep:
            heapq.heappush(heap, window)
        elif window[:2] > heap[0][:2]:
            heapq.heapreplace(heap, window)

    def retained(self) -> int:
        """Items held (window values, ids, scored windows): at most 2*span + keep, whatever the length."""
        return len(self._nll) + len(self._ids) + len(self._best)

    def passages(self) -> tuple[list[Passage], list[tuple[int, ...]]]:
        """Up to `count` non-overlapping windows, best first, and each one's first ids (its needle, empty
        when no ids were given). The last window ends at the last token; a stream shorter than `span`
        is one window."""
        n = self.tokens
        if n == 0 or self.count <= 0:
            return [], []
        span = min(self.span, n)
        candidates = list(self._best)
        if span < self.span or (n - span) % self.stride:  # the window ending at the stream's end
            self._offer(self._score(n - span), candidates)
        chosen: list[tuple[float, int, tuple[int, ...]]] = []
        for window in sorted(candidates, key=lambda w: w[:2], reverse=True):
            if all(abs(window[1] - other[1]) >= span for other in chosen):
                chosen.append(window)
                if len(chosen) == self.count:
                    break
        return ([Passage(rank=i + 1, token_start=s, token_end=s + span, mean_nll=m)
                 for i, (m, s, _) in enumerate(chosen)], [needle for _, _, needle in chosen])


def find_passages(token_nll: Sequence[float], count: int = 5, span: int = 32) -> list[Passage]:
    """Up to `count` non-overlapping windows of `span` tokens with the highest mean NLL (NaN = unscored,
    left out of the mean), best first. token_nll: [tokens] floats."""
    finder = PassageFinder(count, span)
    finder.add(token_nll)
    return finder.passages()[0]


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
    return start + cut, raw[cut:].decode("utf-8", errors="replace")  # as analyze reads it


def locate(passages: list[Passage], path: str | Path, token_ids: Sequence[int], tokenize: Tokenize,
           radius_bytes: int = 4096, max_radius_bytes: int = 1 << 18) -> None:
    """locate_needles with each passage's needle taken from token_ids: [tokens] the stream's ids."""
    needles = [token_ids[p.token_start:p.token_start + min(NEEDLE_TOKENS, p.token_end - p.token_start)]
               for p in passages]
    locate_needles(passages, needles, len(token_ids), path, tokenize, radius_bytes, max_radius_bytes)


def locate_needles(passages: list[Passage], needles: Sequence[Sequence[int]], total_tokens: int,
                   path: str | Path, tokenize: Tokenize, radius_bytes: int = 4096,
                   max_radius_bytes: int = 1 << 18) -> None:
    """Fill byte offsets, line:column and an excerpt of each passage in place. needles[i]: the first ids of
    passages[i] (up to NEEDLE_TOKENS; empty = leave it unlocated); total_tokens: the stream's length (its
    first token may be a beginning-of-sequence token). Reads only stretches of at most 2*max_radius_bytes
    around each passage's estimated offset, then the file once line by line: memory is bounded."""
    path = Path(path)
    size = path.stat().st_size
    if not passages or total_tokens == 0 or size == 0:
        return
    for p, needle in zip(passages, needles, strict=True):
        if not needle:
            continue
        estimate = int(size * p.token_start / total_tokens)
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


_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


def _chars(raw: bytes) -> int:
    """Characters in UTF-8 bytes: the bytes that are not continuation bytes."""
    return len(raw.translate(None, _CONTINUATION_BYTES))


def _fill_lines(passages: list[Passage], path: Path, block_bytes: int = 1 << 20) -> None:
    """line:column of each located passage's first byte, in one pass over the file in blocks (a file of
    one huge line is never held whole)."""
    todo = sorted((p for p in passages if p.byte_start is not None), key=lambda p: p.byte_start)
    line_no, offset, column_chars = 1, 0, 0  # column_chars: characters of the current line before offset
    with path.open("rb") as f:
        while todo and (raw := f.read(block_bytes)):
            end = offset + len(raw)
            while todo and todo[0].byte_start < end:
                p = todo.pop(0)
                upto = p.byte_start - offset
                newline = raw.rfind(b"\n", 0, upto)
                p.line = line_no + raw.count(b"\n", 0, upto)
                p.column = 1 + (_chars(raw[newline + 1:upto]) if newline >= 0
                                else column_chars + _chars(raw[:upto]))
            newline = raw.rfind(b"\n")
            line_no += raw.count(b"\n")
            column_chars = _chars(raw[newline + 1:]) if newline >= 0 else column_chars + _chars(raw)
            offset = end
