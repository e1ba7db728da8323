"""Token sampling as Kyutai's Moshi samples, with `mlx_lm`'s filters."""

import math
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, categorical_sampling


class SamplingError(ValueError):
    """A sampling value out of its range; the message names the value and the range."""


@dataclass(frozen=True)
class Sampler:
    """Samples a token from logits at temperature `temp` (0: greedy, the argmax).

    As in Kyutai's `moshi_mlx`, one filter is applied to the tempered distribution: top-k when
    `top_k` is set (above 0), else top-p when `0 < top_p < 1`, else min-p when `min_p > 0`.
    `top_k` equal to the vocabulary size keeps every token; above it, a call raises
    `SamplingError` (before any compiled code runs). The filters are `mlx_lm`'s.
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
        vocab = logits.shape[-1]
        if self.top_k and self.top_k > vocab:
            raise SamplingError(f"top_k must be at most the vocabulary size {vocab}, "
                                f"got {self.top_k}")
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1).astype(mx.int32), logprobs
        tokens = categorical_sampling(self._filter(logprobs * (1 / self.temp)), 1.0)
        return tokens.astype(mx.int32), logprobs


def check_temperature(value: float, name: str = "temperature") -> float:
    """`value` when it is 0 (greedy) or a finite positive number; else SamplingError naming
    `name` (nan and inf included)."""
    if not (math.isfinite(value) and value >= 0):
        raise SamplingError(f"{name} must be 0 (greedy) or a finite number above 0, got {value}")
    return value


def check_top_k(value: int, vocab: int | None, name: str = "top_k") -> int:
    """`value` when it is from 0 to `vocab` (both keep every token; None: no upper bound yet);
    else SamplingError naming `name` and the range."""
    if vocab is None and value < 0:
        raise SamplingError(f"{name} must be an integer >= 0 (0 keeps every token), got {value}")
    if vocab is not None and not 0 <= value <= vocab:
        raise SamplingError(f"{name} must be an integer from 0 to {vocab} (0 or {vocab} keeps "
                            f"every token), got {value}")
    return value


def stream_sampler(temp: float, top_k: int, vocab: int,
                   names: tuple[str, str] = ("temperature", "top_k")) -> Sampler:
    """The sampler of one of Moshi's streams, whose logits have `vocab` entries (text:
    `text_card`, audio: `card`), sampling as Kyutai's Moshi does: top-k, no top-p. The values
    are checked first: SamplingError names the value (`names`: the temperature's, the top-k's
    name where the user gave them) and its valid range."""
    return Sampler(temp=check_temperature(temp, names[0]),
                   top_k=check_top_k(top_k, vocab, names[1]), top_p=1.0)
