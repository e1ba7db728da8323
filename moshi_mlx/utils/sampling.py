"""Token sampling as Kyutai's Moshi samples, with `mlx_lm`'s filters."""

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

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

    Args:
        temp: temperature, >= 0 (0: greedy).
        top_p: keep the most likely tokens up to this probability mass, in [0, 1].
        top_k: keep this many most likely tokens, >= 0 (0 or None: no top-k).
        min_p: keep tokens at least this fraction of the most likely one's probability.

    Raises:
        ValueError: a value out of its range.
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

    def __call__(self, logits: mx.array, keys: mx.array | None = None
                 ) -> tuple[mx.array, mx.array]:
        """Samples one token per row.

        Args:
            logits: [..., vocab].
            keys: None: draw from MLX's global random state. Else one random key per row of
                `logits` [rows, vocab]: uint32 [rows, 2] (`mx.random.key`); a row's draw
                depends on its key and its logits alone, not on the other rows.

        Returns:
            (tokens int32 [...], log-probabilities [..., vocab] at temperature 1).

        Raises:
            SamplingError: `top_k` is above the vocabulary size.
        """
        vocab = logits.shape[-1]
        if self.top_k and self.top_k > vocab:
            raise SamplingError(f"top_k must be at most the vocabulary size {vocab}, "
                                f"got {self.top_k}")
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1).astype(mx.int32), logprobs
        tempered = self._filter(logprobs * (1 / self.temp))
        if keys is None:
            tokens = categorical_sampling(tempered, 1.0)
        else:  # mlx_lm's sampling takes no key; each row draws with its own
            tokens = mx.concatenate([mx.random.categorical(tempered[r:r + 1], key=keys[r])
                                     for r in range(tempered.shape[0])])
        return tokens.astype(mx.int32), logprobs


TEMPERATURE_RANGE = "0 (greedy) or a finite number above 0"


def top_k_range(vocab: int | None) -> str:
    """The valid top-k values for a vocabulary of `vocab` tokens (None: not known yet)."""
    return "an integer >= 0" if vocab is None else f"an integer from 0 to {vocab}"


def check_temperature(value: float, name: str = "temperature") -> float:
    """`value` when it is 0 (greedy) or a finite positive number; else SamplingError naming
    `name` (nan and inf included)."""
    if not (math.isfinite(value) and value >= 0):
        raise SamplingError(f"{name} must be {TEMPERATURE_RANGE}, got {value}")
    return value


def check_top_k(value: int, vocab: int | None, name: str = "top_k") -> int:
    """`value` when it is from 0 to `vocab` (both keep every token; None: no upper bound yet);
    else SamplingError naming `name` and the range."""
    if not (0 <= value and (vocab is None or value <= vocab)):
        keeps = "0" if vocab is None else f"0 or {vocab}"
        raise SamplingError(f"{name} must be {top_k_range(vocab)} ({keeps} keeps every token), "
                            f"got {value}")
    return value


Vocab = tuple[int | None, int | None]  # (text, audio) vocabulary sizes; None: not known yet
QUERY_NAMES = {  # SamplingSettings' field -> its name in the URL query of Kyutai's web client
    "text_temp": "text_temperature", "text_top_k": "text_topk",
    "audio_temp": "audio_temperature", "audio_top_k": "audio_topk"}


@dataclass(frozen=True)
class SamplingSettings:
    """How Moshi samples its two streams, as Kyutai's Moshi does: at a temperature (0: greedy),
    among the top-k most likely tokens (0 or the vocabulary size: all), no top-p; the defaults
    are Kyutai's. The apps name the values their own way (`names`: field -> the user's name,
    e.g. a flag), so that every error names what the user typed."""

    text_temp: float = 0.7
    text_top_k: int = 25
    audio_temp: float = 0.8
    audio_top_k: int = 250

    def check(self, vocab: Vocab = (None, None),
              names: dict[str, str] | None = None) -> "SamplingSettings":
        """These settings, checked.

        Args:
            vocab: (text, audio) vocabulary sizes (`cfg.text_card`, `cfg.card`); None: unknown,
                top-k is checked against no upper bound.
            names: field -> the name the user gave the value (e.g. a flag), for the errors.

        Returns:
            self.

        Raises:
            SamplingError: a value out of range, named by `names` with its valid range.
        """
        self.samplers(vocab, names)
        return self

    def samplers(self, vocab: Vocab = (None, None),
                 names: dict[str, str] | None = None) -> tuple[Sampler, Sampler]:
        """The settings as samplers, checked as `check` does (same arguments and errors).

        Returns:
            (text sampler, audio sampler).
        """
        names = names or {}
        return tuple(
            Sampler(temp=check_temperature(getattr(self, f"{stream}_temp"),
                                           names.get(f"{stream}_temp", f"{stream}_temp")),
                    top_k=check_top_k(getattr(self, f"{stream}_top_k"), size,
                                      names.get(f"{stream}_top_k", f"{stream}_top_k")),
                    top_p=1.0)
            for stream, size in zip(("text", "audio"), vocab))

    def query_ranges(self, vocab: Vocab = (None, None)) -> dict[str, dict]:
        """What a URL query may set (`QUERY_NAMES`), for a page's settings: name -> {"default":
        this value, "min": its least, "max": its most (top-k, where the vocabulary is known),
        "integer": whether it is a whole number}."""
        ranges = {}
        for field, name in QUERY_NAMES.items():
            is_temp = field.endswith("_temp")
            size = vocab[0 if field.startswith("text") else 1]
            ranges[name] = {"default": getattr(self, field), "min": 0, "integer": not is_temp}
            if not is_temp and size is not None:
                ranges[name]["max"] = size
        return ranges

    def with_query(self, query: Mapping[str, str], vocab: Vocab = (None, None)
                   ) -> "SamplingSettings":
        """These settings, overridden by those in a URL query (`QUERY_NAMES`: Kyutai's web
        client's); other parameters are ignored.

        Args:
            query: the URL query's parameters.
            vocab: as for `check`.

        Returns:
            New settings.

        Raises:
            SamplingError (a ValueError): a value that is not a number or is out of range,
                naming the query parameter and its valid range.
        """
        changes = {}
        for field, name in QUERY_NAMES.items():
            if name not in query:
                continue
            is_temp = field.endswith("_temp")
            try:
                changes[field] = (float if is_temp else int)(query[name])
            except ValueError:
                size = vocab[0 if field.startswith("text") else 1]
                valid = TEMPERATURE_RANGE if is_temp else top_k_range(size)
                raise SamplingError(f"{name}={query[name]!r} is not a number: it must be "
                                    f"{valid}") from None
        return replace(self, **changes).check(vocab, QUERY_NAMES)
