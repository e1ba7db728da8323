"""The memory preflight: the estimate, and the setup it chooses on mocked machines."""

import json
import logging
import math
import re
import sys

import mlx.core as mx
import pytest
from conftest import DATA, random_model, tiny_config, write_sparse_checkpoint

from moshi_mlx import models
from moshi_mlx.model_files import ModelFiles, memory
from moshi_mlx.models.checkpoint import Quantization, read_header

GB = 10**9
Q8, Q4 = Quantization(8, 64), Quantization(4, 32)
MIMI_READ = 83_519_305  # Mimi's float32 weights read for 8 codebooks, from the manifest below


def manifest_bytes(name: str) -> int:
    sizes = {"BF16": 2, "F32": 4, "U32": 4}
    tensors = json.loads((DATA / name).read_text())["tensors"].values()
    return sum(sizes[t["st_dtype"]] * math.prod(t["shape"]) for t in tensors)


def test_mimi_weights_read_are_those_of_8_codebooks():
    """rustymimi reads the first level's quantizer and 7 of the 31 others' (weights_tools'
    mimi_layout); counted here from the release file's manifest."""
    tensors = json.loads((DATA / "mimi-tokenizer-e351c8d8-checkpoint125.json").read_text())
    rest = re.compile(r"^quantizer\.rvq_rest\.vq\.layers\.(\d+)\.")
    read = [t["shape"] for name, t in tensors["tensors"].items()
            if not (m := rest.match(name)) or int(m.group(1)) < 7]
    assert sum(math.prod(s) for s in read) == MIMI_READ


def test_estimate_of_moshi_7b_q4(tmp_path):
    weights = write_sparse_checkpoint(DATA / "moshi-7b-v0.1.q4.json", tmp_path / "m.safetensors")
    mimi = write_sparse_checkpoint(DATA / "mimi-tokenizer-e351c8d8-checkpoint125.json",
                                   tmp_path / "mimi.safetensors")
    files = ModelFiles(models.config_v0_1(), weights, mimi, tmp_path / "spm.model", Q4)
    sizes = memory.ModelSizes.of(files)
    assert sizes.mimi_params == MIMI_READ
    est = sizes.estimate(memory.Setup(Q4))
    assert est.weights == read_header(weights).data_bytes == 4805385728
    act = models.lm.activation_dtype_for(quantized=True).size
    assert est.kv_cache == 2 * 32 * 3000 * 4096 * act
    assert est.mimi == 2 * (4 * MIMI_READ + memory.MIMI_PROCESS_BYTES)
    assert est.total == est.weights + est.kv_cache + est.mimi + est.runtime
    # 8 bits per value plus a scale and a bias (activation dtype) per 64 values; 750 steps.
    small = sizes.estimate(memory.Setup(Q4, kv_bits=8, context=750))
    assert small.kv_cache == 2 * 32 * 750 * 4096 * (1 + 2 * act / 64)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_kv_cache_estimate_is_the_bytes_of_a_full_cache(bits):
    """The formula against the arrays of a real cache filled past its context (float32 model)."""
    cfg = tiny_config(dim=256, num_heads=4, context=40)
    model = random_model(cfg)
    cache = model.make_cache(context=30, kv_bits=bits)
    text = mx.zeros((1, 50), mx.int32)
    model(text, mx.zeros((1, cfg.n_q, 50), mx.int32), cache=cache)
    model(text[:, :1], mx.zeros((1, cfg.n_q, 1), mx.int32), cache=cache)  # trims to 30 steps
    # quantized=True: float32 activations on the CPU, as this float32 model's
    setup = memory.Setup(Q4 if mx.default_device().type == mx.DeviceType.cpu else None,
                         bits, 30)
    assert memory.kv_cache_bytes(cfg, setup) == sum(c.nbytes for c in cache)


@pytest.fixture
def metal(monkeypatch):
    """Estimates as on Metal (bf16 activations, also for quantized weights)."""
    monkeypatch.setattr(memory, "activation_dtype_for", lambda quantized: mx.bfloat16)


def sizes_7b(fmt: str, q: Quantization | None) -> memory.ModelSizes:
    return memory.ModelSizes(models.config_v0_1(), manifest_bytes(f"moshi-7b-v0.1.{fmt}.json"),
                             q, MIMI_READ)


def machine(working_set: float | None, available: float) -> list[memory.MemoryLimit]:
    limits = [memory.MemoryLimit(round(available * GB), "of memory is available")]
    if working_set is None:
        return limits
    return [memory.MemoryLimit(round(working_set * GB), "is MLX's working set", mlx_only=True),
            *limits]


def test_a_model_that_fits_keeps_its_setup(metal, caplog):
    with caplog.at_level(logging.INFO, logger="moshi_mlx"):
        setup = memory.choose(sizes_7b("q4", Q4), limits=machine(21, 20))
    assert setup == memory.Setup(Q4)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_q8_on_a_16_gb_mac_with_a_browser_gets_a_smaller_cache(metal, caplog):
    """7B q8 needs 10.7 GB, 9.9 GB with an 8-bit cache, 9.5 GB with an 8-bit one over 1500
    steps (weights 8.2, cache 1.57 / 0.84 / 0.42, Mimi 0.76, runtime 0.17): with 9.8 GB
    available the last is chosen, and said."""
    with caplog.at_level(logging.INFO, logger="moshi_mlx"):
        setup = memory.choose(sizes_7b("q8", Q8), limits=machine(10.7, 9.8))
    assert setup == memory.Setup(Q8, kv_bits=8, context=1500)
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "only 9.8 GB of memory is available: using --kv-bits 8 --context 1500 (about 9.5 GB)" \
        in warning


def test_on_metal_the_working_set_counts_weights_and_cache_only(metal):
    """bf16 (15.4 GB of weights, 1.57 of cache) in a 16.5 GB working set: an 8-bit cache fits
    (16.2 GB); the 20 GB available hold the whole app (17.5 GB)."""
    assert memory.choose(sizes_7b("bf16", None), limits=machine(16.5, 20)) == \
        memory.Setup(None, kv_bits=8)


def test_given_flags_are_kept_and_the_context_shortened(metal):
    """With --kv-bits 8 given, only shorter contexts are tried: q4, 8-bit cache: 6.6 GB at 3000
    steps, 6.2 at 1500; with 6.4 GB available -> 1500 steps."""
    setup = memory.choose(sizes_7b("q4", Q4), kv_bits=8, limits=machine(None, 6.4))
    assert setup == memory.Setup(Q4, kv_bits=8, context=1500)


def test_when_these_weights_cannot_fit_the_smaller_ones_are_named(metal):
    """bf16 needs at least 16.5 GB; with 9.8 GB available q8 fits with an 8-bit cache over 1500
    steps (9.5 GB) and q4 with an unquantized one (7.3 GB)."""
    with pytest.raises(memory.NotEnoughMemory) as e:
        memory.choose(sizes_7b("bf16", None), limits=machine(None, 9.8))
    message = str(e.value)
    assert "only 9.8 GB of memory is available" in message
    assert "What fits: -q 8 --kv-bits 8 --context 1500 (about 9.5 GB) or -q 4 (about 7.3 GB)." \
        in message
    assert message.endswith("Pass --ignore-memory to load anyway.")


def test_an_8_gb_mac_is_refused_with_what_it_lacks(metal, caplog):
    """q4 needs 5.8 GB at the least (4-bit cache over 750 steps; 4.9 GB in MLX): 5.5 GB
    available is not enough for anything; --ignore-memory loads the chosen setup with a
    warning."""
    sizes = sizes_7b("q4", Q4)
    with pytest.raises(memory.NotEnoughMemory,
                       match=r"Nothing fits: even --kv-bits 4 --context 750 needs about 5\.8 GB"):
        memory.choose(sizes, limits=machine(5.3, 5.5))
    with caplog.at_level(logging.INFO, logger="moshi_mlx"):
        assert memory.choose(sizes, limits=machine(5.3, 5.5), force=True) == memory.Setup(Q4)
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "Loading anyway (--ignore-memory)" in warning


def test_flags_the_model_cannot_take_are_refused():
    with pytest.raises(models.ConfigError, match="--context must be from 1 to this model's 3000"):
        memory.check_setup(models.config_v0_1(), None, 3001)
    with pytest.raises(models.ConfigError, match="--kv-bits: .* 16 channels"):
        memory.check_setup(tiny_config(), 8, None)
    memory.check_setup(models.config_v0_1(), 4, 1)


def test_limits_on_metal_and_elsewhere(monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 10 * GB})
    monkeypatch.setattr(memory, "available_memory", lambda: 30 * GB)
    assert [(limit.size, limit.mlx_only) for limit in memory.memory_limits()] == [
        (10 * GB, True), (30 * GB, False)]
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "a CPU"})
    assert [limit.size for limit in memory.memory_limits()] == [30 * GB]


def test_on_metal_the_model_may_keep_the_working_set_wired(monkeypatch):
    wired = []
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 10 * GB,
                                                     "memory_size": 16 * GB})
    monkeypatch.setattr(mx, "set_wired_limit", lambda size: wired.append(size) or 0)
    memory.wire_model_memory()
    assert wired == [10 * GB]


def test_without_a_recommended_working_set_nothing_is_wired(monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "a CPU"})
    monkeypatch.setattr(mx, "set_wired_limit", lambda size: pytest.fail("wired on a CPU"))
    memory.wire_model_memory()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_available_memory_on_linux():
    available = memory.available_memory()
    assert 0 < available <= 2**50


def test_tts_estimate_counts_the_speakers_keys_and_values():
    """A cross-attention model also holds, per layer, the keys and values of its 5 x 125
    speaker positions: the arrays `cross_keys_values` makes (float32 model)."""
    from moshi_mlx.models.tts import speaker_condition

    cfg = models.LmConfig.from_config_dict(json.loads((DATA / "small_tts.json").read_text()))
    model = random_model(cfg)
    voices = speaker_condition([mx.zeros((1, 512, 125))])
    cross = model.cross_keys_values(model.condition_provider.condition(
        {"control": "ok", "cfg": "2.0", "speaker_wavs": voices}))
    setup = memory.Setup(Q4 if mx.default_device().type == mx.DeviceType.cpu else None, None, 30)
    plain = models.LmConfig.from_config_dict(
        cfg.to_config_dict() | {"cross_attention": False, "fuser": {"sum": ["control", "cfg"]},
                                "conditioners": {k: v for k, v in cfg.conditioners.items()
                                                 if k != "speaker_wavs"}})
    extra = memory.kv_cache_bytes(cfg, setup) - memory.kv_cache_bytes(plain, setup)
    assert extra == sum(k.nbytes + v.nbytes for k, v in cross) > 0


def test_guidance_rows_each_have_a_kv_cache_and_share_the_mimi():
    """Classic guidance steps two rows of the model per stream: the estimate counts a full cache
    for each (the arrays of a real cache filled by a batch of 2, float32 model) and one Mimi."""
    cfg = tiny_config(dim=256, num_heads=4, context=40)
    model = random_model(cfg)
    cache = model.make_cache(context=30)
    text = mx.zeros((2, 50), mx.int32)
    model(text, mx.zeros((2, cfg.n_q, 50), mx.int32), cache=cache)
    model(text[:, :1], mx.zeros((2, cfg.n_q, 1), mx.int32), cache=cache)  # trims to 30 steps
    setup = memory.Setup(Q4 if mx.default_device().type == mx.DeviceType.cpu else None, None, 30)
    one, guided = (memory.ModelSizes(cfg, 10**6, None, 1000, rows_per_stream=rows).estimate(setup)
                   for rows in (1, 2))
    assert guided.kv_cache == 2 * one.kv_cache == sum(c.nbytes for c in cache)
    assert guided.mimi == one.mimi and guided.weights == one.weights
