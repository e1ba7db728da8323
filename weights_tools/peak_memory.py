"""Peak resident memory of a tool run in a fresh process (used by the memory test of
`quantize` and by `benchmarks/bench_quantize.py`)."""

import subprocess
import sys

# Runs a module as __main__, then prints the process's peak resident memory on stderr. Linux's
# VmHWM covers this process image only; ru_maxrss would include the forking parent's footprint.
_WRAPPER = """
import atexit, resource, runpy, sys
def report():
    try:
        line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))
        peak = int(line.split()[1]) * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    print(f'peak_rss_bytes={peak}', file=sys.stderr)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""
_MARK = "peak_rss_bytes="


def run_module_measured(module: str, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Runs `python -m module args...`; returns the finished process (stdout/stderr captured as
    text, the peak line removed from stderr) and its peak resident memory in bytes."""
    result = subprocess.run([sys.executable, "-c", _WRAPPER, module, *args],
                            capture_output=True, text=True)
    head, _, tail = result.stderr.rpartition(_MARK)
    result.stderr = head
    return result, int(tail)
