"""Token sampling as Kyutai's Moshi samples, with `mlx_lm`'s filters."""

import math
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, categorical_sampling


@dataclass(frozen=True)
class Sampler:
    """Samples a token from logits at temperature `temp` (0: greedy, the argmax).

    As in Kyutai's `moshi_mlx`, one filter is applied to the tempered distribution: top-k when
    `top_k` is set (above 0), else top-p when `0 < top_p < 1`, else min-p when `min_p > 0`.
    `top_k` equal to the vocabulary size keeps every token. The filters are `mlx_lm`'s.
    """

    temp: float = 0.8
    top_p: float = 0.95
    top_k: int | None = 0
    min_p: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.temp) and self.temp >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temp}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    def _filter(self, logits: mx.array) -> mx.array:
        """Tempered logits [..., vocab] with the tokens filtered out set to -inf."""
        if self.top_k:
            return apply_top_k(logits, self.top_k) if self.top_k < logits.shape[-1] else logits
        if 0 < self.top_p < 1:
            return apply_top_p(logits, self.top_p)
        if self.min_p > 0:
            return apply_min_p(logits, self.min_p)
        return logits

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """logits: [..., vocab] -> (tokens [...] int32, log-probabilities [..., vocab] at
        temperature 1)."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1).astype(mx.int32), logprobs
        tokens = categorical_sampling(self._filter(logprobs * (1 / self.temp)), 1.0)
        return tokens.astype(mx.int32), logprobs
