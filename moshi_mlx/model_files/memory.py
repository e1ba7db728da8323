"""The memory a model needs, checked before loading: the preflight chooses a KV cache (`--kv-bits`,
`--context`) that fits the machine, or refuses with the setups that would fit."""

import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from math import prod
from pathlib import Path

import mlx.core as mx

from ..models.checkpoint import Header, Quantization, quantization_of, read_header
from ..models.config import ConfigError, LmConfig
from ..models.lm import activation_dtype_for, tied_copies
from ..models.transformer import kv_group_size
from ..weights.mimi_layout import mimi_tensors
from ..weights.safetensors_writer import nbytes

log = logging.getLogger(__name__)

GB = 1e9
SMALLER = (Quantization(8, 64), Quantization(4, 32))  # what -q 8 and -q 4 load
MIMI_INSTANCES = 2  # Mimi in use and a spare loading before a restart, each with its weights
# Measured (BENCHMARKS.md, "Memory footprint", benchmarks/bench_memory.py): what the app's
# processes hold (PSS) besides Moshi's weights, its KV cache and Mimi's float32 weights.
APP_BYTES = 75_000_000  # the main process: Python, MLX, the app (72-77 measured), besides
# MLX's buffers of a step (`step_buffer_bytes`)
MIMI_PROCESS_BYTES = 46_000_000  # each Mimi process: Python, NumPy, rustymimi (45-46)


class NotEnoughMemory(Exception):
    """The model does not fit the machine's memory; the message says what would."""


@dataclass(frozen=True)
class Setup:
    """What sets the memory of a run: the weights' quantization (None: bf16), the KV cache's bits
    (None: the activation dtype) and its context in steps (None: the model's)."""

    quantization: Quantization | None
    kv_bits: int | None = None
    context: int | None = None

    def flags(self, weights: Quantization | None) -> str:
        """The command-line flags of this setup for a model whose file holds `weights`
        ('' when it is the default one)."""
        parts = [] if self.quantization == weights else [
            f"-q {self.quantization.bits}" if self.quantization else "bf16 weights (no -q)"]
        if self.kv_bits is not None:
            parts.append(f"--kv-bits {self.kv_bits}")
        if self.context is not None:
            parts.append(f"--context {self.context}")
        return " ".join(parts)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed by a running app: the Moshi `weights`, its `kv_cache` when full, Mimi's
    (`MIMI_INSTANCES` processes, float32 weights) and the `runtime` (the main process itself,
    MLX's buffers of a step included), for `setup`."""

    weights: int
    kv_cache: int
    mimi: int
    runtime: int
    setup: Setup

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.mimi + self.runtime

    @property
    def mlx(self) -> int:
        """What MLX holds (on a Mac, in the GPU's working set): weights and KV cache."""
        return self.weights + self.kv_cache


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate is made from: the config, the bytes the model loads from its weight
    file (all but the copies of tied modules, `tied_copy_bytes`) and its quantization, and
    the number of Mimi's weights that Mimi reads (its file has 32 codebook levels; the model's
    `mimi_codebooks` are read), and the streams served at once (a server's slots: each has its
    KV cache and its Mimi), each with `rows_per_stream` rows of the model (2 with classic
    guidance: a KV cache each), and `spare_mimis` Mimi instances more (a server's, loaded for
    its next stream)."""

    cfg: LmConfig
    weight_bytes: int
    quantization: Quantization | None
    mimi_params: int
    streams: int = 1
    rows_per_stream: int = 1
    spare_mimis: int = 0

    @classmethod
    def of(cls, files, streams: int = 1, rows_per_stream: int = 1,
           spare_mimis: int = 0) -> "ModelSizes":
        """`files`: a `model_files.ModelFiles`. Reads the two weight files' headers only."""
        read = mimi_tensors(files.lm_config.mimi_codebooks)
        mimi = read_header(files.mimi_weight).tensors
        header = read_header(files.moshi_weight)
        return cls(files.lm_config, header.data_bytes - tied_copy_bytes(files.lm_config, header),
                   files.quantization, sum(prod(t.shape) for n, t in mimi.items() if n in read),
                   streams, rows_per_stream, spare_mimis)

    def estimate(self, setup: Setup, activation_dtype: mx.Dtype | None = None) -> MemoryEstimate:
        """`activation_dtype`: the KV cache's when unquantized, its scales' when quantized
        (default: this backend's, `activation_dtype_for`)."""
        ratio = bits_per_weight(setup.quantization) / bits_per_weight(self.quantization)
        instances = self.streams * MIMI_INSTANCES + self.spare_mimis
        mimi = instances * (4 * self.mimi_params + MIMI_PROCESS_BYTES)
        kv_cache = kv_cache_bytes(self.cfg, setup, self.streams * self.rows_per_stream,
                                  activation_dtype)
        return MemoryEstimate(round(self.weight_bytes * ratio), kv_cache, mimi,
                              runtime_bytes(self.cfg), setup)


def tied_copy_bytes(cfg: LmConfig, header: Header) -> int:
    """Bytes of the file's copies of tied depformer modules (`models.lm.tied_copies`: the MLX
    layout holds a copy per codebook of a weight set), which the model does not load."""
    copies = tuple(f"{path}." for path in tied_copies(cfg))
    return sum(nbytes(t) for name, t in header.tensors.items() if name.startswith(copies))


def step_buffer_bytes(cfg) -> int:
    """MLX's buffers of a step, above its weights and KV cache: about a bf16 copy of the largest
    matrix, a temporal layer's MLP (88 MB measured at Moshi 7B's widths, 4096 x 11264).
    `cfg`: an `LmConfig` or a `HeliumConfig` (both have `dim` and `ffn_hidden`)."""
    return 2 * cfg.dim * cfg.ffn_hidden


def runtime_bytes(cfg) -> int:
    """The main process besides the weights and the KV cache."""
    return APP_BYTES + step_buffer_bytes(cfg)


def bits_per_weight(q: Quantization | None) -> float:
    """bf16 is 16 bits; a quantized weight adds a bf16 scale and bias per group."""
    return 16.0 if q is None else q.bits + 32 / q.group_size


CROSS_POSITIONS = 5 * 125
"""What a TTS model's cross-attention reads: 5 speaker slots of 125 frames (Kyutai's voices)."""


def kv_cache_bytes(cfg: LmConfig, setup: Setup, batch_size: int = 1,
                   activation_dtype: mx.Dtype | None = None) -> int:
    """Keys and values of every temporal layer over the context: in the activation dtype
    (default: this backend's), or `kv_bits` per value plus a scale and a bias (activation
    dtype) per group; plus, for a cross-attention model, those of its condition."""
    dtype = activation_dtype or activation_dtype_for(setup.quantization is not None)
    values = 2 * cfg.num_layers * (setup.context or cfg.context) * cfg.dim * batch_size
    cross = 0
    if cfg.cross_attention:  # Kyutai's TTS: the speakers' keys and values, computed once
        cross = 2 * cfg.num_layers * CROSS_POSITIONS * cfg.dim * batch_size * dtype.size
    if setup.kv_bits is None:
        return values * dtype.size + cross
    group_size = kv_group_size(cfg.dim // cfg.num_heads, setup.kv_bits)
    return values * setup.kv_bits // 8 + values // group_size * 2 * dtype.size + cross


def check_setup(cfg: LmConfig, kv_bits: int | None, context: int | None) -> None:
    """Raises `ConfigError`, naming the flag, for a KV cache the model cannot have."""
    if context is not None and not 1 <= context <= cfg.context:
        raise ConfigError(f"--context must be from 1 to this model's {cfg.context} steps "
                          f"({cfg.context / 12.5:.0f} s), got {context}")
    if kv_bits is not None:
        try:
            kv_group_size(cfg.dim // cfg.num_heads, kv_bits)
        except ValueError as e:
            raise ConfigError(f"--kv-bits: {e}") from None


def candidates(sizes: ModelSizes, chosen: Setup, weights: Quantization | None,
               fixed_kv: bool, fixed_context: bool) -> list[Setup]:
    """Setups with the weights `weights`, from the most exact to the smallest: the KV cache
    unquantized, at 8 bits, at 8 bits over half then a quarter of the context, then at 4 bits
    over a quarter (4 bits cost more accuracy than 8: BENCHMARKS.md, "KV cache"). A value the
    user gave (`fixed_*`) is kept."""
    full = sizes.cfg.context
    options = [(None, None), (8, None), (8, full // 2), (8, full // 4), (4, full // 4)]
    out = []
    for kv_bits, context in options:
        setup = Setup(weights, chosen.kv_bits if fixed_kv else kv_bits,
                      chosen.context if fixed_context else context)
        if setup not in out:
            out.append(setup)
    return out


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
    mimi = f"Mimi {est.mimi / GB:.1f} GB, " if est.mimi else ""
    return (f"about {est.total / GB:.1f} GB (weights {est.weights / GB:.1f} GB, KV cache "
            f"{est.kv_cache / GB:.1f} GB, {mimi}runtime {est.runtime / GB:.1f} GB)")


@dataclass(frozen=True)
class MemoryLimit:
    """What a model's memory is checked against: `size` bytes, said as "only {size} GB
    {description}"; `mlx_only`: counts what MLX holds (weights, KV cache) but not Mimi and the
    processes, which are outside MLX."""

    size: int
    description: str
    mlx_only: bool = False

    def needed(self, est: MemoryEstimate) -> int:
        return est.mlx if self.mlx_only else est.total

    def fits(self, est: MemoryEstimate) -> bool:
        return self.needed(est) <= self.size


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


def shortage(est: MemoryEstimate, limit: MemoryLimit) -> str:
    needs = describe(est) if not limit.mlx_only else (
        f"about {limit.needed(est) / GB:.1f} GB in MLX (weights and KV cache)")
    return f"needs {needs} but only {limit.size / GB:.1f} GB {limit.description}"


def choose(sizes: ModelSizes, kv_bits: int | None = None, context: int | None = None,
           limits: list[MemoryLimit] | None = None, force: bool = False) -> Setup:
    """The setup to load: the user's `kv_bits` and `context` (None: not given) for the file's
    weights when it fits every limit (default: `memory_limits()`); else the most exact KV cache
    that fits (`candidates`: what the user gave is kept), said in the log. When none fits,
    raises `NotEnoughMemory` naming the smaller weights (`-q`) that would fit, or saying
    nothing does; with `force` it warns instead and loads the user's setup."""
    limits = memory_limits() if limits is None else limits
    chosen = Setup(sizes.quantization, kv_bits, context)
    est = sizes.estimate(chosen)
    log.info("memory needed: %s", describe(est))
    fixed = (kv_bits is not None, context is not None)

    def first_fit(weights: Quantization | None) -> MemoryEstimate | None:
        for setup in candidates(sizes, chosen, weights, *fixed):
            e = sizes.estimate(setup)
            if all(limit.fits(e) for limit in limits):
                return e
        return None

    short = next((limit for limit in limits if not limit.fits(est)), None)
    if short is None:
        return chosen
    fit = first_fit(sizes.quantization)
    if fit is not None:
        log.warning("this model %s: using %s (about %.1f GB)", shortage(est, short),
                    fit.setup.flags(sizes.quantization), fit.total / GB)
        return fit.setup
    smaller = [e for q in SMALLER if bits_per_weight(q) < bits_per_weight(sizes.quantization)
               if (e := first_fit(q)) is not None]
    if smaller:
        advice = "What fits: " + " or ".join(
            f"{e.setup.flags(sizes.quantization)} (about {e.total / GB:.1f} GB)"
            for e in smaller) + "."
    else:
        least = sizes.estimate(candidates(sizes, chosen, SMALLER[-1], *fixed)[-1])
        advice = (f"Nothing fits: even {least.setup.flags(sizes.quantization)} needs about "
                  f"{least.total / GB:.1f} GB. Close other applications, or use a machine with "
                  "more memory.")
    message = f"this model {shortage(est, short)}: it would swap heavily or be killed. {advice}"
    if force:
        log.warning("warning: %s Loading anyway (--ignore-memory).", message)
        return chosen
    raise NotEnoughMemory(f"{message} Pass --ignore-memory to load anyway.")


def estimate_text_model(cfg, weight_path: Path, bits: int | None = None) -> MemoryEstimate:
    """What a text model alone (Helium: `cfg` has `num_layers`, `dim`, `num_heads`, `context`)
    needs: its weight file as loaded (quantizing to `bits` at load time keeps the file's weights
    until they are replaced, hence the file's size), its KV cache full, the runtime."""
    header = read_header(weight_path)
    setup = Setup(Quantization(bits, 64) if bits else quantization_of(header.tensors))
    return MemoryEstimate(header.data_bytes, kv_cache_bytes(cfg, setup), 0, runtime_bytes(cfg),
                          setup)


def check_fits(est: MemoryEstimate, force: bool = False,
               limits: list[MemoryLimit] | None = None) -> None:
    """Raises `NotEnoughMemory` when `est` exceeds a limit (default: `memory_limits()`); with
    `force`, warns instead."""
    log.info("memory needed: %s", describe(est))
    for limit in memory_limits() if limits is None else limits:
        if not limit.fits(est):
            message = f"this model {shortage(est, limit)}: it would swap heavily or be killed."
            if force:
                log.warning("warning: %s Loading anyway (--ignore-memory).", message)
                return
            raise NotEnoughMemory(f"{message} Pass --ignore-memory to load anyway.")


def wire_model_memory() -> None:
    """Lets MLX keep up to its recommended working set resident, as `mlx_lm` does while it
    generates, so that the model's weights are not paged out between steps (a no-op where the
    device recommends no working set). mlx_lm.utils' function of the same name, in two lines:
    that module imports `transformers`."""
    working_set = mx.device_info().get("max_recommended_working_set_size")
    if working_set is not None:
        mx.set_wired_limit(working_set)
