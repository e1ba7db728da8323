"""Mimi through its process: rustymimi's own codes and samples, restarts before rustymimi's
limit, a fresh Mimi per stream, and the deadlines on a child that hangs or dies."""

import json
import os
import queue
import signal
import threading
import time

import numpy as np
import pytest
import rustymimi

from moshi_mlx.audio import mimi_process
from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.audio.mimi import Mimi
from moshi_mlx.audio.mimi_process import MimiError, MimiProcess


@pytest.fixture(scope="module")
def mimi_path(demo_dir):
    return demo_dir / json.loads((demo_dir / "config.json").read_text())["mimi_name"]


def noise(seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(FRAME_SIZE)).astype(np.float32)


@pytest.mark.slow  # Mimi processes, 3 s
def test_gives_exactly_what_rustymimi_gives_frame_by_frame(mimi_path):
    """Both directions of one process, against rustymimi's own Tokenizer step by step."""
    mimi = Mimi(mimi_path)
    reference = rustymimi.Tokenizer(str(mimi_path), num_codebooks=8)
    try:
        for i in range(6):
            codes = mimi.encode(noise(i))
            assert codes.shape == (8,) and codes.dtype == np.int32
            expected = reference.encode_step(noise(i)[None, None])[0, :, 0]
            np.testing.assert_array_equal(codes, expected)
            pcm = mimi.decode(codes)
            assert pcm.shape == (FRAME_SIZE,) and pcm.dtype == np.float32
            np.testing.assert_array_equal(
                pcm, reference.decode_step(codes.astype(np.uint32)[None, :, None])[0, 0])
        assert len(mimi.processes) == 1
    finally:
        mimi.close()


@pytest.mark.slow  # several Mimi processes, one after another
def test_runs_past_the_transformer_limit_with_at_most_one_spare(mimi_path):
    """rustymimi fails after max_seq_len / 2 frames; both directions move to the next process
    (loaded from half of the span on) before that, and the used one ends."""
    mimi = Mimi(mimi_path, max_seq_len=40)  # 20 frames a process
    pids = set()
    try:
        for i in range(50):
            mimi.decode(mimi.encode(noise(i)))
            processes = mimi.processes
            assert len(processes) <= 2
            pids |= {p.pid for p in processes}
        assert mimi.restarts == 2 and len(pids) == 3
    finally:
        mimi.close()


@pytest.mark.slow  # Mimi processes, 3 s
def test_restarts_early_on_a_quiet_frame(mimi_path):
    mimi = Mimi(mimi_path, max_seq_len=40, decoder=False)
    try:
        for i in range(16):
            mimi.encode(noise(i))
        assert mimi.restarts == 0
        mimi.encode(np.zeros(FRAME_SIZE, np.float32))  # quiet, and past 3/4 of the limit
        assert mimi.restarts == 1
    finally:
        mimi.close()


@pytest.mark.slow  # several Mimi processes, one after another
def test_each_stream_starts_on_a_fresh_mimi(mimi_path):
    """A stream after `prepare_next` and `reset` gives exactly what a fresh Mimi gives, and the
    used process has ended."""
    frames = [noise(i) for i in range(6)]
    mimi = Mimi(mimi_path)
    try:
        fresh = [mimi.decode(mimi.encode(f)) for f in frames]
        for _ in range(2):
            used = mimi.processes
            mimi.prepare_next()
            assert all(p._process.poll() is not None for p in used)
            assert len(mimi.processes) == 1
            mimi.reset()
            again = [mimi.decode(mimi.encode(f)) for f in frames]
            for a, b in zip(fresh, again):
                np.testing.assert_array_equal(a, b)
    finally:
        mimi.close()


def test_not_a_mimi_file(demo_dir, tmp_path):
    with pytest.raises(MimiError, match="not a Mimi checkpoint"):
        Mimi(demo_dir / "model.q4.safetensors").wait_ready()
    with pytest.raises(MimiError, match="no such file"):
        Mimi(tmp_path / "nope.safetensors")


@pytest.mark.slow  # waits for the deadline, then a fresh Mimi
@pytest.mark.parametrize("sig, message", [
    (signal.SIGSTOP, "stopped answering"), (signal.SIGKILL, "killed by signal 9")])
def test_a_child_that_hangs_or_dies_is_named_at_its_deadline_and_the_next_stream_works(
        mimi_path, sig, message):
    mimi = Mimi(mimi_path, reply_seconds=0.5)
    try:
        first = [mimi.decode(mimi.encode(noise(i))) for i in range(3)]
        (process,) = mimi.processes
        os.kill(process.pid, sig)
        start = time.monotonic()
        with pytest.raises(MimiError, match=message):
            mimi.encode(noise(3))
        assert time.monotonic() - start < 0.5 + 0.5
        assert process._process.wait(5) == -signal.SIGKILL
        with pytest.raises(MimiError, match=message):  # every later call says the same
            mimi.decode(np.zeros(8, np.int32))
        mimi.prepare_next()
        mimi.reset()
        again = [mimi.decode(mimi.encode(noise(i))) for i in range(3)]
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
    finally:
        mimi.close()


@pytest.mark.slow  # waits for the close deadline
def test_closing_a_hung_child_is_bounded(mimi_path):
    process = MimiProcess(str(mimi_path), 8, 8192)
    process.wait_ready()
    os.kill(process.pid, signal.SIGSTOP)
    start = time.monotonic()
    process.close()
    assert time.monotonic() - start < mimi_process.CLOSE_SECONDS + 1.0
    assert process._process.returncode == -signal.SIGKILL
    with pytest.raises(MimiError, match="closed"):
        process.encode_step(noise(0))


def test_a_child_that_hangs_while_loading_is_named(mimi_path, monkeypatch):
    monkeypatch.setattr(mimi_process, "LOAD_SECONDS", 0.5)
    process = MimiProcess(str(mimi_path), 8, 8192)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(MimiError, match="stopped answering .*load"):
            process.wait_ready()
    finally:
        process.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self"),
                    reason="reads the child's environment in /proc")
def test_the_child_keeps_the_apps_environment_and_the_standard_library_first(mimi_path):
    """The package's root is appended to the child's sys.path, never put in front of the standard
    library through PYTHONPATH (for an installed package, that root is site-packages)."""
    process = MimiProcess(str(mimi_path), 8, 8192)
    try:
        environ = open(f"/proc/{process.pid}/environ", "rb").read().split(b"\0")
        pythonpath = [v for v in environ if v.startswith(b"PYTHONPATH=")]
        expected = [f"PYTHONPATH={os.environ['PYTHONPATH']}".encode()] \
            if "PYTHONPATH" in os.environ else []
        assert pythonpath == expected
        process.wait_ready()
    finally:
        process.close()


def child_pss_mb(pid: int) -> float:
    rollup = open(f"/proc/{pid}/smaps_rollup").read()
    return int(next(line.split()[1] for line in rollup.splitlines()
                    if line.startswith("Pss:"))) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the child's memory in /proc")
def test_a_conversation_does_not_grow_the_child_beyond_its_weights(mimi_path):
    """Both directions at once from two threads, as live, for 8 s of audio: the child's memory
    (PSS) stays within 40 MB of what it holds once loaded (glibc's arenas kept ~190 MB more
    before the child returned freed memory to the system)."""
    mimi = Mimi(mimi_path)
    try:
        mimi.wait_ready()
        (process,) = mimi.processes
        loaded = peak = child_pss_mb(process.pid)
        codes = queue.Queue()

        def decode():
            while (frame := codes.get()) is not None:
                mimi.decode(frame)

        decoder = threading.Thread(target=decode)
        decoder.start()
        for i in range(100):
            codes.put(mimi.encode(noise(i)))
            time.sleep(0.02)  # the decoder's turn, as the live engine's stages take theirs
            peak = max(peak, child_pss_mb(process.pid))
        codes.put(None)
        decoder.join()
        assert peak - loaded < 40, (loaded, peak)
    finally:
        mimi.close()


def test_a_reply_already_there_is_read_past_its_deadline():
    """A Mimi prepared for the next stream long before that stream comes (a server's idle slot)
    has its "loaded" reply waiting past its load deadline: it is read, not taken as a hang."""
    read, write = os.pipe()
    try:
        os.write(write, mimi_process._LENGTH.pack(3) + b"abc")
        assert mimi_process._read(read, time.monotonic() - 1) == b"abc"
        with pytest.raises(mimi_process._Timeout):  # nothing there: the deadline holds
            mimi_process._read(read, time.monotonic() - 1)
    finally:
        os.close(read)
        os.close(write)
