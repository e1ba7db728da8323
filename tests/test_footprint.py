"""The preflight's estimate against the app's measured memory (`footprint.py`, which
`benchmarks/bench_memory.py` prints)."""

import sys

import pytest
from conftest import random_model, tiny_config
from footprint import fill_cache, run_setup


@pytest.mark.parametrize("bits", [None, 8])
def test_a_direct_fill_holds_what_a_prefill_holds(bits):
    """The benchmark's quick fill (keys and values written straight in) leaves the caches with
    the arrays a prefill through the model leaves: same shapes, dtypes and bytes."""
    model = random_model(tiny_config(dim=256, num_heads=4, context=70))
    caches = {}
    for how in ("model", "direct"):
        caches[how] = model.make_cache(kv_bits=bits)
        fill_cache(model, caches[how], how)
    shapes = {how: [[(p.shape, p.dtype) for p in (c.keys if bits else (c.keys,))]
                    for c in cache] for how, cache in caches.items()}
    assert shapes["model"] == shapes["direct"]
    assert [c.offset for c in caches["model"]] == [c.offset for c in caches["direct"]] == [70] * 2


@pytest.mark.slow  # a model and three processes loaded in a fresh process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/*/smaps_rollup")
@pytest.mark.parametrize("layout, fmt, bits", [("test_small", "q4", None),
                                                ("small_16rvq", "q8", 8)])
def test_estimate_is_within_10_percent_of_the_measured_footprint(layout, fmt, bits):
    """The app as `ModelWorker` loads it (Moshi, Mimi's process and the next one, as just before a
    restart), its KV cache full, a few steps run: the proportional memory of all its processes
    against the preflight's estimate."""
    r = run_setup(layout, fmt, bits, None, "direct")
    assert len(r["processes"]) == 3  # the app, Mimi's process and the next one, before a restart
    assert r["kv_cache"] == r["estimate"]["kv_cache"]
    assert abs(r["estimate"]["total"] / r["pss"] - 1) < 0.10, r
