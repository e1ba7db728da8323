import logging
import sys

import mlx.core as mx
import pytest
from conftest import DATA, write_sparse_checkpoint

from moshi_mlx import memory, models
from moshi_mlx.model_files import ModelFiles
from moshi_mlx.models.checkpoint import Quantization, read_header

GB = 10**9


def test_estimate_of_moshi_7b_q4(tmp_path):
    weights = read_header(write_sparse_checkpoint(DATA / "moshi-7b-v0.1.q4.json",
                                                  tmp_path / "model.q4.safetensors")).data_bytes
    write_sparse_checkpoint(DATA / "mimi-tokenizer-e351c8d8-checkpoint125.json",
                            tmp_path / "mimi.st")
    files = ModelFiles(models.config_v0_1(), tmp_path / "model.q4.safetensors",
                       tmp_path / "mimi.st", tmp_path / "spm.model", Quantization(4, 32))
    est = memory.estimate(files)
    assert est.weights == weights == 4805385728
    act = models.lm.activation_dtype_for(quantized=True).size
    assert est.kv_cache == 2 * 32 * 3000 * 4096 * act
    assert est.mimi == 4 * 96151393
    assert est.total == est.weights + est.kv_cache + est.mimi


def available(size: float) -> memory.MemoryLimit:
    return memory.MemoryLimit(size, "of memory is available")


def test_smaller_quantizations_are_suggested_when_memory_is_short():
    bf16 = memory.MemoryEstimate(weights=16 * GB, kv_cache=2 * GB, mimi=GB // 2, quantization=None)
    message = memory.shortage_message(bf16, available(8 * GB))
    assert "only 8.0 GB of memory is available" in message
    # q8 weights: 8.5 bits per weight instead of 16; q4: 5 bits.
    assert "-q 8 (about 11.0 GB) or -q 4 (about 7.5 GB)" in message
    q8 = bf16.with_quantization(Quantization(8, 64))
    assert "Try -q 4 (about 7.5 GB)." in memory.shortage_message(q8, available(8 * GB))
    q4 = bf16.with_quantization(Quantization(4, 32))
    assert "Close other applications" in memory.shortage_message(q4, available(4 * GB))
    assert memory.shortage_message(q4, available(8 * GB)) is None


@pytest.fixture
def metal(monkeypatch):
    """A GPU whose recommended working set is 10 GB (as MLX reports on Metal), with 30 GB of
    memory available; -> the wired limits MLX was asked to set."""
    wired = []
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 10 * GB,
                                                     "memory_size": 16 * GB})
    monkeypatch.setattr(mx, "set_wired_limit", lambda size: wired.append(size) or 0)
    monkeypatch.setattr(memory, "available_memory", lambda: 30 * GB)
    return wired


def test_on_metal_the_check_is_against_the_recommended_working_set(metal, caplog):
    """Only what MLX holds counts there (Mimi runs outside MLX); bf16 does not fit, q8 does."""
    bf16 = memory.MemoryEstimate(weights=15 * GB, kv_cache=2 * GB, mimi=GB, quantization=None)
    limits = memory.memory_limits()
    assert [(limit.size, limit.mlx_only) for limit in limits] == [(10 * GB, True),
                                                                  (30 * GB, False)]
    message = memory.shortage_message(bf16, limits[0])
    assert message.startswith("this model needs about 17.0 GB in MLX (weights and KV cache) but "
                              "only 10.0 GB is MLX's recommended working set on this GPU")
    assert "-q 8 (about 10.0 GB) or -q 4 (about 6.7 GB)" in message
    assert memory.shortage_message(bf16.with_quantization(Quantization(8, 64)), limits[0]) is None
    with caplog.at_level(logging.INFO, logger="moshi_mlx"):
        memory.warn_if_short(bf16)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "recommended working set" in warnings[0]


def test_on_metal_the_model_may_keep_the_working_set_wired(metal):
    memory.wire_model_memory()
    assert metal == [10 * GB]


def test_without_a_recommended_working_set_nothing_is_wired(monkeypatch):
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "a CPU"})
    monkeypatch.setattr(mx, "set_wired_limit", lambda size: pytest.fail("wired on a CPU"))
    monkeypatch.setattr(memory, "available_memory", lambda: 30 * GB)
    memory.wire_model_memory()
    assert [limit.size for limit in memory.memory_limits()] == [30 * GB]


def test_warning_is_logged_when_memory_is_short(monkeypatch, caplog):
    est = memory.MemoryEstimate(weights=5 * GB, kv_cache=GB, mimi=0, quantization=None)
    monkeypatch.setattr(memory, "recommended_working_set", lambda: None)
    monkeypatch.setattr(memory, "available_memory", lambda: 2 * GB)
    with caplog.at_level(logging.INFO, logger="moshi_mlx"):
        memory.warn_if_short(est)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "-q 8" in warnings[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_available_memory_on_linux():
    available = memory.available_memory()
    assert 0 < available <= 2**50
