"""Per-session analysis options and the server's limits, as plain values."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnalysisOptions:
    """What each processed chunk reports (see AnalysisOptions in the .proto)."""

    logprobs: bool = False
    top_k: int = 0
    embeddings: bool = False
    token_ids: bool = False


@dataclass(frozen=True)
class Limits:
    """What the server accepts; reported by ModelInfo."""

    max_sessions: int
    max_positions: int
    max_top_k: int
    max_new_tokens: int
    max_stop_sequences: int
    max_message_bytes: int
    max_cache_shapes: int
    session_ttl_s: float
    default_max_new_tokens: int = 64
