# Every target sets up what it needs: on a fresh machine `make demo` or `make test` alone
# creates the project's virtual environment (.venv) and installs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PARITY_STAMP := $(VENV)/.installed-parity

.PHONY: install demo test bench bench-live bench-memory lint clean

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

test: $(PARITY_STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.bench_lm
	$(PY) -m benchmarks.bench_quantize --layers 4 --bits 4 8
	$(PY) -m benchmarks.bench_kv_cache

# The app's memory with the KV cache full, every weight format and KV cache (7B widths, 4 layers).
bench-memory: $(STAMP)
	$(PY) -m benchmarks.bench_memory --config moshi_7b_4layers --fill direct

# The live path at real-time pace, both apps, demo model (needs espeak-ng).
bench-live: $(STAMP)
	$(PY) -m benchmarks.bench_live

lint: $(STAMP)
	$(PY) -m ruff check moshi_mlx weights_tools tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
