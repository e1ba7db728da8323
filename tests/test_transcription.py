"""The STT service's streams (`engine.transcription`) without a model: words and their times from
text tokens (against the offline transcript's, timed as Kyutai's server times them), audio cut
into frames, markers."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FRAME, kyutai_asr_words

from moshi_mlx.engine import transcription
from moshi_mlx.engine.text import Transcript
from moshi_mlx.engine.transcription import (
    EndWord,
    Marker,
    Ready,
    Step,
    Stream,
    Transcriber,
    Word,
    WordEvents,
)

EPAD, PAD = 0, 3  # end of padding (a word starts at the next step), padding
PIECES = {5: "▁hel", 6: "lo", 7: "▁world", 8: "▁a", 9: "▁b", 10: "s", 11: "▁"}
DELAY_STEPS = 6  # Kyutai's server's asr_delay_in_tokens for stt-1b-en_fr


class Pieces:
    """A sentencepiece stand-in: the pieces of PIECES."""

    def id_to_piece(self, token: int) -> str:
        return PIECES.get(token, f"<{token}>")

    def decode(self, tokens: list[int]) -> str:
        text = "".join(self.id_to_piece(t) for t in tokens).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def events_of(tokens: list[int]) -> list:
    words = WordEvents(Pieces(), PAD, DELAY_STEPS)
    return [event for step, token in enumerate(tokens) for event in words.add(token, step)]


def kyutais(tokens: list[int]) -> list:
    """What Kyutai's server sends for the same tokens (conftest's `kyutai_asr_words`)."""
    return [Word(*e[1:]) if e[0] == "Word" else EndWord(*e[1:])
            for e in kyutai_asr_words(tokens, DELAY_STEPS, Pieces().decode)]


def offline_of(tokens: list[int]) -> list[tuple[str, float]]:
    """What `engine.offline` makes of the same tokens: its transcript's words, each at the
    step of its first piece minus the delay."""
    transcript = Transcript(12.5)
    for step, token in enumerate(tokens):
        if token not in (EPAD, PAD):
            transcript.add(PIECES[token].replace("▁", " "), step)
    return [(w.text, (w.frame - DELAY_STEPS) / 12.5) for w in transcript.words]


def t(step: int) -> float:
    """Kyutai's server's time of a step (from 0)."""
    return (step - DELAY_STEPS) / 12.5


def test_words_as_kyutais_models_write_them():
    """Padding, the end-of-padding token, a word's pieces, padding until the next word: each
    Word as soon as a padding token ends it, its EndWord at the end of padding announcing the
    next word; the offline transcript's words, at its times minus the delay."""
    tokens = [PAD] * 8 + [EPAD, 5, 6, PAD, PAD, EPAD, 7, PAD, PAD]
    assert events_of(tokens) == [Word("hello", t(9)), EndWord(t(14)), Word("world", t(14))]
    assert offline_of(tokens) == [("hello", t(9)), ("world", t(14))]


def test_pieces_join_until_padding_and_early_text_is_not_read():
    """As Kyutai's server: a word is every piece until padding (a piece with a space in it does
    not end it), a word after padding but no end of padding starts with the last one (the
    stream's start before any), no EndWord without an end of padding; the text of the steps
    before the delay is not read."""
    tokens = [8, 9, PAD, EPAD, 10] + [8, 11, 10, PAD, 5, PAD, 6, PAD, EPAD, 7, PAD]
    assert events_of(tokens) == [Word("a s", 0.0), Word("hel", 0.0), Word("lo", 0.0),
                                 EndWord(t(14)), Word("world", t(14))]


def test_random_tokens_give_kyutais_events():
    rng = np.random.default_rng(0)
    for _ in range(50):
        tokens = [int(x) for x in rng.choice([PAD, PAD, EPAD, 5, 6, 7, 8, 9, 10, 11], size=60)]
        assert events_of(tokens) == kyutais(tokens)


def test_kyutais_models_words_are_the_offline_ones():
    """Text as Kyutai's models write it (an end of padding right before each word, no padding
    inside one): the offline transcript's words, at its times minus the delay."""
    rng = np.random.default_rng(1)
    words = [[5, 6], [7], [8], [9, 10], [11, 10]]
    for _ in range(20):
        tokens = [PAD] * int(rng.integers(DELAY_STEPS, 12))
        for w in rng.integers(0, len(words), size=8):
            tokens += [EPAD] + words[w] + [PAD] * int(rng.integers(1, 4))
        # in steps; a word whose first piece is a lone '▁' starts offline at its next piece
        sent = [(e.text, round(e.start_time * 12.5)) for e in events_of(tokens)
                if isinstance(e, Word)]
        offline = [(text, round(time * 12.5) - (first == 11))
                   for (text, time), first in zip(offline_of(tokens), first_pieces(tokens))]
        assert sent == offline


def first_pieces(tokens: list[int]) -> list[int]:
    """The first token of each word (after each end of padding)."""
    return [tokens[i + 1] for i, token in enumerate(tokens) if token == EPAD]


def test_audio_is_cut_into_frames_and_markers_wait(monkeypatch):
    """Chunks of any length come out as frames in order; a marker is due after the frames taken,
    the whole ones waiting (as Kyutai's server) and the delay; Step, words, then markers."""
    events = []
    stream = Stream(0, events.append, WordEvents(Pieces(), PAD, DELAY_STEPS), marker_steps=7)
    audio = np.arange(5 * FRAME, dtype=np.float32)
    for chunk in np.split(audio, [100, 2000, 2001, 6000]):
        stream.add_audio(chunk)
    frames = [stream.take_frame() for _ in range(4)]
    np.testing.assert_array_equal(np.concatenate(frames), audio[:4 * FRAME])
    stream.add_audio(np.zeros(FRAME // 2, np.float32))
    stream.add_marker(9)  # 4 taken + 1 whole frame waiting -> 5, + 7
    for step in range(11):
        stream.stepped(PAD, np.array([0.25]), step_idx=step + 1)
    assert not any(isinstance(e, Marker) for e in events)
    stream.stepped(8, np.array([0.5]), step_idx=12)
    assert events[-2:] == [Step(12, [0.5], 1.5 * FRAME), Marker(9)]
    assert stream.take_frame() is not None and stream.take_frame() is None
    monkeypatch.setattr(transcription, "MAX_BUFFERED_SECONDS", 1.0)
    with pytest.raises(transcription.TooMuchAudio, match="more than 1 s of audio waiting"):
        stream.add_audio(np.zeros(24001, np.float32))


class Stepper:
    """A batched step's stand-in: one row, four voice-activity heads, always padding."""

    rows = 1
    num_user_codebooks = 2
    cfg = SimpleNamespace(extra_heads_num_heads=4, existing_text_padding_id=PAD)

    def reset_row(self, row: int) -> None:
        pass

    def step(self, codes: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array([PAD]), np.full((1, 4), 0.5, np.float32)


class Encoder:
    """A Mimi encoder's stand-in."""

    def reset(self) -> None:
        pass

    def encode(self, frame: np.ndarray) -> np.ndarray:
        return np.zeros(2, np.int64)

    def prepare_next(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_steps_are_counted_as_kyutais_server_counts_them():
    """Ready, then a Step per frame; the service's first step is step 3: Kyutai's server counts
    the two steps of its warm-up."""
    events = []
    transcriber = Transcriber(Stepper(), Pieces(), [Encoder()], DELAY_STEPS)
    try:
        stream = transcriber.open(0, events.append)
        stream.add_audio(np.zeros(2 * FRAME, np.float32))
        while transcriber.tick():
            pass
    finally:
        transcriber.close_all()
    assert events == [Ready(), Step(3, [0.5] * 4, FRAME), Step(4, [0.5] * 4, 0)]


class SlowEncoder(Encoder):
    """An encoder whose preparation for the next stream waits for `prepared`."""

    def __init__(self):
        self.prepared = threading.Event()
        self.preparing = threading.Event()

    def prepare_next(self) -> None:
        self.preparing.set()
        assert self.prepared.wait(10)


def test_a_slot_freed_takes_the_spare_at_once():
    """A stream that leaves frees its slot at once with the service's spare Mimi (loaded for the
    next stream: a client connecting again gets Ready without the ~0.6 s of a Mimi loading);
    the Mimi it used is prepared meanwhile and becomes the spare."""
    used, spare = SlowEncoder(), Encoder()
    transcriber = Transcriber(Stepper(), Pieces(), [used], DELAY_STEPS, spare=spare)
    try:
        stream = transcriber.open(0, lambda event: None)
        transcriber.tick()
        done = transcriber.close(stream)
        transcriber.tick()
        assert done.result(timeout=10) == 0 and used.preparing.wait(10)
        assert not used.prepared.is_set()  # the slot was free before its Mimi was prepared
        assert transcriber.mimis == [spare] and transcriber.spare is used
        used.prepared.set()
    finally:
        used.prepared.set()
        transcriber.close_all()

