"""Conditioners: a per-conversation vector summed into every input step of the temporal
transformer (Hibiki's translation-quality `description`, Kyutai TTS's `cfg` and `control`), or
a sequence that the temporal transformer's cross-attention reads (Kyutai TTS's speaker
embeddings `speaker_wavs`, with sinusoidal positions added).

Names follow Kyutai's MLX checkpoints (`condition_provider.conditioners.{name}.embed` ...); the
numbers follow PyTorch `moshi`'s conditioners: a missing value (None) gives the learnt padding.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass
class ConditionTensor:
    """What a conditioner adds to the model's input: `tensor` [B, dim], one row per batch row
    (with classifier-free guidance, the conditioned rows then the unconditioned ones)."""

    tensor: mx.array
    cross: mx.array | None = None
    """[B, S, dim]: what cross-attention reads (the fused `cross` conditioners), if any."""


class LutConditioner(nn.Module):
    """One learnt vector per value of a closed list (`possible_values`)."""

    def __init__(self, output_dim: int, n_bins: int, dim: int, possible_values: list[str]):
        super().__init__()
        self.embed = nn.Embedding(n_bins + 1, dim)  # the last bin is the padding
        self.output_proj = nn.Linear(dim, output_dim, bias=False)
        self.learnt_padding = mx.zeros((1, 1, output_dim))
        self.possible_values = {v: i for i, v in enumerate(possible_values)}

    def condition(self, value: str | None) -> mx.array:
        """-> [1, output_dim]; None gives the learnt padding (no condition)."""
        if value is None:
            return self.learnt_padding[0]
        if value not in self.possible_values:
            raise ValueError(f"unknown condition value {value!r}; possible values: "
                             f"{', '.join(self.possible_values)}")
        return self.output_proj(self.embed(mx.array([self.possible_values[value]])))


class TensorConditioner(nn.Module):
    """A vector (or a sequence of them) given by the caller, projected to the model width."""

    def __init__(self, output_dim: int, dim: int):
        super().__init__()
        self.output_proj = nn.Linear(dim, output_dim, bias=False)
        self.learnt_padding = mx.zeros((1, 1, output_dim))

    def condition(self, value: mx.array | None, mask: mx.array | None = None) -> mx.array:
        """value: [B, dim] or [B, S, dim] or None -> [B, output_dim] or [B, S, output_dim]
        (None: the learnt padding, one row). `mask` [B, S] (bool): where False, the position
        is empty and gets the learnt padding (Kyutai TTS's unused speaker slots)."""
        if value is None:
            return self.learnt_padding[0]
        out = self.output_proj(mx.array(value))
        if mask is not None:
            out = mx.where(mask[..., None], out, self.learnt_padding.astype(out.dtype))
        return out


def sin_embedding(length: int, dim: int, max_period: float = 10000) -> mx.array:
    """Moshi's sinusoidal positions 0..length-1 -> [length, dim] float32: cosines then sines
    of `position / max_period ** (i / (dim / 2 - 1))`."""
    half = dim // 2
    freqs = mx.power(mx.array(max_period, mx.float32),
                     mx.arange(half, dtype=mx.float32) / (half - 1))
    phase = mx.arange(length, dtype=mx.float32)[:, None] / freqs
    return mx.concatenate([mx.cos(phase), mx.sin(phase)], axis=-1)


class ConditionProvider(nn.Module):
    """The model's conditioners by name, built from `LmConfig.conditioners`."""

    def __init__(self, output_dim: int, conditioners: dict, fuser: dict | None = None):
        super().__init__()
        fuser = fuser or {}
        self.cross_names = list(fuser.get("cross") or [])
        self.sum_names = list(fuser.get("sum") or [n for n in conditioners
                                                    if n not in self.cross_names])
        self.cross_pos_scale = (float(fuser.get("cross_attention_pos_emb_scale", 1.0))
                                if fuser.get("cross_attention_pos_emb") else 0.0)
        self.conditioners = {}
        for name, c in conditioners.items():
            params = c[c["type"]]
            if c["type"] == "lut":
                self.conditioners[name] = LutConditioner(
                    output_dim, params["n_bins"], params["dim"], params["possible_values"])
            else:
                self.conditioners[name] = TensorConditioner(output_dim, params["dim"])

    def condition_tensor(self, name: str, value) -> ConditionTensor:
        """The condition `name` = `value` (a string for a LUT, an array [B, dim] for a tensor
        conditioner, None for none), or for a list of values one row each, in that order (e.g.
        `["very_good", "very_bad"]`: conditioned and unconditioned rows for guidance)."""
        if name not in self.conditioners:
            raise ValueError(f"unknown conditioner {name!r}; this model has: "
                             f"{', '.join(self.conditioners) or 'none'}")
        conditioner = self.conditioners[name]
        values = value if isinstance(value, list) else [value]
        return ConditionTensor(mx.concatenate([conditioner.condition(v) for v in values]))

    def condition(self, values: dict) -> ConditionTensor:
        """All the model's conditions at once, for one batch row: `values` maps each conditioner
        to its value (a LUT's string; a tensor conditioner's array, or `(array, mask)`); one
        missing or None gets the learnt padding. Summed conditioners add up into `tensor`
        [1, dim]; cross ones are concatenated along positions into `cross` [1, S, dim], with
        the fuser's sinusoidal positions."""
        unknown = sorted(set(values) - set(self.conditioners))
        if unknown:
            raise ValueError(f"unknown conditioner(s) {', '.join(map(repr, unknown))}; this model "
                             f"has: {', '.join(self.conditioners) or 'none'}")
        total = None
        for name in self.sum_names:
            c = self.conditioners[name].condition(values.get(name))
            total = c if total is None else total + c
        cross = None
        if self.cross_names:
            parts = []
            for name in self.cross_names:
                value = values.get(name)
                value, mask = value if isinstance(value, tuple) else (value, None)
                part = self.conditioners[name].condition(value, mask)
                parts.append(part if part.ndim == 3 else part[None])
            cross = mx.concatenate(parts, axis=1)
            if self.cross_pos_scale:
                pos = sin_embedding(cross.shape[1], cross.shape[-1])
                cross = cross + self.cross_pos_scale * pos.astype(cross.dtype)
        return ConditionTensor(total, cross)

    def unconditioned(self, values: dict) -> ConditionTensor:
        """The row that classifier-free guidance compares with: `condition(values)` with every
        condition dropped (PyTorch moshi's `dropout_all_conditions`): LUTs get their learnt
        padding, a tensor condition keeps its positions, all of them masked (learnt padding)."""
        dropped = {}
        for name, value in values.items():
            if isinstance(self.conditioners.get(name), TensorConditioner) and value is not None:
                tensor = mx.array(value[0] if isinstance(value, tuple) else value)
                dropped[name] = (mx.zeros_like(tensor), mx.zeros(tensor.shape[:-1], mx.bool_))
        return self.condition(dropped)
