"""Speculative decoding: a cheap draft proposes tokens, one forward pass over the bounded cache verifies
them, and only what the target distribution accepts is committed.

Each round feeds [t, d1..dk] in one chunk, where t is the token already chosen (sampled from the stream's
next-token distribution, or carried over from the previous round's rejection) and d1..dk a draft
(`ngram_draft`: prompt lookup over the stream's recent tokens). The pass gives the distribution after every
chunk token; d_i is judged against the distribution after t, d1..d_{i-1}:

- greedy: d_i is accepted when it is the sampler's argmax, so the output is plain greedy's;
- sampling: the draft is deterministic (q = onehot(d_i)), so d_i is accepted with probability P(d_i) and,
  on rejection, the next token is drawn from the residual (P - onehot(d_i))+ normalised, i.e. P with d_i
  removed; each emitted token is then distributed exactly as P (Leviathan et al. / Chen et al. 2023 with a
  point-mass draft).

The cache keeps t and the accepted prefix only (`StreamingInference.step_prefix`): it is as if those tokens
had been decoded one by one, also once the window is full. The verification pass is decode-equivalent
(SinkCache.begin_step): chunk token i does not see the window tokens one-by-one decoding would already have
dropped, and sees the sinks as far away as it would then (shifted copies in free ring slots). A round feeds
at most `StreamingInference.decode_equivalent_room` tokens: with tiers, none may evict past tier 1's
pending area before its last token (a block merge is not reproducible inside one pass); without, the free
ring slots must hold one copy of the sinks per token dropped before the last one. A token that ends the
generation (EOS, stop sequence, max_new_tokens) ends the kept prefix, as plain decoding would stop feeding
there.

Not used (plain decoding instead) with a repetition penalty, whose context would change inside a round,
or with an attention merge policy, whose record would hear rejected queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from sinkstream.core.generation import GeneratedToken, Generation
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.streaming import StreamingInference

Draft = Callable[[Sequence[int], int], list[int]]  # (history, k) -> up to k proposed next tokens
LOOKUP_TOKENS = 512  # recent stream tokens the n-gram draft searches
MAX_NGRAM, MIN_NGRAM = 3, 1


def ngram_draft(history: Sequence[int], k: int, max_ngram: int = MAX_NGRAM,
                min_ngram: int = MIN_NGRAM) -> list[int]:
    """Prompt lookup: the up to k tokens that followed the latest earlier occurrence of the history's last
    n tokens (longest n first, max_ngram down to min_ngram); [] when no suffix recurs."""
    h = list(history)
    for n in range(min(max_ngram, len(h) - 1), min_ngram - 1, -1):
        suffix = h[-n:]
        for start in range(len(h) - n - 1, -1, -1):  # latest occurrence first, not the suffix itself
            if h[start : start + n] == suffix:
                return h[start + n : start + n + k]
    return []


def speculation_applies(engine: StreamingInference, params: SamplingParams) -> bool:
    """Whether speculative rounds can reproduce plain decoding for these settings (module docstring)."""
    observes = engine.tier_memory is not None and engine.tier_memory.observes
    return params.repetition_penalty == 1.0 and not observes and engine.config.chunk > 1


class SpeculativeRound:
    """Decides, from one verification pass, how many of [t, d1..dk] to keep and what comes next."""

    def __init__(self, gen: Generation, first: tuple[int, float], drafts: list[int]) -> None:
        self.gen, self.first, self.drafts = gen, first, drafts
        self.emitted: list[GeneratedToken] = []
        self.carry: tuple[int, float] | None = None  # the next round's t, when a draft was rejected

    def keep(self, logprobs: torch.Tensor) -> int:
        """logprobs [1 + k, vocab]: row i is the distribution after chunk token i. Emits the kept tokens
        through the generation (in order) and returns how many chunk tokens to commit."""
        gen = self.gen
        self.emitted.append(gen.accept(*self.first))
        kept = 1
        for i, draft in enumerate(self.drafts):
            if gen.finished:
                break
            lp = logprobs[i]
            nxt = self._judge(lp, draft)
            if nxt != draft:
                self.carry = (nxt, float(lp[nxt]))
                break
            self.emitted.append(gen.accept(draft, float(lp[draft])))
            kept += 1
        return kept

    def _judge(self, logprobs: torch.Tensor, draft: int) -> int:
        """`draft` if the target accepts it, else the token the target picks instead."""
        sampler = self.gen.sampler
        if sampler.params.temperature == 0.0:
            return sampler.sample(logprobs)
        probs = sampler.distribution(logprobs)
        u = torch.rand((), dtype=torch.float64, generator=sampler.generator)
        if u < probs[draft]:
            return draft
        residual = probs.clone()
        residual[draft] = 0.0
        return int(torch.multinomial(residual, 1, generator=sampler.generator))


def round_room(engine: StreamingInference, gen: Generation, k: int) -> int:
    """How many draft tokens the next round of `gen` may verify (<= 0: none): within k, the tokens
    max_new_tokens still allows after the round's first token, and what one decode-equivalent pass can
    take with it (StreamingInference.decode_equivalent_room; module docstring)."""
    return min(k, gen.params.max_new_tokens - len(gen.generated) - 1,
               engine.decode_equivalent_room(gen.row) - 1)


class SpeculativeDecoder:
    """One generation decoded in rounds: `round()` runs one forward pass and returns the tokens it emitted.

    Stepwise, so a caller can run a round's parts itself (a server batches plain steps of many streams):
    `first()` gives the round's first token (carried over from the previous round's rejection, else sampled),
    `propose(first)` its draft, then either the caller feeds `first` in a plain step and calls
    `gen.accept(*first)`, or `verify(first, drafts)` runs the verification pass. k = 0, or settings that
    `speculation_applies` refuses: no drafts, one token per pass (plain decoding)."""

    def __init__(self, gen: Generation, k: int, draft: Draft = ngram_draft) -> None:
        self.gen, self.draft = gen, draft
        self.k = k if k > 0 and speculation_applies(gen.engine, gen.params) else 0
        self.carry: tuple[int, float] | None = None  # the next round's first token, when a draft was rejected

    def first(self) -> tuple[int, float]:
        """The next round's first token (id, log-probability): the carried one, else sampled now."""
        first, self.carry = self.carry, None
        return first if first is not None else self.gen.choose()

    def propose(self, first: tuple[int, float]) -> list[int]:
        """The draft to verify after `first` ([] when this round cannot or need not speculate)."""
        gen = self.gen
        room = round_room(gen.engine, gen, self.k)
        if self.k == 0 or room <= 0 or first[0] in gen.eos:
            return []
        history = gen.engine.cache.recent_token_ids(gen.row, LOOKUP_TOKENS) + [first[0]]
        return self.draft(history, room)[:room]

    def verify(self, first: tuple[int, float], drafts: list[int]) -> list[GeneratedToken]:
        """One pass over [first, *drafts] (drafts non-empty) that commits the accepted prefix; returns the
        emitted tokens in order (the generation has accepted them) and keeps a rejection's replacement as
        the next round's first token."""
        spec = SpeculativeRound(self.gen, first, drafts)
        self.gen.engine.step_prefix(self.gen.row, [first[0], *drafts], spec.keep)
        self.carry = spec.carry
        return spec.emitted

    def round(self) -> list[GeneratedToken]:
        """One forward pass: a verified draft, or one plain decode step when there is no draft."""
        first = self.first()
        drafts = self.propose(first)
        if drafts:
            return self.verify(first, drafts)
        self.gen.engine.step({self.gen.row: [first[0]]})
        return [self.gen.accept(*first)]


def generate_speculative(engine: StreamingInference, row: int, params: SamplingParams, tokenizer=None,
                         k: int = 4, draft: Draft = ngram_draft,
                         stop_ids: Sequence[int] = ()) -> Iterator[GeneratedToken]:
    """`generate` with up to k drafted tokens verified per forward pass (k = 0 or settings that
    `speculation_applies` refuses: one token per pass). Yields tokens as they are accepted."""
    decoder = SpeculativeDecoder(Generation(engine, row, params, tokenizer, stop_ids), k, draft)
    while not decoder.gen.finished:
        yield from decoder.round()
