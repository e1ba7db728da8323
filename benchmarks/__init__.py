"""Benchmarks (`python -m benchmarks.<name>`). They share the tests' helpers (the chat client, the
server probes, the memory measurement): `tests/` is put on the import path, as pytest puts it
for the tests, so that both import them by the same names."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
