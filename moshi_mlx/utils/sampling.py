"""Token sampling on top of `mlx_lm`'s samplers."""

from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler


@dataclass(frozen=True)
class Sampler:
    """Samples a token from logits with temperature, top-k, top-p and min-p filtering.

    `temp=0` is greedy (argmax). Filters come from `mlx_lm.sample_utils.make_sampler`; top-k and
    top-p are applied one after the other when both are set (0 or None disables top-k, 0 or 1
    disables top-p).
    """

    temp: float = 0.8
    top_p: float = 0.95
    top_k: int | None = 0
    min_p: float = 0.0

    def __post_init__(self):
        if self.temp < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temp}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @cached_property
    def _sample(self):
        return make_sampler(temp=self.temp, top_p=self.top_p, top_k=self.top_k or 0,
                            min_p=self.min_p)

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """logits: [..., vocab] -> (tokens [...] int32, log-probabilities [..., vocab])."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self._sample(logprobs).astype(mx.int32), logprobs
