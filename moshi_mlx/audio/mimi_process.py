"""A `rustymimi.Tokenizer` in a process of its own.

rustymimi releases the GIL while it encodes or decodes, but not while it loads (about 0.3-0.5 s
for Mimi's 167 MB here): loaded in the app's process, a replacement Mimi would stall every thread
of the live conversation for that long. In a child process it loads while the conversation goes
on, and each frame costs one round trip over a pipe (well under a millisecond). The child is
started with "spawn" (never "fork": the parent runs MLX and other threads) and only imports
NumPy and rustymimi.
"""

import multiprocessing
import signal
from multiprocessing.connection import Connection

import numpy as np

from .constants import FRAME_SIZE

_ENCODE, _DECODE = b"e", b"d"  # requests: kind, then the data
_OK, _ERROR = b"k", b"!"  # replies: kind, then the data or the error message


class MimiProcessError(Exception):
    """The child failed: Mimi could not be loaded (`not_mimi`), or the process is gone."""

    def __init__(self, message: str, not_mimi: bool = False):
        super().__init__(message)
        self.not_mimi = not_mimi


def _serve(conn: Connection, path: str, num_codebooks: int, max_seq_len: int) -> None:
    """The child: loads Mimi, then answers one request at a time until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import rustymimi

    try:
        mimi = rustymimi.Tokenizer(path, num_codebooks=num_codebooks, max_seq_len=max_seq_len)
    except ValueError as e:
        conn.send_bytes(_ERROR + str(e).splitlines()[0].encode())
        return
    conn.send_bytes(_OK)
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        kind, data = request[:1], request[1:]
        try:
            if kind == _ENCODE:
                pcm = np.frombuffer(data, np.float32).reshape(1, 1, FRAME_SIZE)
                reply = _OK + mimi.encode_step(pcm)[0, :, 0].astype(np.uint32).tobytes()
            else:
                codes = np.frombuffer(data, np.uint32).reshape(1, -1, 1)
                reply = _OK + mimi.decode_step(codes)[0, 0].astype(np.float32).tobytes()
        except Exception as e:  # handed to the parent, which raises it
            reply = _ERROR + f"{type(e).__name__}: {str(e).splitlines()[0]}".encode()
        conn.send_bytes(reply)


class MimiProcess:
    """Starts loading Mimi in a child process at once; `wait_ready()` waits for it. Then
    `encode_step` and `decode_step` as rustymimi's, one frame at a time, from one thread at a
    time."""

    def __init__(self, path: str, num_codebooks: int, max_seq_len: int):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, name="mimi",
                                        args=(child, path, num_codebooks, max_seq_len),
                                        daemon=True)
        self._process.start()
        child.close()
        self._ready = False

    def wait_ready(self) -> None:
        if not self._ready:
            self._reply()
            self._ready = True

    def _reply(self) -> bytes:
        try:
            reply = self._conn.recv_bytes()
        except (EOFError, OSError):
            raise MimiProcessError("Mimi's process ended unexpectedly") from None
        if reply[:1] == _ERROR:
            raise MimiProcessError(reply[1:].decode(), not_mimi=not self._ready)
        return reply[1:]

    def _ask(self, kind: bytes, data: np.ndarray) -> bytes:
        self.wait_ready()
        try:
            self._conn.send_bytes(kind + data.tobytes())
        except OSError:
            raise MimiProcessError("Mimi's process ended unexpectedly") from None
        return self._reply()

    def encode_step(self, pcm: np.ndarray) -> np.ndarray:
        """float32 [FRAME_SIZE] -> codes uint32 [num_codebooks]."""
        return np.frombuffer(self._ask(_ENCODE, np.asarray(pcm, np.float32)), np.uint32)

    def decode_step(self, codes: np.ndarray) -> np.ndarray:
        """codes [num_codebooks] -> float32 [FRAME_SIZE]."""
        return np.frombuffer(self._ask(_DECODE, np.asarray(codes, np.uint32)), np.float32).copy()

    def close(self) -> None:
        self._conn.close()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
