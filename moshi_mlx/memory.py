"""Estimating the memory a model needs before loading it, and warning when the machine lacks it."""

import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from math import prod
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .models.checkpoint import Quantization, read_header
from .models.config import LmConfig
from .models.lm import activation_dtype_for

log = logging.getLogger(__name__)

GB = 1e9
SMALLER = (Quantization(8, 64), Quantization(4, 32))  # what -q 8 and -q 4 load


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed by a running model: `weights` as stored in the file, the temporal
    transformer's `kv_cache` at full context, and Mimi's weights (`mimi`, float32)."""

    weights: int
    kv_cache: int
    mimi: int
    quantization: Quantization | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.mimi

    def with_quantization(self, q: Quantization) -> "MemoryEstimate":
        """The same model with its weights quantized as `q` (approximately)."""
        ratio = bits_per_weight(q) / bits_per_weight(self.quantization)
        return MemoryEstimate(round(self.weights * ratio), self.kv_cache, self.mimi, q)


def bits_per_weight(q: Quantization | None) -> float:
    """bf16 is 16 bits; a quantized weight adds a bf16 scale and bias per group."""
    return 16.0 if q is None else q.bits + 32 / q.group_size


def kv_cache_bytes(cfg: LmConfig, quantization: Quantization | None, batch_size: int = 1) -> int:
    """Keys and values of every temporal layer over `context` steps, in the activation dtype."""
    dtype = activation_dtype_for(quantization is not None)
    return 2 * cfg.num_layers * cfg.context * cfg.dim * batch_size * dtype.size


def estimate(files) -> MemoryEstimate:
    """`files`: a `model_files.ModelFiles`. Reads the two weight files' headers only."""
    mimi = read_header(files.mimi_weight)
    return MemoryEstimate(
        weights=read_header(files.moshi_weight).data_bytes,
        kv_cache=kv_cache_bytes(files.lm_config, files.quantization),
        mimi=4 * sum(prod(t.shape) for t in mimi.tensors.values()),
        quantization=files.quantization,
    )


def available_memory() -> int | None:
    """Bytes the system can give without swapping (Linux: MemAvailable; macOS: free, inactive,
    speculative and purgeable pages), or None when it cannot tell."""
    try:
        if sys.platform.startswith("linux"):
            meminfo = Path("/proc/meminfo").read_text()
            return int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M).group(1)) * 1024
        if sys.platform == "darwin":
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
            page = int(re.search(r"page size of (\d+) bytes", out).group(1))
            kinds = ("free", "inactive", "speculative", "purgeable")
            pages = sum(int(re.search(rf"^Pages {k}:\s+(\d+)", out, re.M).group(1)) for k in kinds)
            return pages * page
    except (OSError, AttributeError, ValueError, subprocess.SubprocessError):
        return None
    return None


def describe(est: MemoryEstimate) -> str:
    return (f"about {est.total / GB:.1f} GB (weights {est.weights / GB:.1f} GB, KV cache at full "
            f"context {est.kv_cache / GB:.1f} GB, Mimi {est.mimi / GB:.1f} GB)")


@dataclass(frozen=True)
class MemoryLimit:
    """What a model's memory is checked against: `size` bytes, said as "only {size} GB
    {description}"; `mlx_only`: counts what MLX holds (weights, KV cache) but not Mimi, which
    runs outside MLX."""

    size: int
    description: str
    mlx_only: bool = False

    def needed(self, est: MemoryEstimate) -> int:
        return est.weights + est.kv_cache if self.mlx_only else est.total


def recommended_working_set() -> int | None:
    """Bytes MLX's device recommends keeping in use at most (Metal: what the GPU may hold
    resident), or None where the device reports none (the CPU)."""
    return mx.device_info().get("max_recommended_working_set_size")


def memory_limits() -> list[MemoryLimit]:
    """MLX's recommended working set where the device reports one, then the memory available
    now where the system tells it."""
    limits = []
    working_set = recommended_working_set()
    if working_set is not None:
        limits.append(MemoryLimit(working_set, "is MLX's recommended working set on this GPU",
                                  mlx_only=True))
    available = available_memory()
    if available is not None:
        limits.append(MemoryLimit(available, "of memory is available"))
    return limits


def shortage_message(est: MemoryEstimate, limit: MemoryLimit) -> str | None:
    """A warning when `est` exceeds `limit`, suggesting a smaller quantization."""
    if limit.needed(est) <= limit.size:
        return None
    smaller = [(q, est.with_quantization(q)) for q in SMALLER
               if bits_per_weight(q) < bits_per_weight(est.quantization)]
    if smaller:
        advice = "Try " + " or ".join(
            f"-q {q.bits} (about {limit.needed(e) / GB:.1f} GB)" for q, e in smaller) + "."
    else:
        advice = "Close other applications, or use a machine with more memory."
    needs = describe(est) if not limit.mlx_only else (
        f"about {limit.needed(est) / GB:.1f} GB in MLX (weights and KV cache)")
    return (f"this model needs {needs} but only {limit.size / GB:.1f} GB {limit.description}: "
            f"it may swap heavily or be killed. {advice}")


def warn_if_short(est: MemoryEstimate) -> None:
    """Logs what the model needs, and a warning for the first limit it exceeds."""
    log.info("memory needed: %s", describe(est))
    for limit in memory_limits():
        message = shortage_message(est, limit)
        if message:
            log.warning("warning: %s", message)
            return


def wire_model_memory() -> None:
    """Lets MLX keep up to its recommended working set resident, as `mlx_lm` does while it
    generates, so that the model's weights are not paged out between steps (a no-op where the
    device recommends no working set)."""
    maybe_set_recommended_wired_limit()
