# Every target sets up what it needs: on a fresh machine `make demo` or `make test` alone
# creates the project's virtual environment (.venv) and installs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PARITY_STAMP := $(VENV)/.installed-parity
# Kyutai's moshi_mlx 0.3.0, the yardstick of the TTS tests and of bench-live and bench-tts.
REFERENCE := .venv-kyutai

.PHONY: install demo test test-fast test-probes bench bench-live bench-memory bench-tts lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The tests also compare the model with Kyutai's PyTorch moshi (torch on the CPU). moshi pins
# older versions of what we use, hence --no-deps.
$(PARITY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,parity]"
	$(PY) -m pip install --quiet --no-deps moshi==0.2.13
	touch $(PARITY_STAMP)

demo: $(STAMP)
	$(PY) -m moshi_mlx.local_web --demo

# All the tests, as CI runs them: those marked `realtime` (real-time pace, wall-clock deadlines,
# pings: see tests/conftest.py) one at a time, since they need the cores, after the others on two
# workers (pytest-xdist); both parts run, and either failing fails the target. Kyutai's MLX
# run_tts (in its own venv) is one of the references. Those marked `slow` (an app in a
# subprocess, a server, a real-time run, a PyTorch model, Kyutai's run_tts) are left out of
# test-fast, the subset for every change.
test: $(PARITY_STAMP) $(REFERENCE)/.installed
	$(PY) -m pytest -q -m "not realtime" -n 2; a=$$?; \
	$(PY) -m pytest -q -m realtime; b=$$?; \
	exit $$(( a != 0 || b != 0 ))

test-fast: $(PARITY_STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2

test-probes: $(STAMP)
	$(PY) -m pytest -q tests/test_server_probes.py

bench: $(STAMP)
	$(PY) -m benchmarks.bench_lm
	$(PY) -m benchmarks.bench_quantize --layers 4 --bits 4 8
	$(PY) -m benchmarks.bench_kv_cache

# The app's memory with the KV cache full, every weight format and KV cache (7B widths, 4 layers).
bench-memory: $(STAMP)
	$(PY) -m benchmarks.bench_memory --config moshi_7b_4layers --fill direct

# Kyutai's moshi_mlx 0.3.0 in a venv of its own (never imported by the project): --no-deps, since
# it pins an older mlx; what it imports is installed beside it.
$(REFERENCE)/.installed:
	$(PYTHON) -m venv $(REFERENCE)
	$(REFERENCE)/bin/pip install --quiet --no-deps moshi_mlx==0.3.0
	$(REFERENCE)/bin/pip install --quiet "mlx[cpu]" rustymimi==0.4.1 "sphn<0.3" sentencepiece \
		aiohttp huggingface_hub numpy
	touch $@

# The live apps as a user installs them (runtime dependencies only: no torch, which transformers,
# imported by mlx_lm, would import too, ~250 MB), for memory figures that are the user's.
LIVE := .venv-live
$(LIVE)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LIVE)
	$(LIVE)/bin/pip install --quiet --upgrade pip
	$(LIVE)/bin/pip install --quiet -e .
	touch $@

# The live path at real-time pace, both apps, demo model (needs espeak-ng), and the browser app
# side by side with Kyutai's local_web on the same files and client. On a machine too slow for
# real time: `make bench-live PACE=2` (a frame every 160 ms, for both servers).
PACE ?= 1
bench-live: $(LIVE)/.installed $(REFERENCE)/.installed
	$(LIVE)/bin/python -m benchmarks.bench_live --reference $(REFERENCE)/bin/python --runs 2 \
		--pace $(PACE)

# Text to speech beside Kyutai's run_tts, the same files and text, each -q: the demo model and
# kyutai/tts-1.6b-en_fr's widths (2 layers); about 25 min on 2 cores.
bench-tts: $(STAMP) $(REFERENCE)/.installed
	$(PY) -m benchmarks.bench_tts --reference $(REFERENCE)/bin/python --models demo wide

lint: $(STAMP)
	$(PY) -m ruff check moshi_mlx weights_tools tests benchmarks

clean:
	rm -rf $(VENV) $(REFERENCE) $(LIVE) .pytest_cache
