"""Helium, Kyutai's text language model: Moshi's temporal transformer alone, over text tokens.

Parameter names are those of Kyutai's MLX checkpoints (`kyutai/helium-1-preview-2b-mlx`:
`text_emb`, `transformer.layers.N.{norm1, self_attn.in_proj, self_attn.out_proj, norm2,
gating.linear_in, gating.linear_out}`, `out_norm`, `text_linear`), so their files load with strict
checking. The config reads transformers' `config.json` of a Helium model (`model_type` "helium"),
the one format Helium's shape is published in.
"""

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import RotatingKVCache

from ..utils.sampling import Sampler
from .config import ConfigError
from .lm import activation_dtype_for
from .transformer import RMSNorm, Transformer, TransformerArgs


@dataclass(frozen=True)
class HeliumConfig:
    """Helium's shape: `vocab` text tokens in and out, `num_layers` layers of width `dim` with
    `num_heads` heads and a SiLU-gated MLP of `ffn_hidden` channels, RoPE of base `max_period`,
    attention over the last `context` tokens. Norms are RMS norms of eps 1e-8."""

    dim: int
    num_heads: int
    num_layers: int
    ffn_hidden: int
    vocab: int
    context: int
    max_period: float
    cross_attention: ClassVar[bool] = False  # as LmConfig's: the memory estimate reads it

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name != "max_period" and not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"invalid Helium config: {name} = {value!r}: must be a "
                                  "positive integer")
        if not (isinstance(self.max_period, (int, float)) and self.max_period > 0):
            raise ConfigError(f"invalid Helium config: rope_theta = {self.max_period!r}: must be "
                              "a positive number")
        if self.dim % self.num_heads:
            raise ConfigError(f"invalid Helium config: num_attention_heads = {self.num_heads} "
                              f"must divide hidden_size = {self.dim}")

    @classmethod
    def from_hf_config(cls, data: dict) -> "HeliumConfig":
        """From transformers' `HeliumConfig` dict (a Helium repository's config.json). Raises
        `ConfigError` naming the key for what this model cannot run: grouped-query attention,
        biases, another head width, another activation."""
        if not isinstance(data, dict):
            raise ConfigError("a Helium config must be a JSON object")
        missing = [k for k in HF_KEYS.values() if k not in data and k != "rope_theta"]
        if missing:
            raise ConfigError(f"Helium config is missing the key(s): {', '.join(missing)}")
        rope = data.get("rope_parameters") or {}
        theta = data.get("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None)
        values = {field: data[key] for field, key in HF_KEYS.items() if key != "rope_theta"}
        cfg = cls(**values, max_period=100000.0 if theta is None else theta)
        unsupported = {
            "num_key_value_heads": (data.get("num_key_value_heads", cfg.num_heads), cfg.num_heads),
            "head_dim": (data.get("head_dim", cfg.dim // cfg.num_heads), cfg.dim // cfg.num_heads),
            "attention_bias": (data.get("attention_bias", False), False),
            "mlp_bias": (data.get("mlp_bias", False), False),
            "hidden_act": (data.get("hidden_act", "silu"), "silu"),
        }
        for key, (found, supported) in unsupported.items():
            if found != supported:
                raise ConfigError(f"Helium config: {key} = {found!r} is not supported (this "
                                  f"model runs {key} = {supported!r})")
        return cfg

    def to_hf_config(self) -> dict:
        """The config.json transformers and mlx_lm read for this shape."""
        out = {key: getattr(self, field) for field, key in HF_KEYS.items()}
        return {"model_type": "helium", "architectures": ["HeliumForCausalLM"], **out,
                "num_key_value_heads": self.num_heads, "head_dim": self.dim // self.num_heads,
                "rms_norm_eps": 1e-8, "hidden_act": "silu", "attention_bias": False,
                "mlp_bias": False, "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}

    def transformer_args(self) -> TransformerArgs:
        return TransformerArgs(dim=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
                               ffn_hidden=self.ffn_hidden, context=self.context,
                               max_period=self.max_period, rope=True, norm_f32=True)


HF_KEYS = {"dim": "hidden_size", "num_heads": "num_attention_heads",
           "num_layers": "num_hidden_layers", "ffn_hidden": "intermediate_size",
           "vocab": "vocab_size", "context": "max_position_embeddings",
           "max_period": "rope_theta"}
"""HeliumConfig's fields -> transformers' config keys."""


def helium_1_preview_2b() -> HeliumConfig:
    """`kyutai/helium-1-preview-2b` (Kyutai's `config_helium_1_preview_2b`; transformers'
    HeliumConfig defaults)."""
    return HeliumConfig(dim=2560, num_heads=20, num_layers=24, ffn_hidden=7040, vocab=48000,
                        context=4096, max_period=100000.0)


class Helium(nn.Module):
    """Token embedding, the temporal transformer (pre-norm layers, RoPE, SiLU-gated MLP), the
    final norm and the text head. The call and cache follow mlx_lm's models, so that
    `mlx_lm.generate.generate_step` drives it."""

    def __init__(self, cfg: HeliumConfig):
        super().__init__()
        self.cfg = cfg
        self.text_emb = nn.Embedding(cfg.vocab, cfg.dim)
        self.transformer = Transformer(cfg.transformer_args())
        self.out_norm = RMSNorm(cfg.dim, float32=True)  # eps 1e-8, as Helium's norms
        self.text_linear = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """tokens: int [B, T] -> logits [B, T, vocab]. Each token attends causally to the
        last `context` ones, those in `cache` (from `make_cache`) included."""
        quantized = isinstance(self.text_linear, nn.QuantizedLinear)
        dtype = activation_dtype_for(quantized, self.out_norm.weight.dtype)
        x = self.text_emb(tokens).astype(dtype)
        return self.text_linear(self.out_norm(self.transformer(x, cache=cache)))

    @property
    def layers(self) -> list[nn.Module]:
        """The transformer's layers (mlx_lm's helpers count them)."""
        return self.transformer.layers

    def make_cache(self, context: int | None = None) -> list[RotatingKVCache]:
        """One sliding-window KV cache per layer over the last `context` tokens (default: the
        model's)."""
        return self.transformer.make_cache(context)


def generate(model: Helium, prompt: list[int], sampler: Sampler, max_tokens: int,
             eos: int | None = None) -> Iterator[int]:
    """The tokens that continue `prompt` (token ids, BOS included), one at a time as they are
    sampled, at most `max_tokens`, ending before `eos`. The prompt is prefilled in one causal
    pass; each step is queued (`mx.async_eval`) before the previous token is read, so that the
    caller's work overlaps the model's. This is mlx_lm's `generate_step` loop, written out
    because its module imports `transformers` (seconds of start-up, torch where installed)."""
    if max_tokens <= 0:
        return
    cache = model.make_cache()

    def step(tokens: mx.array) -> mx.array:
        token = sampler(model(tokens[None], cache=cache)[:, -1])[0]
        mx.async_eval(token)
        return token

    token = step(mx.array(prompt))
    for n in range(max_tokens):
        upcoming = step(token) if n + 1 < max_tokens else None
        value = token.item()
        if value == eos:
            return
        yield value
        token = upcoming
