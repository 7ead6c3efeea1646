"""Choosing the next token from a distribution: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_NEW_TOKENS_LIMIT = 1 << 20
# Bounds within which the sampler's float64 arithmetic stays finite for any finite float32 log-probability
# (|logprob| <= 3.4e38: times the penalty, over the temperature, well inside float64's range).
MIN_TEMPERATURE, MAX_TEMPERATURE = 9.99999997e-7, 1e6  # besides 0 (greedy); the minimum is 1e-6 as float32
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-3, 1e3


class SamplingError(ValueError):
    """An invalid sampling parameter; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. temperature 0 means greedy (argmax); seed None uses the stream's own RNG."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop_sequences: tuple[str, ...] = ()
    include_stop: bool = False
    stop_on_eos: bool = True

    def validate(self) -> None:
        """Raise SamplingError for the first out-of-range field."""
        t = self.temperature
        if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):  # NaN fails every comparison
            raise SamplingError("temperature", f"must be 0 (greedy) or in {MIN_TEMPERATURE:g}.."
                                f"{MAX_TEMPERATURE:g}, got {t}")
        if self.top_k < 0:
            raise SamplingError("top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise SamplingError("repetition_penalty", f"must be in {MIN_REPETITION_PENALTY:g}.."
                                f"{MAX_REPETITION_PENALTY:g} (1 = off), got {self.repetition_penalty}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise SamplingError("max_new_tokens",
                                f"must be in 1..{MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        if any(not s for s in self.stop_sequences):
            raise SamplingError("stop_sequences", "stop sequences must be non-empty strings")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise SamplingError("seed", f"must be in 0..2^63-1, got {self.seed}")


class Sampler:
    """Draws tokens for one generation request; its RNG is the stream's unless params.seed is set."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None = None) -> None:
        params.validate()
        self.params = params
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        self.generator = generator or torch.Generator()

    def sample(self, logprobs: torch.Tensor, context_ids: torch.Tensor | None = None) -> int:
        """Pick a token from log-probabilities [vocab]; context_ids [k] get the repetition penalty.

        Sampling works in float64 log-space relative to the best score, so every valid parameter gives a
        proper distribution (the best token keeps weight 1); ValueError if no log-probability is finite.
        """
        if self.params.temperature == 0.0:  # greedy: float32 as it always was, so ties resolve as before
            scores = logprobs.float().clone()
            self._penalize(scores, context_ids)
            return int(scores.argmax())
        return int(torch.multinomial(self.distribution(logprobs, context_ids), 1, generator=self.generator))

    def distribution(self, logprobs: torch.Tensor, context_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The probabilities [vocab] float64 that `sample` draws from when temperature > 0 (temperature,
        top-k, top-p and the repetition penalty applied); ValueError if no log-probability is finite."""
        p = self.params
        scores = logprobs.double().clone()
        scores = self._penalize(scores, context_ids).nan_to_num(nan=-math.inf)
        best = scores.max()
        if not torch.isfinite(best):
            raise ValueError("the next-token distribution has no finite log-probability")
        scores = (scores - best) / p.temperature  # <= 0, the best token exactly 0
        if p.top_k:
            kth = scores.topk(min(p.top_k, scores.numel())).values[-1]
            scores[scores < kth] = -math.inf
        if p.top_p < 1.0:
            sorted_scores, order = scores.sort(descending=True)
            probs = sorted_scores.softmax(-1)
            # Drop tokens once the mass before them already reaches top_p; the top token always stays.
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[0] = False
            scores[order[drop]] = -math.inf
        return scores.softmax(-1)

    def _penalize(self, scores: torch.Tensor, context_ids: torch.Tensor | None) -> torch.Tensor:
        """Apply the repetition penalty to `scores` [vocab] in place; returns them."""
        if self.params.repetition_penalty != 1.0 and context_ids is not None and context_ids.numel():
            # CTRL-style penalty applied to log-probs (all <= 0): a factor > 1 makes repeats less likely.
            ids = context_ids.unique()
            scores[ids] = scores[ids] * self.params.repetition_penalty
        return scores
