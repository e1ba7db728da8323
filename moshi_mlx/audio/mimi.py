"""Mimi, Kyutai's audio codec, one 80 ms frame at a time through `rustymimi`, for streams of any
length: `Mimi.encode` (the user's audio -> codes) and `Mimi.decode` (Moshi's codes -> audio), the
two possibly at the same time on two threads, served by one Mimi process (`audio.mimi_process`).
"""

import threading
import time
from pathlib import Path

import numpy as np

from .mimi_process import LOAD_SECONDS, OFFLINE_REPLY_SECONDS, MimiError, MimiProcess

POSITIONS_PER_FRAME = 2  # Mimi's transformers run at 25 Hz
SPARE_LEAD_FRAMES = 250  # the next process loads 20 s before it can be needed (a load: ~0.5 s)
QUIET_RMS = 3e-3  # about -50 dBFS


def is_quiet(pcm: np.ndarray) -> bool:
    return float(np.sqrt(np.mean(np.square(pcm)))) < QUIET_RMS


class Mimi:
    """Mimi's encoder and (unless `decoder=False`) decoder for one stream at a time, restarted
    before rustymimi's limit.

    rustymimi 0.4.1 keeps every position of Mimi's transformers (2 per frame) and fails once
    `max_seq_len` positions have been used (8192 by default: about 5.5 minutes), and its
    StreamTokenizer cannot be reset. So each direction moves to a freshly loaded Mimi process
    (which starts from silence), at a point that depends only on the audio, so that the live
    engine and the serial loop restart at the same frames:
    - the encoder at the first quiet input frame in the last quarter of the span, the decoder
      after the first quiet output frame there, or either at the span's end if the audio never
      pauses. The next process is loaded 20 s before that quarter (from half of the span on, for
      short spans), so a restart only swaps processes; the old one ends once both directions have
      left it. At most two processes exist at any time: the one in use and the next.
    - between streams: `prepare_next()` (when a stream ends) ends the used process and loads
      the next stream's in the background, and `reset()` takes it: every stream starts as on a
      fresh start.
    """

    def __init__(self, path: str | Path, num_codebooks: int = 8, max_seq_len: int = 8192,
                 decoder: bool = True, reply_seconds: float = OFFLINE_REPLY_SECONDS):
        """`reply_seconds`: how long a frame may take before Mimi's process is taken as hung
        (`mimi_process.LIVE_REPLY_SECONDS` in the live apps)."""
        path = Path(path)
        if not path.is_file():
            raise MimiError(f"{path}: no such file (Mimi's weights). Check the path, or "
                            "download the weights again.", not_mimi=True)
        self.path = path
        self.num_codebooks = num_codebooks
        self.max_seq_len = max_seq_len
        self.reply_seconds = reply_seconds
        self.directions = ("encode", "decode") if decoder else ("encode",)
        self.max_frames = max_seq_len // POSITIONS_PER_FRAME
        self.quiet_restart_after = self.max_frames * 3 // 4
        self.prepare_after = max(self.max_frames // 2,
                                 self.quiet_restart_after - SPARE_LEAD_FRAMES)
        self.restarts = 0
        self._work_seconds = dict.fromkeys(self.directions, 0.0)
        self._lock = threading.Lock()  # the processes and each direction's generation
        self._processes: dict[int, MimiProcess] = {}  # generation -> its process
        self._start_stream()
        self._last_quiet = True  # the decoder's last output

    def _start_stream(self) -> None:
        self._processes[0] = self._load()
        self._generation = dict.fromkeys(self.directions, 0)  # the process each direction uses
        self._frames = dict.fromkeys(self.directions, 0)  # frames it coded on that process
        self._last_quiet = True

    def _load(self) -> MimiProcess:
        """A Mimi process starting to load."""
        return MimiProcess(str(self.path), self.num_codebooks, self.max_seq_len,
                           self.reply_seconds)

    @property
    def processes(self) -> list[MimiProcess]:
        """The Mimi processes alive: the one in use and, at times, the next one."""
        with self._lock:
            return list(self._processes.values())

    @property
    def used(self) -> bool:
        return any(self._frames.values()) or any(self._generation.values())

    def wait_ready(self) -> None:
        """Waits until the current process has loaded (MimiError if it cannot)."""
        with self._lock:
            process = self._processes[min(self._generation.values())]
        process.wait_ready()

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        """pcm: float32 [FRAME_SIZE] at 24 kHz -> codes int32 [num_codebooks]."""
        pcm = np.asarray(pcm, dtype=np.float32)
        process = self._before_frame("encode", is_quiet(pcm))
        codes = process.encode_step(pcm).astype(np.int32)
        self._work_seconds["encode"] = process.work_seconds["encode"]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes: [num_codebooks] -> pcm float32 [FRAME_SIZE] at 24 kHz. Restarts happen after a
        quiet output frame."""
        process = self._before_frame("decode", self._last_quiet)
        pcm = process.decode_step(codes)
        self._work_seconds["decode"] = process.work_seconds["decode"]
        self._last_quiet = is_quiet(pcm)
        return pcm

    def work_seconds(self, direction: str) -> float:
        """Mimi's own time on `direction`'s last frame, in its process (the rest of a call is the
        exchange with that process). Call it from the thread that coded the frame."""
        return self._work_seconds[direction]

    def _before_frame(self, direction: str, quiet: bool) -> MimiProcess:
        """The process that codes `direction`'s next frame (a direction is used by one thread
        at a time)."""
        frames = self._frames[direction]
        if frames >= self.max_frames or (frames >= self.quiet_restart_after and quiet):
            return self._move_on(direction)
        if frames >= self.prepare_after:
            self.load_next()
        with self._lock:
            self._frames[direction] += 1
            return self._processes[self._generation[direction]]

    def load_next(self) -> None:
        """Starts loading the process the directions move to at their restart, unless one is
        already there (done from `prepare_after` frames on; also what a memory measure of the
        worst moment calls)."""
        with self._lock:
            if len(self._processes) == 1:
                self._processes[max(self._processes) + 1] = self._load()

    def _move_on(self, direction: str) -> MimiProcess:
        """`direction` moves to the next process (loading it if it is not yet); the previous
        one ends once no direction uses it."""
        with self._lock:
            generation = self._generation[direction] + 1
            if generation not in self._processes:
                self._processes[generation] = self._load()
                self.restarts += 1
            elif all(g < generation for d, g in self._generation.items() if d != direction):
                self.restarts += 1  # the first direction to move
            self._generation[direction] = generation
            self._frames[direction] = 1
            process = self._processes[generation]
            left = [g for g in self._processes if g < min(self._generation.values())]
            for g in left:  # its process ends on its own once its pipes close
                threading.Thread(target=self._processes.pop(g).close, daemon=True).start()
        # a next process loaded long ago and still not answering hangs
        process.wait_ready(max(time.monotonic() + self.reply_seconds,
                               process.started + LOAD_SECONDS))
        return process

    def prepare_next(self) -> None:
        """The stream has ended: ends the processes it used and loads the next stream's in the
        background."""
        if not self.used:
            return
        with self._lock:
            used, self._processes = list(self._processes.values()), {}
        for process in used:
            process.close()
        self._start_stream()

    def reset(self) -> None:
        """Starts a new stream on a Mimi never used (waits for the one being loaded)."""
        if not self._processes:  # closed
            self._start_stream()
        elif self.used:
            self.prepare_next()
        self.wait_ready()

    def close(self) -> None:
        """Ends every process of this Mimi."""
        with self._lock:
            processes, self._processes = list(self._processes.values()), {}
        for process in processes:
            process.close()
