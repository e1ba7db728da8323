"""Conditioners: a per-conversation vector summed into every input step of the temporal
transformer (Hibiki's translation-quality `description`, for instance).

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
    """A vector given by the caller, projected to the model width."""

    def __init__(self, output_dim: int, dim: int):
        super().__init__()
        self.output_proj = nn.Linear(dim, output_dim, bias=False)
        self.learnt_padding = mx.zeros((1, 1, output_dim))

    def condition(self, value: mx.array | None) -> mx.array:
        """value: [B, dim] or None -> [B, output_dim] (None: the learnt padding, one row)."""
        if value is None:
            return self.learnt_padding[0]
        return self.output_proj(mx.array(value))


class ConditionProvider(nn.Module):
    """The model's conditioners by name, built from `LmConfig.conditioners`."""

    def __init__(self, output_dim: int, conditioners: dict):
        super().__init__()
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
