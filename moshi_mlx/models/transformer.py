"""The transformer blocks shared by Moshi's temporal transformer and its depformer.

Parameter names (`self_attn.in_proj`, `gating.linear_in`, `norm1`...) are those of Kyutai's MLX
checkpoints, so their files load with strict checking.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import RotatingKVCache

from .config import TransformerArgs

KV_BITS = (4, 8)  # what a quantized KV cache may hold (mx.quantize also has 2, 3, 6: untested)


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
        # mlx_lm's dispatch: a quantized cache (one with `bits`) attends with quantized matmuls.
        out = scaled_dot_product_attention(q, k, v, cache, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, t, d))


def linear_rows(linear: nn.Module, x: mx.array, start: int, stop: int) -> mx.array:
    """`linear(x)`'s output features start..stop only, computing those alone, for a Linear or
    a QuantizedLinear (its rows quantize independently, so a slice of rows is one too)."""
    if isinstance(linear, nn.QuantizedLinear):
        biases = linear.get("biases")
        return mx.quantized_matmul(
            x, linear["weight"][start:stop], scales=linear["scales"][start:stop],
            biases=None if biases is None else biases[start:stop], transpose=True,
            group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return x @ linear.weight[start:stop].T


class CrossAttention(Attention):
    """Attention of every step to a fixed source (Kyutai's TTS: the speaker embeddings), without
    positions or mask. Its weights are self-attention's (`in_proj` holds the query, key and
    value projections stacked, as in Kyutai's files); `keys_values` projects the source once per
    generation, each step then only its queries."""

    def __init__(self, args: TransformerArgs):
        super().__init__(args)
        self.rope = None

    def keys_values(self, source: mx.array) -> tuple[mx.array, mx.array]:
        """source: [B, S, dim] -> keys, values [B, heads, S, head_dim]."""
        b, s, d = source.shape
        kv = linear_rows(self.in_proj, source, d, 3 * d)
        kv = kv.reshape(b, s, 2, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def __call__(self, x: mx.array, keys_values: tuple[mx.array, ...]) -> mx.array:
        """x: [B, T, dim]; `keys_values` from `keys_values`, or with a third item, a boolean
        mask [B, 1, 1, S] of the source positions each row reads (rows of sources of several
        lengths, padded: `engine.batched`) -> [B, T, dim]."""
        b, t, d = x.shape
        q = linear_rows(self.in_proj, x, 0, d)
        q = q.reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k, v, *mask = keys_values
        out = mx.fast.scaled_dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                                   scale=self.scale,
                                                   mask=mask[0] if mask else None)
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
        if args.cross_attention:  # as in Moshi, its norm is a LayerNorm whatever `norm` says
            self.norm_cross = nn.LayerNorm(args.dim, eps=1e-5)
            self.cross_attention = CrossAttention(args)

    def __call__(self, x: mx.array, cache=None, mask=None, cross=None) -> mx.array:
        """`cross`: this layer's cross-attention keys and values (`Transformer.cross_keys_values`),
        required by a cross-attention layer."""
        x = x + self.self_attn(self.norm1(x), cache=cache, mask=mask)
        if "cross_attention" in self:
            x = x + self.cross_attention(self.norm_cross(x), cross)
        return x + self.gating(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.layers = [TransformerLayer(args) for _ in range(args.num_layers)]

    def __call__(self, x: mx.array, cache=None, cross=None,
                 mask: mx.array | None = None) -> mx.array:
        """x: [batch, steps, dim]. Several steps attend causally, each to the last `context` steps
        (its own included), whether they start a sequence or continue the one in `cache`. A
        single step needs no mask: the caches never hold more than `context` steps. `cross`:
        per-layer keys and values of the cross-attention source (`cross_keys_values`). `mask`
        (boolean, broadcast to [batch, heads, steps, cached steps]) replaces the causal one: rows
        at positions of their own (`engine.batched`)."""
        cache = cache or [None] * len(self.layers)
        cross = cross or [None] * len(self.layers)
        if self.args.cross_attention and cross[0] is None:
            raise ValueError("this model's layers cross-attend to a condition (e.g. speakers): "
                             "pass its keys and values (cross_keys_values)")
        if mask is None and x.shape[1] > 1:
            window = self.args.context if cache[0] is None else cache[0].max_size
            mask = create_attention_mask(x, cache[0], window_size=window)
        for layer, c, kv in zip(self.layers, cache, cross):
            x = layer(x, cache=c, mask=mask, cross=kv)
        return x

    def cross_keys_values(self, source: mx.array) -> list[tuple[mx.array, mx.array]]:
        """source: [B, S, dim], the fused cross condition -> each layer's keys and values,
        computed once and reused at every step of a generation."""
        return [layer.cross_attention.keys_values(source) for layer in self.layers]

    def make_cache(self, context: int | None = None,
                   kv_bits: int | None = None) -> list[RotatingKVCache]:
        """One sliding-window cache per layer, holding the last `context` steps (default: the
        model's), quantized to `kv_bits` (4 or 8) or kept in the activation dtype (None)."""
        context = self.args.context if context is None else context
        if kv_bits is None:
            return [RotatingKVCache(max_size=context) for _ in self.layers]
        group_size = kv_group_size(self.args.head_dim, kv_bits)
        return [QuantizedRotatingKVCache(context, kv_bits, group_size) for _ in self.layers]


def kv_group_size(head_dim: int, bits: int) -> int:
    """The group size a `bits`-bit KV cache quantizes heads of `head_dim` channels with: 64 (as
    mlx_lm's quantized KV cache), or 32 for 32-channel heads; raises ValueError otherwise."""
    if bits not in KV_BITS:
        raise ValueError(f"a quantized KV cache holds {' or '.join(map(str, KV_BITS))} bits, "
                         f"not {bits}")
    for group_size in (64, 32):
        if head_dim % group_size == 0:
            return group_size
    raise ValueError(f"this model's attention heads have {head_dim} channels: a quantized KV "
                     "cache needs a multiple of 32 (run without --kv-bits)")


def _steps(parts: tuple[mx.array, ...]) -> int:
    return parts[0].shape[2]


class QuantizedRotatingKVCache(RotatingKVCache):
    """`RotatingKVCache` (the last `max_size` steps) holding keys and values as mlx_lm's
    `QuantizedKVCache` does: `mx.quantize`'s (packed uint32, scales, biases), each
    [B, heads, steps, ...], that `scaled_dot_product_attention` reads with quantized matmuls.

    mlx_lm's quantized cache only grows and its rotating cache refuses to quantize
    (`to_quantized` raises), hence this rotation over the three parts, following
    `RotatingKVCache`'s layout (with `keep` 0): one step is written in place, at the oldest slot
    once full; several steps are appended to the last `max_size - 1` in temporal order, so that
    the window mask (`make_mask`, inherited) lets each see `max_size` steps.
    """

    def __init__(self, max_size: int, bits: int, group_size: int):
        super().__init__(max_size)
        self.bits = bits
        self.group_size = group_size

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """keys, values: [B, heads, steps, head_dim] -> the cached ones, quantized."""
        new = tuple(tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))
                    for x in (keys, values))
        if keys.shape[2] == 1:
            self._write_one(new)
        else:
            self._append(new)
        self.offset += keys.shape[2]
        return self.keys_and_values()

    def _in_order(self, part: mx.array) -> mx.array:
        """The cached steps of `part` from the oldest to the newest."""
        if self._idx < min(self.offset, part.shape[2]):  # wrapped: the oldest is at `_idx`
            return mx.concatenate([part[..., self._idx:, :], part[..., :self._idx, :]], axis=2)
        return part[..., :self._idx, :]

    def _append(self, new) -> None:
        if self.keys is not None:
            def append(part, n):
                part = self._in_order(part)
                keep = min(part.shape[2], self.max_size - 1)
                return mx.concatenate([part[..., part.shape[2] - keep:, :], n], axis=2)

            new = tree_map(append, (self.keys, self.values), new)
        self.keys, self.values = new
        self._idx = _steps(self.keys)

    def _write_one(self, new) -> None:
        size = 0 if self.keys is None else _steps(self.keys)
        if self.offset >= size and size < self.max_size:  # grow by `step` slots
            grow = min(self.step, self.max_size - self.offset)

            def zeros(n):
                return mx.zeros((*n.shape[:2], grow, n.shape[3]), n.dtype)

            if self.keys is None:
                self.keys, self.values = tree_map(zeros, new)
            else:
                self.keys, self.values = tree_map(
                    lambda part, n: mx.concatenate([part, zeros(n)], axis=2),
                    (self.keys, self.values), new)
            self._idx = self.offset
        trim = _steps(self.keys) - self.max_size
        if trim > 0:  # after several steps were appended: drop the oldest, in temporal order
            self.keys, self.values = tree_map(lambda c: c[..., trim:, :], (self.keys, self.values))
            self._idx = self.max_size
        if self._idx == self.max_size:
            self._idx = 0
        for cached, written in zip(self.keys + self.values, new[0] + new[1]):
            cached[..., self._idx:self._idx + 1, :] = written
        self._idx += 1

    def keys_and_values(self):
        if self.offset < _steps(self.keys):
            return tree_map(lambda c: c[..., :self.offset, :], (self.keys, self.values))
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.keys + self.values)

