"""Text arriving in pieces: incremental tokenization in; incremental detokenization and stop sequences out.

Encoding guarantee: pushing a text in arbitrary pieces (str, or bytes cut anywhere, even inside a character)
and then flushing yields exactly `tokenizer(whole_text)["input_ids"]`, BOS included once at the start.

Hold-back rule (encoder): a cut before a space whose left neighbour is not whitespace is a hard token
boundary whenever the word marker only ever starts a token (SentencePiece "▁" vocabularies, byte-level BPE
"Ġ", checked on the vocabulary at construction), so everything before the last such cut is final no matter
what text follows. The encoder tokenizes (left context + held text) once per push, commits the tokens
before the last cut - after checking that no token straddles the cut - and holds the rest (normally the last
partial word). The left context is the committed word before the held text; it is re-tokenized and dropped,
so tokenizers that add a word marker at the start of a text (prepend schemes, Prepend normalizers) see the
held text as mid-document text. Text without such a cut for more than `max_hold_chars` characters
(CJK, long symbol runs) is committed where two tokenizations with different amounts of look-ahead agree,
keeping the held text bounded; that path is a locality heuristic, exact for the tokenizers tested here.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable, Sequence

import numpy as np

# how a space appears in vocabularies: itself, "▁" (SentencePiece), "Ġ" (byte-level BPE)
_WORD_MARKERS = " \u2581\u0120"
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# transformers' clean_up_tokenization replaces these; a delta ending in a proper prefix of one is held.
_CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
# Left contexts for text that continues the stream after a forced boundary (raw ids, a flush inside a
# word): a newline is a hard boundary that adds no word marker; "" (start-of-text rules) is the last resort.
_SEPARATOR_CONTEXTS = ("\n", "")


def backend_of(tokenizer):
    """The `tokenizers.Tokenizer` behind a Hugging Face fast tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode_batch"):
        raise TypeError(f"a fast (tokenizers-backed) tokenizer is required, got {type(tokenizer).__name__}")
    return backend


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) the tokenizer adds around a single text, e.g. ([BOS], []) for Llama."""
    if callable(tokenizer) and not hasattr(tokenizer, "encode_batch"):
        with_special = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    else:
        with_special = tokenizer.encode("a").ids
        plain = tokenizer.encode("a", add_special_tokens=False).ids
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain):]
    raise ValueError("cannot locate the text's tokens among the tokenizer's special tokens")


# Facts read off a whole vocabulary are cached per tokenizer backend: scanning a large vocabulary in Python
# is a cost every session and every generation request would otherwise pay. (A tokenizer whose vocabulary
# changes after first use is not supported.)
@functools.lru_cache(maxsize=8)
def space_cuts_are_hard(backend) -> bool:
    """Whether no vocabulary token has a word marker (space, "▁", byte-level "Ġ") after another character:
    then no token can span "x" + " ", so a cut there is final whatever text follows."""
    for token in backend.get_vocab(with_added_tokens=False):
        body = token.lstrip(_WORD_MARKERS)
        if body and any(marker in body for marker in _WORD_MARKERS):
            return False
    return True


@functools.lru_cache(maxsize=8)
def byte_fallback_ids(backend) -> frozenset[int]:
    """Ids of the byte-fallback tokens ("<0xE2>" ...), which can carry part of a UTF-8 character."""
    vocab = backend.get_vocab(with_added_tokens=True)
    return frozenset(i for token, i in vocab.items() if _BYTE_TOKEN.match(token))


def last_cut(text: str, lo: int = 0) -> int | None:
    """Largest c > lo with text[c] == " " and text[c - 1] not whitespace (a hard token boundary), or None."""
    c = text.rfind(" ", lo + 1)
    while c > lo:
        if not text[c - 1].isspace():
            return c
        c = text.rfind(" ", lo + 1, c)
    return None


class IncrementalEncoder:
    """Tokenizes one stream's text as it arrives; see the module docstring for the hold-back rule.

    push(piece) returns the token ids that became final; flush() returns the rest (call it when the client
    says the text is complete: end of message batch, end of document, or before generating). Text pushed
    after a flush continues the same stream: it is tokenized as in the whole text whenever the flush point
    is a token boundary of the whole text (e.g. the next piece starts with a space), otherwise the flush
    point acts as a forced token boundary.
    """

    def __init__(self, tokenizer, *, max_hold_chars: int = 4096, context_chars: int = 64,
                 add_special_tokens: bool = True) -> None:
        if max_hold_chars < 16 or context_chars < 1:
            raise ValueError("max_hold_chars must be >= 16 and context_chars >= 1")
        self._backend = backend_of(tokenizer)
        self._prefix, self._suffix = special_affixes(tokenizer) if add_special_tokens else ([], [])
        self.space_cuts_are_hard = space_cuts_are_hard(self._backend)
        self.max_hold_chars = max_hold_chars
        self.context_chars = context_chars
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # committed text just before _held, re-tokenized as left context; None at the start of a text
        # (stream start, after end_of_document), "" right after raw ids
        self._context: str | None = None
        self._held = ""  # received text whose tokens are not final yet
        self._started = False  # whether any id (BOS included) has been emitted on this stream

    @property
    def held_text(self) -> str:
        """Text received but not yet turned into ids (bounded by about max_hold_chars + one piece)."""
        return self._held

    @property
    def started(self) -> bool:
        """Whether any id (BOS included) has been emitted on this stream."""
        return self._started

    @property
    def holds_text(self) -> bool:
        """Whether text (or the start of a UTF-8 character) was received but not yet turned into ids."""
        return bool(self._held) or bool(self._utf8.getstate()[0])

    def state(self) -> dict[str, str | bool | None]:
        """JSON-able state (held text, left context, pending UTF-8 bytes) for session snapshots."""
        return {"context": self._context, "held": self._held, "started": self._started,
                "utf8_pending": self._utf8.getstate()[0].hex()}

    def load_state(self, state: dict[str, str | bool | None]) -> None:
        """Continue a stream saved with state(): later text is tokenized as if it had never stopped."""
        context = state["context"]
        self._context, self._held = (None if context is None else str(context)), str(state["held"])
        self._started = bool(state["started"])
        self._utf8.setstate((bytes.fromhex(str(state["utf8_pending"])), 0))

    def push(self, piece: str | bytes) -> list[int]:
        """Append a piece of text (bytes may end inside a UTF-8 character); return the ids now final."""
        if isinstance(piece, bytes | bytearray | memoryview):
            self._held += self._utf8.decode(bytes(piece))
        else:
            self._held += self._utf8.decode(b"", final=True) + piece  # pending bytes end before a str
        ids: list[int] = []
        cut = last_cut(self._held) if self.space_cuts_are_hard else None
        if cut is not None:
            ids = self._commit(cut) or []
        if len(self._held) > self.max_hold_chars:
            ids += self._commit_by_agreement()
        return self._start(ids)

    def flush(self, end_of_document: bool = False) -> list[int]:
        """Make all received text final; return its ids. end_of_document also appends the tokenizer's
        suffix tokens (EOS for tokenizers that add one; none for Llama); the next text is then tokenized
        like the start of a document (word marker and all), without a second BOS."""
        self._held += self._utf8.decode(b"", final=True)
        ids = self._commit(len(self._held)) if self._held else []
        ids = self._start(ids, force=True)
        if end_of_document:
            ids += self._suffix
            self._context = None
        return ids

    def push_ids(self, ids: Iterable[int]) -> list[int]:
        """Append token ids directly (e.g. generated tokens, pre-tokenized input); returns the ids to feed
        the model: any held text first (flushed), then `ids`. No BOS is added in front of raw ids. Text
        pushed afterwards continues the stream after a forced boundary: no word marker is added unless the
        text starts with a space."""
        head = self.flush() if self._held or self._utf8.getstate()[0] else []
        self._started = True
        self._context = ""
        return head + list(ids)

    def _start(self, ids: list[int], force: bool = False) -> list[int]:
        """Put the tokenizer's prefix (BOS) in front of the stream's first ids."""
        if self._started or not (ids or force):
            return ids
        self._started = True
        return self._prefix + ids

    def _commit(self, cut: int) -> list[int] | None:
        """Commit self._held[:cut]; None if the tokenization has no token boundary at the cut."""
        context, enc, offsets, first = self._encode_held()
        last = first_token_at(offsets, len(context) + cut)
        if last is None:
            return None
        self._context = self._context_for(context + self._held[:cut])
        self._held = self._held[cut:]
        return enc.ids[first:last]

    def _encode_held(self):
        """Tokenize (left context + held text) with the first left context that leaves a token boundary
        in front of the held text. Returns (context, Encoding, offsets [n, 2], index of first held token)."""
        for context in self._left_contexts():
            enc = self._backend.encode(context + self._held, add_special_tokens=False)
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            first = first_token_at(offsets, len(context))
            if first is not None:
                return context, enc, offsets, first
        raise AssertionError("unreachable: the empty context always leaves a boundary at 0")

    def _left_contexts(self) -> tuple[str, ...]:
        """Left contexts to try, best first, for tokenizing the held text as the stream has it."""
        if self._context is None:
            return ("",)
        return (self._context, *_SEPARATOR_CONTEXTS) if self._context else _SEPARATOR_CONTEXTS

    def _context_for(self, text: str) -> str:
        """Left context for the next commit: the last word of `text`, at most context_chars long."""
        lo = max(0, len(text) - self.context_chars)
        start = last_cut(text, lo)
        return text[lo if start is None else start:]

    def _commit_by_agreement(self) -> list[int]:
        """No whitespace cut in a long held text: commit the tokens on which two tokenizations, with
        different amounts of look-ahead, agree, keeping 8 tokens of safety margin."""
        context, full, offsets, first = self._encode_held()
        text = context + self._held
        short = self._backend.encode(text[:len(text) - self.max_hold_chars // 2], add_special_tokens=False)
        n = min(len(full.ids), len(short.ids))
        differs = np.flatnonzero(np.asarray(full.ids[:n]) != np.asarray(short.ids[:n]))
        last = (int(differs[0]) if len(differs) else n) - 8
        # the cut must also be a clean boundary: the previous token ends where the next one starts
        while last > first and offsets[last - 1, 1] > offsets[last, 0]:
            last -= 1
        if last <= first:
            return []
        end = int(offsets[last, 0])
        self._context = self._context_for(text[:end])
        self._held = text[end:]
        return full.ids[first:last]


def first_token_at(offsets: np.ndarray, pos: int) -> int | None:
    """Index of the first token starting at or after char `pos`, given token char spans offsets [n, 2];
    None if a token straddles `pos` (no token boundary there)."""
    index = int(np.searchsorted(offsets[:, 0], pos, "left")) if pos > 0 else 0
    return None if index > 0 and offsets[index - 1, 1] > pos else index


class IncrementalDecoder:
    """Turns generated token ids into text deltas that are always whole characters.

    The concatenation of all push() results and flush() equals
    `tokenizer.decode(context_ids + ids)[len(tokenizer.decode(context_ids)):]`, which for no context is
    `tokenizer.decode(ids)` (skip_special_tokens as given). Pass the last few ids of the stream as
    `context_ids` to keep the leading space that SentencePiece decoding strips from a text's first word.

    Rule: decode a short window of ids (the tokens of the last emitted delta plus everything newer) and emit
    the new part, holding it back while (a) it ends in U+FFFD (an incomplete UTF-8 character), (b) the
    last visible id is a byte-fallback token (tokenizers decode a run of byte tokens all-or-nothing, so a
    later byte can still turn the run into U+FFFDs; skipped special tokens do not end a run), or (c) the
    tokenizer cleans up spaces and the text ends in a prefix of a clean-up pattern such as " n't".
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True,
                 context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        backend = backend_of(tokenizer)
        self._byte_ids = byte_fallback_ids(backend)
        # ids that vanish when decoding; they do not end a run of byte tokens
        self._skipped_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items()
                                      if t.special and skip_special_tokens)
        self._byte_run_open = False  # the last visible id is a byte-fallback token
        self._ids: list[int] = list(context_ids)
        self._prefix_start = 0  # first id of the decode window
        self._read = len(self._ids)  # ids before this have had all their text emitted
        self._prefix_len = len(self._decode(self._ids))  # chars of decode(window[: _read])
        self._sent = 0  # chars after _prefix_len already emitted (a partially held delta)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly printable text ("" while held back)."""
        return self.push_many((token_id,))

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Add several ids at once; same guarantee as push."""
        for token_id in token_ids:
            self._ids.append(int(token_id))
            if token_id not in self._skipped_ids:
                self._byte_run_open = token_id in self._byte_ids
        return "" if self._byte_run_open else self._emit(final=False)

    def flush(self) -> str:
        """All text still held back (call when the generation ends)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self._decode(self._ids[self._prefix_start:])
        fresh = text[self._prefix_len:]
        safe = len(fresh) if final else self._safe_length(fresh)
        delta = fresh[self._sent:safe]
        self._sent = max(self._sent, safe)
        # everything emitted: the newest tokens become the window's prefix. A prefix must show text, else
        # decoders that strip a text's leading space would strip the next token's space instead.
        if fresh and self._sent == len(fresh):
            self._prefix_start, self._read = self._read, len(self._ids)
            self._prefix_len = len(self._decode(self._ids[self._prefix_start:self._read]))
            self._sent = 0
        return delta

    def _safe_length(self, fresh: str) -> int:
        safe = len(fresh.rstrip("\ufffd"))
        if self._cleanup:
            space = fresh.rfind(" ", 0, safe)
            while space >= 0 and safe - space < 4:
                tail = fresh[space:safe]
                if any(p.startswith(tail) and p != tail for p in _CLEANUP_PATTERNS):
                    safe = space
                space = fresh.rfind(" ", 0, space)
        return safe


class StopMatcher:
    """Finds stop sequences in streamed text, across delta (and token) boundaries.

    push(delta) -> (text to emit, stopped). Text that could be the start of a stop sequence is held back
    until it is known not to be one. The first stop to complete (earliest end; the longest on a tie) ends
    the stream; its text is emitted when include_stop, else dropped, and nothing after it is emitted.
    """

    def __init__(self, stop_sequences: Sequence[str], include_stop: bool = False) -> None:
        self.stops = tuple(s for s in stop_sequences if s)
        self.include_stop = include_stop
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + delta
        # (end, start) of the stop to complete first: earliest end, then earliest start (= the longest).
        # A stop's first occurrence is also its earliest-ending one.
        best: tuple[int, int] | None = None
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                best = key if best is None or key < best else best
        if best is not None:
            end, start = best
            self.stopped, self._held = True, ""
            return text[:end if self.include_stop else start], True
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """Held-back text when the stream ends without a stop."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop sequence."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
