"""What the scheduler and sessions answer on a stream, as plain values (convert.py makes them messages)."""

from __future__ import annotations

from dataclasses import dataclass

from sinkstream.core.streaming import ChunkResult, RowStats
from sinkstream.service.errors import RequestError
from sinkstream.service.options import AnalysisOptions


@dataclass(frozen=True)
class ChunkReply:
    """One processed chunk of input, with the analysis the session asked for (None / empty: not asked)."""

    request_id: str
    num_tokens: int
    tokens_seen: int
    mean_nll: float
    perplexity: float
    scored_tokens: int
    cache: RowStats
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    top_k: int = 0
    top_k_ids: list[int] | None = None  # [num_tokens * top_k], row-major
    top_k_logprobs: list[float] | None = None
    embedding: list[float] | None = None

    @classmethod
    def of(cls, request_id: str, num_tokens: int, result: ChunkResult, analysis: AnalysisOptions,
           stats: RowStats) -> ChunkReply:
        """The reply for `result`, its tensors copied out now (they need not outlive the pass)."""
        k = analysis.top_k
        return cls(
            request_id=request_id, num_tokens=num_tokens, tokens_seen=result.tokens_seen,
            mean_nll=result.mean_nll, perplexity=result.perplexity, scored_tokens=stats.scored_tokens,
            cache=stats, token_ids=list(result.token_ids) if analysis.token_ids else None,
            logprobs=result.logprobs.tolist() if analysis.logprobs else None, top_k=k,
            top_k_ids=result.topk_ids[:, :k].reshape(-1).tolist() if k else None,
            top_k_logprobs=result.topk_logprobs[:, :k].reshape(-1).tolist() if k else None,
            embedding=result.embedding.tolist() if analysis.embeddings else None)


@dataclass(frozen=True)
class FlushedReply:
    request_id: str
    tokens_seen: int
    mean_nll: float
    perplexity: float


@dataclass(frozen=True)
class TokenReply:
    """One generated token; `index` counts the generation's tokens from 0."""

    request_id: str
    token_id: int
    text: str
    logprob: float
    index: int


@dataclass(frozen=True)
class GenerationReply:
    """The end of a generation; `stop_reason` names a StopReason without its prefix (e.g. "MAX_TOKENS")."""

    request_id: str
    stop_reason: str
    generated_tokens: int
    input_tokens: int
    tokens_seen: int
    text: str
    time_to_first_token_s: float
    total_time_s: float
    error_message: str = ""


@dataclass(frozen=True)
class CheckpointedReply:
    request_id: str
    session_id: str
    tokens_seen: int
    bytes: int


@dataclass(frozen=True)
class ClosedReply:
    request_id: str
    session_id: str
    tokens_seen: int


@dataclass(frozen=True)
class AckReply:
    """A numbered request is durable (or, without a write-ahead log, applied)."""

    request_id: str
    seq: int


@dataclass(frozen=True)
class ErrorReply:
    """A refused request, answered in order; the stream goes on. `unprocessed_tokens`: input tokens of the
    request (an append) not processed when the server had to stop (kept with the session for a resume)."""

    request_id: str
    error: RequestError
    unprocessed_tokens: int = 0


@dataclass
class StreamEnd:
    """Outbox marker: end the call (OK), or abort it with `error`."""

    error: RequestError | None = None


Reply = (ChunkReply | FlushedReply | TokenReply | GenerationReply | CheckpointedReply | ClosedReply
         | ErrorReply | AckReply)
