# Every target sets up what it needs: on a fresh machine `make test` alone installs and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,parity]"
	# Kyutai's PyTorch moshi (parity test): its pins are older than what we use, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps moshi==0.2.13
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.bench_lm

lint: $(STAMP)
	$(PY) -m ruff check moshi_mlx weights_tools tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
