"""Text in pieces: incremental encoding equals whole-text encoding, streamed decoding equals whole decoding,
stop sequences are found across token boundaries. Property tests over real text (sotu.txt) with non-ASCII
characters mixed in, for stories260K (SentencePiece-style BPE with byte fallback) and for a GPT-2-style
byte-level BPE trained here."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from sinkstream.core.config import StreamConfig
from sinkstream.core.generation import Generation, generate
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.streaming import StreamingInference
from sinkstream.core.text import (
    IncrementalDecoder,
    IncrementalEncoder,
    StopMatcher,
    byte_fallback_ids,
    space_cuts_are_hard,
)

EXTRAS = ["é", "ñ", "ü", "Ç", "ø", "日本語", "中文", "한국어", "😀", "👍🏽", "🇫🇷", "e\u0301", "’", "—", "…",
          "  ", "   ", "\n", "\n\n", "\t", " \n ", "\xa0", "\u200a", "<s>", "</s>", "'s", " n't", " .",
          "▁", "Ġ"]
PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sotu(sotu_path) -> str:
    return sotu_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def stories_tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def bpe_tokenizer(sotu):
    """A GPT-2-style byte-level BPE (ByteLevel pre-tokenizer with the GPT-2 regex, no prefix space),
    trained on part of sotu.txt plus non-ASCII text so that some tokens hold partial UTF-8 characters."""
    rng = random.Random(0)
    extra = " ".join(rng.choice(EXTRAS[:14]) for _ in range(3000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([sotu[:150_000], extra], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module", params=["stories260K", "byte-level-bpe"])
def tokenizer(request):
    return request.getfixturevalue("stories_tokenizer" if request.param == "stories260K" else "bpe_tokenizer")


@st.composite
def mixed_text(draw, sotu: str, max_len: int = 400) -> str:
    """A slice of sotu.txt with accents, CJK, emoji, odd whitespace and special-token text mixed in."""
    start = draw(st.integers(0, len(sotu) - 1))
    text = sotu[start:start + draw(st.integers(0, max_len))]
    inserts = draw(st.lists(st.tuples(st.integers(0, len(text)), st.sampled_from(EXTRAS)), max_size=8))
    for pos, extra in sorted(inserts, reverse=True):
        text = text[:pos] + extra + text[pos:]
    return text


def split_at(seq, cuts: list[int]) -> list:
    bounds = [0, *sorted(c % (len(seq) + 1) for c in cuts), len(seq)]
    return [seq[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def encode_in_pieces(encoder: IncrementalEncoder, pieces) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        ids += encoder.push(piece)
    return ids + encoder.flush()


# ------------------------------------------------------------------------------------ encoder
def test_naive_per_piece_tokenization_is_wrong_and_incremental_is_right(stories_tokenizer):
    tok = stories_tokenizer
    whole = tok("Hello world")["input_ids"]
    naive = tok("Hello wor")["input_ids"] + tok("ld", add_special_tokens=False)["input_ids"]
    assert naive != whole  # "▁l", "d" instead of "ld": a word marker in the middle of a word
    assert tok.decode(naive) != tok.decode(whole)
    assert encode_in_pieces(IncrementalEncoder(tok), ["Hello wor", "ld"]) == whole


def test_pieces_equal_whole_text(tokenizer, sotu):
    @PROPERTY
    @given(data=st.data())
    def check(data):
        text = data.draw(mixed_text(sotu))
        pieces = split_at(text, data.draw(st.lists(st.integers(0, 10_000), max_size=12)))
        assert encode_in_pieces(IncrementalEncoder(tokenizer), pieces) == tokenizer(text)["input_ids"]

    check()


def test_byte_pieces_cut_inside_characters_equal_whole_text(tokenizer, sotu):
    @PROPERTY
    @given(data=st.data())
    def check(data):
        text = data.draw(mixed_text(sotu, max_len=200))
        raw = text.encode("utf-8")
        pieces = split_at(raw, data.draw(st.lists(st.integers(0, 10_000), max_size=16)))
        assert encode_in_pieces(IncrementalEncoder(tokenizer), pieces) == tokenizer(text)["input_ids"]

    check()


def test_text_without_spaces_stays_bounded_and_exact(tokenizer, sotu):
    """No whitespace cut for longer than max_hold_chars: the agreement path commits, held text stays
    bounded, the result is still the whole-text tokenization."""
    @settings(max_examples=40, deadline=None)
    @given(data=st.data())
    def check(data):
        text = data.draw(mixed_text(sotu, max_len=600)).replace(" ", data.draw(st.sampled_from(["", "日"])))
        pieces = split_at(text, data.draw(st.lists(st.integers(0, 10_000), max_size=40)))
        encoder = IncrementalEncoder(tokenizer, max_hold_chars=64)
        ids = []
        for piece in pieces:
            ids += encoder.push(piece)
            assert len(encoder.held_text) <= 64 + len(piece)
        assert ids + encoder.flush() == tokenizer(text)["input_ids"]

    check()


def test_state_round_trip_continues_the_stream(stories_tokenizer, sotu):
    tok, text = stories_tokenizer, sotu[:3000] + " café 日本"
    raw = text.encode()
    cut = raw.index("é".encode()) + 1  # the saved state holds half a character
    first = IncrementalEncoder(tok)
    ids = first.push(raw[:cut])
    saved = json.loads(json.dumps(first.state()))
    second = IncrementalEncoder(tok)
    second.load_state(saved)
    assert ids + second.push(raw[cut:]) + second.flush() == tok(text)["input_ids"]


def test_tokenizer_with_merges_across_spaces(sotu):
    """A SentencePiece-style BPE trained without word splitting learns tokens such as "▁of▁the": a space is
    no hard boundary, the encoder sees that in the vocabulary and commits by agreement only."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=800, show_progress=False,
                                  special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(sotu[:100_000].split("\n"), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert not IncrementalEncoder(tokenizer).space_cuts_are_hard

    @settings(max_examples=40, deadline=None)
    @given(data=st.data())
    def check(data):
        text = data.draw(mixed_text(sotu, max_len=600))
        pieces = split_at(text, data.draw(st.lists(st.integers(0, 10_000), max_size=30)))
        encoder = IncrementalEncoder(tokenizer, max_hold_chars=64)
        assert encode_in_pieces(encoder, pieces) == tokenizer(text)["input_ids"]

    check()


def test_flush_then_more_text(stories_tokenizer):
    tok = stories_tokenizer
    encoder = IncrementalEncoder(tok)
    first = encoder.push("Once upon a ti") + encoder.flush()
    assert first == tok("Once upon a ti")["input_ids"]
    # the flush point is a token boundary of the whole text when the next piece starts with a space
    rest = encoder.push(" there was") + encoder.flush()
    whole = tok("Once upon a ti there was")["input_ids"]
    assert first + rest == whole
    # otherwise it acts as a forced boundary: the text is kept exactly, no word marker is invented
    encoder = IncrementalEncoder(tok)
    head = encoder.push("Hello wo") + encoder.flush()
    assert head == tok("Hello wo")["input_ids"]
    tail = encoder.push("rld") + encoder.flush()
    assert tok.decode(head + tail, skip_special_tokens=True) == "Hello world"
    assert not tok.convert_ids_to_tokens(tail)[0].startswith("▁")
    assert head + tail != tok("Hello world")["input_ids"]  # "or" was cut by the flush
    assert encoder.flush() == []


def test_bos_once_and_raw_ids(stories_tokenizer):
    tok = stories_tokenizer
    assert IncrementalEncoder(tok).flush() == tok("")["input_ids"]
    encoder = IncrementalEncoder(tok)
    assert encoder.push_ids([5, 6]) == [5, 6]  # raw ids: no BOS in front
    assert encoder.push(" a cat") + encoder.flush() == tok(" a cat", add_special_tokens=False)["input_ids"]
    encoder = IncrementalEncoder(tok)
    assert encoder.push("The dog") == tok("The")["input_ids"]
    assert encoder.push_ids([7]) == tok(" dog", add_special_tokens=False)["input_ids"] + [7]
    assert encoder.flush() == []
    # text right after raw ids continues the stream: no word marker unless it starts with a space
    tail = encoder.push("ld") + encoder.flush()
    assert tok.convert_ids_to_tokens(tail) == ["ld"]
    # after an end of document the next text is tokenized like a document start, without a second BOS
    encoder.flush(end_of_document=True)
    document = encoder.push("Once upon") + encoder.flush()
    assert document == tok("Once upon", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------ decoder
def decode_in_deltas(tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def byte_token_ids(tokenizer, text: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[f"<0x{b:02X}>"] for b in text.encode("utf-8")]


@st.composite
def generated_ids(draw, tokenizer) -> list[int]:
    """Ids a model could generate: ordinary tokens, specials, characters spelled as byte-fallback tokens,
    and (sometimes) raw bytes that do not form valid UTF-8."""
    vocab_size = len(tokenizer.get_vocab())
    parts = draw(st.lists(st.one_of(
        st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=4),
        st.text(st.characters(min_codepoint=0x80, max_codepoint=0x1FAFF, blacklist_categories=("Cs",)),
                min_size=1, max_size=3).map(lambda s: byte_token_ids(tokenizer, s)),
        st.lists(st.integers(3, 258), min_size=1, max_size=3),
    ), max_size=12))
    return [i for part in parts for i in part]


def test_deltas_are_whole_characters_and_concatenate_to_decode(stories_tokenizer):
    tok = stories_tokenizer

    @PROPERTY
    @given(ids=generated_ids(tok), skip=st.booleans())
    def check(ids, skip):
        deltas = decode_in_deltas(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        for delta in deltas:
            delta.encode("utf-8")  # no lone surrogates
        if "\ufffd" not in tok.decode(ids):
            assert not any("\ufffd" in d for d in deltas)  # never half a character on the wire

    check()


def test_byte_fallback_characters_are_never_split(stories_tokenizer):
    tok = stories_tokenizer
    ids = (tok("The cat")["input_ids"] + byte_token_ids(tok, "日本😀")
           + tok(" sat", add_special_tokens=False)["input_ids"])
    deltas = decode_in_deltas(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert any("日本😀" in d for d in deltas)
    assert all("\ufffd" not in d for d in deltas)


def test_byte_level_bpe_deltas(bpe_tokenizer):
    tok = bpe_tokenizer
    vocab_size = len(tok.get_vocab())

    @PROPERTY
    @given(ids=st.lists(st.integers(0, vocab_size - 1), max_size=40))
    def check(ids):
        deltas = decode_in_deltas(tok, ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
        if "\ufffd" not in tok.decode(ids):
            assert not any("\ufffd" in d for d in deltas)

    check()


def test_context_ids_keep_the_leading_space(stories_tokenizer):
    tok = stories_tokenizer
    prompt = tok("Once upon a time")["input_ids"]
    generated = tok(" there was a dog", add_special_tokens=False)["input_ids"]
    assert "".join(decode_in_deltas(tok, generated)) == "there was a dog"
    assert "".join(decode_in_deltas(tok, generated, context_ids=prompt[-3:])) == " there was a dog"


def test_space_cleanup_rules_hold_back(model_dir):
    # transformers skips the clean-up for BPE models unless forced; force it so the rule is exercised
    tok = AutoTokenizer.from_pretrained(
        model_dir, clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    pieces = ["▁", ".", ",", "'", "t", "▁n", "n", "s", "m", "?", "!", "▁a", "re", "ve"]
    ids = tok.convert_tokens_to_ids(pieces)
    assert tok.decode(tok.convert_tokens_to_ids(["▁a", "▁n", "'", "t"])) == "an't"  # clean-up is active

    # derandomized: the known counter-example below must not make CI flaky; this checks the rest
    @settings(max_examples=120, deadline=None, derandomize=True)
    @given(seq=st.lists(st.sampled_from(ids), max_size=30))
    def check(seq):
        assume(not _undoes_a_cleanup(tok, seq))
        assert "".join(decode_in_deltas(tok, seq)) == tok.decode(seq, skip_special_tokens=True)

    check()


def _undoes_a_cleanup(tok, seq: list[int]) -> bool:
    """Whether a later token undoes a clean-up an earlier prefix already applied (decode of a prefix is not
    a prefix of the decode of the whole): the known limit of the clean-up rule, see the xfail below."""
    whole = tok.decode(seq, skip_special_tokens=True)
    return any(not whole.startswith(tok.decode(seq[:i], skip_special_tokens=True).rstrip())
               for i in range(1, len(seq)))


@pytest.mark.xfail(strict=True, reason="known limit: with the forced BPE clean-up, ' . ' after ' ' ' undoes "
                   "the ' ' ' -> \"'\" replacement already emitted (decode is not prefix-monotonic)")
def test_a_later_token_undoing_an_emitted_cleanup(model_dir):
    tok = AutoTokenizer.from_pretrained(
        model_dir, clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    seq = tok.convert_tokens_to_ids(["▁", "▁", "'", "▁", "."])
    assert "".join(decode_in_deltas(tok, seq)) == tok.decode(seq, skip_special_tokens=True)


# ------------------------------------------------------------------------------------ stop sequences
def first_stop(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """Brute-force reference on the whole text: walk the end positions in order; at the first one where
    some stop ends, the longest stop ending there wins."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if s and text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[:end if include else end - len(stop)], True
    return text, False


def test_stop_tie_goes_to_the_longest_stop():
    assert StopMatcher(["b", "ab"]).push("xab") == ("x", True)
    assert StopMatcher(["ab", "b"], include_stop=True).push("xab") == ("xab", True)
    # across deltas: the held "a" is part of the longer stop, so it is dropped too
    matcher = StopMatcher(["b", "ab"])
    assert matcher.push("xa") == ("x", False)
    assert matcher.push("b") == ("", True)


def test_stop_sequences_across_deltas():
    @PROPERTY
    @given(text=st.text("ab c", max_size=40), stops=st.lists(st.text("ab c", min_size=1, max_size=4),
                                                               min_size=1, max_size=3),
           cuts=st.lists(st.integers(0, 100), max_size=10), include=st.booleans(), tie=st.booleans())
    def check(text, stops, cuts, include, tie):
        if tie:  # a stop that is a suffix of another: both end at the same place wherever the longer does
            stops = [*stops, stops[0][len(stops[0]) // 2:]]
        matcher = StopMatcher(stops, include)
        out, stopped = "", False
        for delta in split_at(text, cuts):
            emitted, stopped = matcher.push(delta)
            out += emitted
            if stopped:
                break
        if not stopped:
            out += matcher.flush()
        assert (out, stopped) == first_stop(text, stops, include)

    check()


def test_stop_sequence_split_across_tokens(stories_tokenizer):
    tok = stories_tokenizer
    ids = tok("The end. Once upon a time")["input_ids"]
    assert "d." in "".join(tok.convert_ids_to_tokens(ids))  # "end." spans the tokens "▁e", "nd", "."
    for include, expected in ((False, "The "), (True, "The end.")):
        decoder, matcher, out = IncrementalDecoder(tok), StopMatcher(["end."], include), ""
        for i in ids:
            emitted, stopped = matcher.push(decoder.push(i))
            out += emitted
            if stopped:
                break
        assert stopped and out == expected


# ------------------------------------------------------------------------------------ through the engine
@pytest.fixture(scope="module")
def stories_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_engine_logprobs_same_for_text_in_pieces(stories_model, stories_tokenizer, sotu):
    """The service path without the wire: ids appended to the engine as the encoder commits them give the
    same per-token log-probabilities as the whole text appended at once (no eviction, so the different
    chunking must not matter)."""
    tok, rng = stories_tokenizer, random.Random(7)
    engine = StreamingInference(stories_model, StreamConfig(sink_tokens=4, window=440, chunk=64), max_rows=2)
    for _ in range(3):
        start = rng.randrange(len(sotu) - 600)
        text = sotu[start:start + 450]
        for _ in range(6):
            pos = rng.randrange(len(text))
            text = text[:pos] + rng.choice(EXTRAS) + text[pos:]
        whole = tok(text)["input_ids"]
        assert len(whole) <= 440
        one, pieces = engine.open_row(), engine.open_row()
        want = torch.cat([r.logprobs for r in engine.append(one, whole)])
        encoder, ids, got = IncrementalEncoder(tok), [], []
        cuts = [rng.randrange(len(text.encode())) for _ in range(25)]
        for piece in [*split_at(text.encode(), cuts), None]:
            new = encoder.push(piece) if piece is not None else encoder.flush()
            ids += new
            got += [r.logprobs for r in engine.append(pieces, new)] if new else []
        got = torch.cat(got)
        assert ids == whole
        assert torch.isnan(got[0]) and torch.isnan(want[0])
        # equal ids; only the chunk boundaries differ, which changes fp32 summation order (~1e-5)
        assert (got[1:] - want[1:]).abs().max() <= 1e-4
        engine.close_row(one)
        engine.close_row(pieces)


@pytest.mark.parametrize("include", [False, True])
def test_stop_completed_by_the_text_flushed_at_the_end(stories_model, stories_tokenizer, include):
    """A character spelled in byte tokens is held back until the run ends; when the generation ends (max
    tokens, or EOS) inside the run, the flushed text can complete a stop sequence: that is the reason."""
    tok = stories_tokenizer
    engine = StreamingInference(stories_model, StreamConfig(sink_tokens=4, window=60, chunk=16))
    for tail in ([], [tok.eos_token_id]):
        row = engine.open_row()
        list(engine.append(row, tok("The cat said")["input_ids"]))
        ids = byte_token_ids(tok, " é") + tail
        gen = Generation(engine, row, SamplingParams(max_new_tokens=len(ids), stop_sequences=("é",),
                                                     include_stop=include), tok)
        out = []
        for token in ids:  # the tokens a model could have chosen, fed as generate() feeds them
            engine.step({row: [token]})
            out.append(gen.accept(token, 0.0))
        assert gen.finished and out[-1].stop_reason == "STOP_SEQUENCE"
        assert "".join(t.text for t in out) == (" é" if include else " ")
        engine.close_row(row)


@pytest.mark.parametrize("window", [252, 20])  # 20: the prompt has wrapped the window's ring buffer
def test_generated_text_keeps_the_first_words_space(stories_model, stories_tokenizer, window):
    """Decoding generated ids alone strips the first word's leading space; in the stream's context it
    must not: the deltas are exactly what the generated ids add to the decoded prompt."""
    tok = stories_tokenizer
    engine = StreamingInference(stories_model, StreamConfig(sink_tokens=4, window=window, chunk=16))
    row = engine.open_row()
    prompt = tok("The dog ran to the park. " * 6 + "Once upon a time, there")["input_ids"]
    assert (len(prompt) > window + 16) == (window == 20)
    list(engine.append(row, prompt))
    out = list(generate(engine, row, SamplingParams(max_new_tokens=20), tok))
    text = "".join(t.text for t in out)
    assert text.startswith(" ") and not text.startswith("  ")
    whole = tok.decode(prompt + [t.token_id for t in out], skip_special_tokens=True)
    assert text == whole[len(tok.decode(prompt, skip_special_tokens=True)):]


def test_generation_text_and_stop_sequence_across_tokens(stories_model, stories_tokenizer):
    tok = stories_tokenizer
    engine = StreamingInference(stories_model, StreamConfig(sink_tokens=4, window=252, chunk=64))

    def run(params: SamplingParams) -> tuple[list[int], str, str | None]:
        row = engine.open_row(seed=3)
        list(engine.append(row, tok("Once upon a time")["input_ids"]))
        out = list(generate(engine, row, params, tok))
        engine.close_row(row)
        return [t.token_id for t in out], "".join(t.text for t in out), out[-1].stop_reason

    ids, text, _ = run(SamplingParams(temperature=1.0, seed=3, max_new_tokens=40))
    assert text == tok.decode(ids, skip_special_tokens=True)
    # a stop sequence made of the end of one token and the start of the next
    boundary = len(tok.decode(ids[:len(ids) // 2], skip_special_tokens=True))
    stop = text[boundary - 2:boundary + 2]
    for include in (False, True):
        _, stopped_text, reason = run(SamplingParams(temperature=1.0, seed=3, max_new_tokens=40,
                                                     stop_sequences=(stop,), include_stop=include))
        end = text.find(stop) + (len(stop) if include else 0)
        assert (stopped_text, reason) == (text[:end], "STOP_SEQUENCE")


def test_vocabulary_is_scanned_once_per_tokenizer(tokenizer):
    """Each session and each generation builds an encoder or decoder; the vocabulary scan is shared."""
    space_cuts_are_hard.cache_clear()
    byte_fallback_ids.cache_clear()
    for _ in range(3):
        IncrementalEncoder(tokenizer)
        IncrementalDecoder(tokenizer)
    assert space_cuts_are_hard.cache_info().misses == 1
    assert byte_fallback_ids.cache_info().misses == 1
