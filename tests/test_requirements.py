"""Tests that need a system tool or an optional package are skipped with the reason where it is
missing, and fail when CI=true."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pytest in subprocesses

TESTS = Path(__file__).parent
BLOCK_PARITY = "import sys; sys.modules.update(torch=None, moshi=None); "


def pytest_run(args: list[str], ci: bool, prelude: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    env["PYTHONPATH"] = str(TESTS)
    code = f"{prelude}import pytest, sys; sys.exit(pytest.main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=TESTS.parent, timeout=120)


@pytest.mark.parametrize("ci", [False, True])
def test_a_missing_tool_skips_with_its_reason_or_fails_in_ci(tmp_path, ci):
    (tmp_path / "test_needs_tool.py").write_text(
        "from conftest import require_tool\n\n"
        "def test_it():\n    require_tool('no-such-tool-here', 'some-package')\n")
    result = pytest_run(["-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)], ci)
    reason = "no-such-tool-here is needed by this test: apt-get install some-package"
    assert reason in result.stdout, result.stdout
    assert result.returncode == (1 if ci else 0), result.stdout
    assert ("1 failed" if ci else "1 skipped") in result.stdout


@pytest.mark.parametrize("ci", [False, True])
def test_pytorch_parity_without_torch(ci):
    result = pytest_run(["-q", "-rs", "-p", "no:cacheprovider", "tests/test_convert_pytorch.py"],
                        ci, prelude=BLOCK_PARITY)
    assert "the Python module torch is needed by these tests" in result.stdout, result.stdout
    if ci:
        assert result.returncode != 0 and "error" in result.stdout.lower(), result.stdout
    else:
        # pytest's exit code 5: no test ran (the module was skipped, not broken)
        assert result.returncode == 5 and "1 skipped" in result.stdout, result.stdout
