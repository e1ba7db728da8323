"""The transformer blocks shared by Moshi's temporal transformer and its depformer.

Parameter names (`self_attn.in_proj`, `gating.linear_in`, `norm1`...) are those of Kyutai's MLX
checkpoints, so their files load with strict checking.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import RotatingKVCache


@dataclass
class TransformerArgs:
    dim: int
    num_heads: int
    num_layers: int
    ffn_hidden: int
    context: int
    max_period: float
    rope: bool
    norm_f32: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


class RMSNorm(nn.RMSNorm):
    """RMS norm with a learnt scale; Moshi's `rms_norm_f32` normalises in float32 (eps 1e-8)."""

    def __init__(self, dims: int, float32: bool):
        super().__init__(dims, eps=1e-8 if float32 else 1e-5)
        self.float32 = float32

    def __call__(self, x: mx.array) -> mx.array:
        if self.float32 and x.dtype != mx.float32:
            y = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
            return y.astype(x.dtype)
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection and no biases."""

    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.num_heads = args.num_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.in_proj = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.out_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.rope = (
            nn.RoPE(args.head_dim, traditional=True, base=args.max_period) if args.rope else None
        )

    def __call__(self, x: mx.array, cache=None, mask=None) -> mx.array:
        """x: [batch, steps, dim]; `cache` an mlx_lm KV cache; `mask` for several steps at once."""
        b, t, d = x.shape
        qkv = self.in_proj(x).reshape(b, t, 3, self.num_heads, self.head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.rope is not None:
            offset = 0 if cache is None else cache.offset
            q = self.rope(q, offset=offset)
            k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, t, d))


class MlpGating(nn.Module):
    """SiLU-gated MLP: `linear_in` produces the gate and the value halves side by side."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, value = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(nn.silu(gate) * value)


class TransformerLayer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.norm1 = RMSNorm(args.dim, args.norm_f32)
        self.self_attn = Attention(args)
        self.norm2 = RMSNorm(args.dim, args.norm_f32)
        self.gating = MlpGating(args.dim, args.ffn_hidden)

    def __call__(self, x: mx.array, cache=None, mask=None) -> mx.array:
        x = x + self.self_attn(self.norm1(x), cache=cache, mask=mask)
        return x + self.gating(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.layers = [TransformerLayer(args) for _ in range(args.num_layers)]

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        """x: [batch, steps, dim]. Several steps attend causally, each to the last `context` steps
        (its own included), whether they start a sequence or continue the one in `cache`. A
        single step needs no mask: the caches never hold more than `context` steps."""
        cache = cache or [None] * len(self.layers)
        mask = None
        if x.shape[1] > 1:
            mask = create_attention_mask(x, cache[0], window_size=self.args.context)
        for layer, c in zip(self.layers, cache):
            x = layer(x, cache=c, mask=mask)
        return x

    def make_cache(self) -> list[RotatingKVCache]:
        """One sliding-window cache per layer, holding the last `context` steps."""
        return [RotatingKVCache(max_size=self.args.context) for _ in self.layers]

