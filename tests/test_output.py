"""Every write error is one `OutputFileError` naming the file and the reason, and leaves nothing
behind: a missing directory, a device, a full disk (writes backed by /dev/full). A read-only
directory: tests/test_run_inference.py."""

import json
import os
import stat
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.audio.wav import WavWriter, write_wav
from moshi_mlx.run_inference import write_outputs
from moshi_mlx.utils import output
from moshi_mlx.utils.output import OutputFileError, atomic_write, check_writable

DEV_FULL = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")


@pytest.fixture
def full_disk(monkeypatch):
    """Makes the temporary files of `atomic_write` for the names in the returned set write to
    /dev/full (the temporary file itself is still created, so its removal is checked)."""
    names = set()
    real = output._temporary_beside

    def temporary_beside(path):
        fd, tmp = real(path)
        if path.name in names:
            os.close(fd)
            fd = os.open(DEV_FULL, os.O_WRONLY)
        return fd, tmp

    monkeypatch.setattr(output, "_temporary_beside", temporary_beside)
    return names


def test_check_writable_refuses_what_cannot_be_a_new_file(tmp_path):
    with pytest.raises(OutputFileError, match="nowhere is not a directory"):
        check_writable(tmp_path / "nowhere" / "out.wav")
    with pytest.raises(OutputFileError, match="is a directory"):
        check_writable(tmp_path)
    check_writable(tmp_path / "out.wav")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_device_is_never_replaced(device):
    before = os.stat(device)
    with pytest.raises(OutputFileError, match=f"{device}: not a regular file"):
        check_writable(Path(device))
    assert stat.S_ISCHR(os.stat(device).st_mode) and os.stat(device).st_rdev == before.st_rdev


@needs_dev_full
def test_full_disk_in_atomic_write_and_write_wav(tmp_path, full_disk):
    full_disk.update({"out.bin", "out.wav"})
    with pytest.raises(OutputFileError, match=r"out.bin: cannot write \(No space left on device\)"):
        with atomic_write(tmp_path / "out.bin") as f:
            f.write(b"x" * 100_000)
    with pytest.raises(OutputFileError, match=r"out.wav: cannot write \(No space left"):
        write_wav(tmp_path / "out.wav", np.zeros(24000, np.float32), 24000)
    assert list(tmp_path.iterdir()) == []


@needs_dev_full
def test_recording_on_a_full_disk():
    """A recording opened by path: a write that fails is an error naming the recording."""
    with pytest.raises(OutputFileError, match=r"/dev/full: cannot write \(No space left"):
        WavWriter(DEV_FULL, 24000)


@needs_dev_full
@pytest.mark.parametrize("full", ["out.wav", "out.json"])
def test_run_inference_writes_both_outputs_or_neither(tmp_path, full_disk, full):
    args = Namespace(output=tmp_path / "out.wav", json=tmp_path / "out.json")
    full_disk.add(full)
    with pytest.raises(OutputFileError, match=f"{full}: cannot write"):
        write_outputs(args, np.zeros(2400, np.float32), {"text": "hello"})
    assert list(tmp_path.iterdir()) == []
    full_disk.clear()
    write_outputs(args, np.zeros(2400, np.float32), {"text": "hello"})
    assert json.loads(args.json.read_text()) == {"text": "hello"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.wav"]
