"""Generation from a stream's current state, one token per forward pass, tokens fed back into the stream.

`Generation` is the per-request state machine (sample -> caller runs the forward pass -> accept), so a
server can batch the decode steps of many streams into one `StreamingInference.step`; `generate` is the
single-stream loop built from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sinkstream.core.sampling import Sampler, SamplingParams
from sinkstream.core.streaming import StreamingInference
from sinkstream.core.text import IncrementalDecoder, StopMatcher

# Stream ids the decoder sees before the first generated token: enough text for decoders that strip a
# text's leading space (SentencePiece) to strip it from the context, not from the first generated word.
DECODER_CONTEXT_IDS = 8


@dataclass
class GeneratedToken:
    """One generated token; `text` is the newly printable text (may be empty while held back)."""

    token_id: int
    text: str
    logprob: float
    stop_reason: str | None = None  # set on the last token: MAX_TOKENS | EOS_TOKEN | STOP_SEQUENCE


def eos_token_ids(model_config, tokenizer=None, generation_config=None) -> set[int]:
    """All ids that end a generation, from the model config, the tokenizer and the generation config
    (each may give an int, a list of ints or None)."""
    ids: set[int] = set()
    for source in (getattr(model_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                   getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


class Generation:
    """State of one generation request on one stream row."""

    def __init__(self, engine: StreamingInference, row: int, params: SamplingParams, tokenizer=None,
                 stop_ids: Iterable[int] = ()) -> None:
        """`stop_ids`: more ids that end the generation like EOS (e.g. a chat template's end of turn)."""
        params.validate()
        self.engine, self.row, self.params = engine, row, params
        self.sampler = Sampler(params, engine.generators[row])
        # Decoded after the stream's last ids, so the deltas are what the generation adds to the text so far
        self.decoder = (IncrementalDecoder(tokenizer, context_ids=engine.cache.recent_token_ids(
            row, DECODER_CONTEXT_IDS)) if tokenizer is not None else None)
        self.stops = (StopMatcher(params.stop_sequences, params.include_stop)
                      if params.stop_sequences else None)
        self.eos: set[int] = set()
        if params.stop_on_eos:
            generation_config = getattr(engine.model, "generation_config", None)
            self.eos = eos_token_ids(engine.model.config, tokenizer, generation_config) | set(stop_ids)
        self.generated: list[int] = []
        self.finished = False

    def choose(self) -> tuple[int, float]:
        """Sample the next token and its log-probability from the stream's next-token distribution."""
        logprobs = self.engine.next_logprobs(self.row)
        if logprobs is None:
            raise ValueError("the stream is empty: append a prompt before generating")
        context = self.engine.cache.context_token_ids(self.row)
        token = self.sampler.sample(logprobs, context)
        return token, float(logprobs[token])

    def accept(self, token: int, logprob: float) -> GeneratedToken:
        """Record a token the caller has fed into the stream; decide whether generation stops."""
        self.generated.append(token)
        text = self.decoder.push(token) if self.decoder is not None else ""
        reason = None
        if token in self.eos:
            reason = "EOS_TOKEN"
        elif len(self.generated) >= self.params.max_new_tokens:
            reason = "MAX_TOKENS"
        if self.stops is not None:
            text, stopped = self.stops.push(text)
            if stopped:
                reason = "STOP_SEQUENCE"
        if reason is not None:
            self.finished = True
            if reason != "STOP_SEQUENCE":
                tail = self.decoder.flush() if self.decoder is not None else ""
                if self.stops is not None:
                    tail, stopped = self.stops.push(tail)
                    if stopped:  # held-back text (a byte run) completed a stop sequence
                        reason = "STOP_SEQUENCE"
                    tail += self.stops.flush()
                text += tail
        return GeneratedToken(token, text, logprob, reason)


def generate(engine: StreamingInference, row: int, params: SamplingParams,
             tokenizer=None) -> Iterator[GeneratedToken]:
    """Generate on one stream until EOS, a stop sequence or max_new_tokens; yields tokens as produced."""
    gen = Generation(engine, row, params, tokenizer)
    while not gen.finished:
        token, logprob = gen.choose()
        engine.step({row: [token]})
        yield gen.accept(token, logprob)

