"""A `rustymimi.Tokenizer` in a process of its own.

rustymimi releases the GIL while it encodes or decodes, but not while it loads (about 0.3-0.5 s
for Mimi's 167 MB here): loaded in the app's process, a replacement Mimi would stall every thread
of the live conversation for that long. In a child process it loads while the conversation goes
on, and each frame costs one round trip over a pipe (well under a millisecond).

The child is `python -m moshi_mlx.audio.mimi_process` (it imports only NumPy and rustymimi),
in a session of its own so that Ctrl-C in the terminal is the app's alone to handle; it ends when
its pipe closes (the app ended, even abruptly). Messages on the pipes: a 4-byte length, then a
kind byte and its data.
"""

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .constants import FRAME_SIZE

_ENCODE, _DECODE = b"e", b"d"  # requests: kind, then the data
_OK, _ERROR = b"k", b"!"  # replies: kind, then the data or the error message
_LENGTH = struct.Struct("<I")


class MimiProcessError(Exception):
    """The child failed: Mimi could not be loaded (`not_mimi`), or the process is gone."""

    def __init__(self, message: str, not_mimi: bool = False):
        super().__init__(message)
        self.not_mimi = not_mimi


def _write(pipe: BinaryIO, message: bytes) -> None:
    pipe.write(_LENGTH.pack(len(message)) + message)
    pipe.flush()


def _read(pipe: BinaryIO) -> bytes:
    """The next message; EOFError when the pipe is closed."""
    header = pipe.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError
    message = pipe.read(_LENGTH.unpack(header)[0])
    if len(message) < _LENGTH.unpack(header)[0]:
        raise EOFError
    return message


def serve(path: str, num_codebooks: int, max_seq_len: int, requests: BinaryIO,
          replies: BinaryIO) -> None:
    """The child: loads Mimi, then answers one request at a time until `requests` closes."""
    import rustymimi

    try:
        mimi = rustymimi.Tokenizer(path, num_codebooks=num_codebooks, max_seq_len=max_seq_len)
    except ValueError as e:
        _write(replies, _ERROR + str(e).splitlines()[0].encode())
        return
    _write(replies, _OK)
    while True:
        try:
            request = _read(requests)
        except EOFError:
            return
        kind, data = request[:1], request[1:]
        try:
            if kind == _ENCODE:
                pcm = np.frombuffer(data, np.float32).reshape(1, 1, FRAME_SIZE)
                reply = _OK + mimi.encode_step(pcm)[0, :, 0].astype(np.uint32).tobytes()
            else:
                codes = np.frombuffer(data, np.uint32).reshape(1, -1, 1)
                reply = _OK + mimi.decode_step(codes)[0, 0].astype(np.float32).tobytes()
        except Exception as e:  # handed to the app, which raises it
            reply = _ERROR + f"{type(e).__name__}: {str(e).splitlines()[0]}".encode()
        _write(replies, reply)


class MimiProcess:
    """Starts loading Mimi in a child process at once; `wait_ready()` waits for it. Then
    `encode_step` and `decode_step` as rustymimi's, one frame at a time, from one thread at a
    time."""

    def __init__(self, path: str, num_codebooks: int, max_seq_len: int):
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                          env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, path, str(num_codebooks), str(max_seq_len)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
        self._ready = False

    def wait_ready(self) -> None:
        if not self._ready:
            self._reply()
            self._ready = True

    def _reply(self) -> bytes:
        try:
            reply = _read(self._process.stdout)
        except (EOFError, OSError, ValueError):
            raise MimiProcessError("Mimi's process ended unexpectedly") from None
        if reply[:1] == _ERROR:
            raise MimiProcessError(reply[1:].decode(), not_mimi=not self._ready)
        return reply[1:]

    def _ask(self, kind: bytes, data: np.ndarray) -> bytes:
        self.wait_ready()
        try:
            _write(self._process.stdin, kind + data.tobytes())
        except (OSError, ValueError):
            raise MimiProcessError("Mimi's process ended unexpectedly") from None
        return self._reply()

    def encode_step(self, pcm: np.ndarray) -> np.ndarray:
        """float32 [FRAME_SIZE] -> codes uint32 [num_codebooks]."""
        return np.frombuffer(self._ask(_ENCODE, np.asarray(pcm, np.float32)), np.uint32)

    def decode_step(self, codes: np.ndarray) -> np.ndarray:
        """codes [num_codebooks] -> float32 [FRAME_SIZE]."""
        return np.frombuffer(self._ask(_DECODE, np.asarray(codes, np.uint32)), np.float32).copy()

    def close(self) -> None:
        """Closes the pipes (the child then ends) and waits for the child."""
        for pipe in (self._process.stdin, self._process.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


if __name__ == "__main__":
    path, num_codebooks, max_seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything printed goes to stderr
    serve(path, num_codebooks, max_seq_len, sys.stdin.buffer, replies)
