"""Mimi in a process of its own: one `rustymimi.StreamTokenizer` serving both directions.

A StreamTokenizer holds one copy of Mimi's weights and encodes and decodes on two Rust threads of
its own, without the GIL: the user's frames and Moshi's are coded at the same time, for the memory
of one Mimi. It lives in a child process because rustymimi holds the GIL while it loads (about
0.3-0.5 s here): loaded in the app's process, the replacement Mimi that a long conversation needs
would stall every thread of that conversation for that long.

The child is started with `python -c` (it imports only NumPy, rustymimi and this module), in a
session of its own so that Ctrl-C in the terminal is the app's alone to handle, and ends when its
request pipes close (the app closed it, or ended, even abruptly). Each direction has its own pair
of pipes, so the encode and decode stages each wait only for their own reply. Messages: a 4-byte
length, then a kind byte and its data.

Every wait has a deadline: a reply that does not come within the process's `reply_seconds` means
the child hangs (stopped, starved, deadlocked): it is killed and `MimiError` says so; a Mimi that
does not load within `LOAD_SECONDS` likewise. Live, the deadline is `LIVE_REPLY_SECONDS`: a Mimi
that slow cannot hold a conversation, and the user must hear why at once. Offline (wav files,
tests) nobody waits on a frame, so a loaded machine gets `OFFLINE_REPLY_SECONDS`.
"""

import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .constants import FRAME_SIZE

LIVE_REPLY_SECONDS = 1.5  # a Mimi that codes no 80 ms frame in this long cannot hold a conversation
OFFLINE_REPLY_SECONDS = 60.0
LOAD_SECONDS = 60.0  # from the child's start to "loaded" (0.3-0.5 s on an idle machine)
CLOSE_SECONDS = 1.0  # a closed child that has not exited after this is killed
POLL_SECONDS = 0.0005  # the child's poll of StreamTokenizer's results (it has no blocking get)
WORKER_SECONDS = 1.0  # the child's own deadline on a StreamTokenizer result

_OK, _ERROR = b"k", b"!"  # replies: kind, then the data or the error message
# glibc keeps what rustymimi's threads free in per-thread arenas: a conversation grew the child
# by ~190 MB above its weights (BENCHMARKS.md, "Memory while talking"). Returning freed memory
# above 128 KiB at once keeps it at its weights' size, at no measured cost per frame. Other C
# libraries ignore the variable; a value in the user's environment wins.
_CHILD_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "131072"}

_LENGTH = struct.Struct("<I")
_SECONDS = struct.Struct("<f")  # a frame's reply starts with Mimi's own time on it
DIRECTIONS = ("encode", "decode")


class MimiError(Exception):
    """Mimi failed: its file is not a Mimi checkpoint (`not_mimi`), or its process hung or
    ended. The message says which, for the user."""

    def __init__(self, message: str, not_mimi: bool = False):
        super().__init__(message)
        self.not_mimi = not_mimi


class _Timeout(Exception):
    pass


def _write(fd: int, message: bytes) -> None:
    data = memoryview(_LENGTH.pack(len(message)) + message)
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    """`size` bytes from `fd`; EOFError when it closes first, _Timeout past `deadline`
    (time.monotonic(); None: no deadline)."""
    chunks, left = [], size
    while left:
        if deadline is not None:  # past it, a reply already there is still read
            wait = max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                raise _Timeout
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read(fd: int, deadline: float | None = None) -> bytes:
    (size,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size, deadline))
    return _read_exact(fd, size, deadline)


# --- the child ----------------------------------------------------------------------------------

def _serve_direction(tokenizer, direction: str, requests: int, replies: int) -> None:
    """Answers one direction's requests, one at a time, until its request pipe closes."""
    put, get = ((tokenizer.encode, tokenizer.get_encoded) if direction == "encode"
                else (tokenizer.decode, tokenizer.get_decoded))
    while True:
        try:
            data = _read(requests)
        except (EOFError, OSError):
            return
        try:
            start = time.perf_counter()
            if direction == "encode":
                put(np.frombuffer(data, np.float32).copy())
            else:
                put(np.frombuffer(data, np.uint32).reshape(1, -1).copy())
            deadline = time.monotonic() + WORKER_SECONDS
            while (result := get()) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Mimi's {direction}r gave no result in "
                                       f"{WORKER_SECONDS:g} s")
                time.sleep(POLL_SECONDS)
            seconds = _SECONDS.pack(time.perf_counter() - start)
            if direction == "encode":
                reply = _OK + seconds + np.asarray(result, np.uint32)[:, 0].tobytes()
            else:
                reply = _OK + seconds + np.asarray(result, np.float32).tobytes()
        except Exception as e:  # handed to the app, which raises it
            reply = _ERROR + f"{type(e).__name__}: {str(e).splitlines()[0]}".encode()
        try:
            _write(replies, reply)
        except OSError:  # the app is gone
            return


def serve(path: str, num_codebooks: int, max_seq_len: int, fds: list[int]) -> None:
    """The child: loads Mimi, says so on the encode direction's reply pipe, then serves both
    directions until their request pipes close. `fds`: encode requests, encode replies, decode
    requests, decode replies."""
    import rustymimi

    try:
        tokenizer = rustymimi.StreamTokenizer(path, num_codebooks=num_codebooks,
                                              max_seq_len=max_seq_len)
        ready = _OK
    except ValueError as e:
        tokenizer, ready = None, _ERROR + str(e).splitlines()[0].encode()
    try:
        _write(fds[1], ready)
    except OSError:
        return
    if tokenizer is None:
        return
    decoder = threading.Thread(target=_serve_direction,
                               args=(tokenizer, "decode", fds[2], fds[3]), daemon=True)
    decoder.start()
    _serve_direction(tokenizer, "encode", fds[0], fds[1])
    decoder.join()


def main(argv: list[str]) -> None:
    path, num_codebooks, max_seq_len, *fds = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the app alone handles Ctrl-C
    serve(path, int(num_codebooks), int(max_seq_len), [int(fd) for fd in fds])
    # rustymimi's threads wait on their channels and Python's teardown adds nothing: leave now,
    # quietly, whatever state the pipes are in.
    os._exit(0)


# Started with -c rather than -m: the package's root is *appended* to sys.path (a source checkout
# still works, and an installed package never puts site-packages before the standard library),
# and the current directory is not searched.
_BOOT = ("import sys; sys.path.pop(0); sys.path.append(sys.argv[1]); "
         "from moshi_mlx.audio.mimi_process import main; main(sys.argv[2:])")


# --- the app's side -----------------------------------------------------------------------------

class _Channel:
    """One direction's pipes, used by one thread at a time (its lock)."""

    def __init__(self, requests: int, replies: int):
        self.requests, self.replies = requests, replies
        self.lock = threading.Lock()


class MimiProcess:
    """Starts loading Mimi in a child process at once. Then `encode_step` and `decode_step`,
    one frame at a time each, the two possibly at the same time from two threads. Each waits
    for the child for at most `reply_seconds` (`LOAD_SECONDS` from the start for the load);
    past that the child is killed and `MimiError` raised."""

    def __init__(self, path: str, num_codebooks: int, max_seq_len: int,
                 reply_seconds: float = OFFLINE_REPLY_SECONDS):
        self.path = path
        self.reply_seconds = reply_seconds
        pipes = [os.pipe() for _ in range(4)]  # (read end, write end), in the child's order
        child_fds = [pipes[0][0], pipes[1][1], pipes[2][0], pipes[3][1]]
        root = str(Path(__file__).resolve().parents[2])
        self.started = time.monotonic()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, root, path, str(num_codebooks), str(max_seq_len),
                 *map(str, child_fds)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=child_fds,
                env={**_CHILD_MALLOC, **os.environ}, start_new_session=True)
        finally:
            for fd in child_fds:
                os.close(fd)
        self._channels = {"encode": _Channel(pipes[0][1], pipes[1][0]),
                          "decode": _Channel(pipes[2][1], pipes[3][0])}
        self._ready = False
        self._ready_lock = threading.Lock()
        self.work_seconds = dict.fromkeys(DIRECTIONS, 0.0)  # Mimi's own time on the last frame
        self._failure: str | None = None  # why the child can no longer be used
        self._closed = False

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def ready(self) -> bool:
        return self._ready

    def wait_ready(self, deadline: float | None = None) -> None:
        """Waits until Mimi is loaded: `MimiError` (`not_mimi`) if the file is not a Mimi
        checkpoint, or if the child ends or has not loaded by `deadline` (time.monotonic();
        default `LOAD_SECONDS` after its start)."""
        with self._ready_lock:
            if self._ready:
                return
            channel = self._channels["encode"]
            with channel.lock:
                self._reply(channel, deadline or self.started + LOAD_SECONDS, "load")
            self._ready = True

    def _fail(self, why: str) -> MimiError:
        """The child cannot be used any more: it is killed, and every later call raises."""
        if self._failure is None:
            self._failure = why
            self._kill()
        return MimiError(self._failure)

    def _kill(self) -> None:
        try:
            self._process.kill()  # a stopped process dies too
        except OSError:
            pass

    def _ended_message(self) -> str:
        try:
            code = self._process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            return "Mimi's process closed its pipe unexpectedly"
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return f"Mimi's process ended unexpectedly ({how})"

    def _reply(self, channel: _Channel, deadline: float, what: str) -> bytes:
        if self._failure is not None:
            raise MimiError(self._failure)
        try:
            reply = _read(channel.replies, deadline)
        except _Timeout:
            wait = ("load in time" if what == "load"
                    else f"{what} a frame within {self.reply_seconds:g} s")
            raise self._fail(f"Mimi's process stopped answering (it did not {wait})") from None
        except (EOFError, OSError, ValueError):
            raise self._fail(self._ended_message()) from None
        if reply[:1] == _ERROR:
            message = reply[1:].decode(errors="replace")
            if what == "load":
                self._failure = f"{self.path}: not a Mimi checkpoint ({message})"
                raise MimiError(self._failure, not_mimi=True)
            raise self._fail(f"Mimi failed to {what} a frame: {message}")
        return reply[1:]

    def _ask(self, direction: str, data: np.ndarray) -> bytes:
        self.wait_ready()
        channel = self._channels[direction]
        with channel.lock:
            if self._closed:
                raise MimiError("Mimi's process was closed")
            if self._failure is not None:
                raise MimiError(self._failure)
            try:
                _write(channel.requests, data.tobytes())
            except (OSError, ValueError):
                raise self._fail(self._ended_message()) from None
            reply = self._reply(channel, time.monotonic() + self.reply_seconds, direction)
        (self.work_seconds[direction],) = _SECONDS.unpack_from(reply)
        return reply[_SECONDS.size:]

    def encode_step(self, pcm: np.ndarray) -> np.ndarray:
        """float32 [FRAME_SIZE] -> codes uint32 [num_codebooks]."""
        pcm = np.ascontiguousarray(pcm, np.float32)
        if pcm.shape != (FRAME_SIZE,):
            raise ValueError(f"a frame is {FRAME_SIZE} samples, got shape {pcm.shape}")
        return np.frombuffer(self._ask("encode", pcm), np.uint32)

    def decode_step(self, codes: np.ndarray) -> np.ndarray:
        """codes [num_codebooks] -> float32 [FRAME_SIZE]."""
        return np.frombuffer(self._ask("decode", np.ascontiguousarray(codes, np.uint32)),
                             np.float32).copy()

    def close(self) -> None:
        """Ends the child: closes its request pipes (it then exits), kills it if it has not
        exited within `CLOSE_SECONDS` (a hung child), and waits for it. Idempotent; returns
        within about CLOSE_SECONDS + reply_seconds, whatever the child's state."""
        if self._closed:
            return
        self._closed = True
        for channel in self._channels.values():
            _close_fd(channel.requests)
        try:
            self._process.wait(timeout=CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
            self._process.wait()
        for channel in self._channels.values():
            # a reader in flight returns at once now that the child is gone (EOF)
            if channel.lock.acquire(timeout=self.reply_seconds):
                channel.lock.release()
            _close_fd(channel.replies)


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
