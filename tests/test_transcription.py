"""The STT service's streams (`engine.transcription`) without a model: words and their times from
text tokens (against the offline transcript's), audio cut into frames, markers."""

import numpy as np
import pytest
from conftest import FRAME

from moshi_mlx.engine import transcription
from moshi_mlx.engine.text import Transcript
from moshi_mlx.engine.transcription import EndWord, Marker, Step, Stream, Word, WordEvents

EPAD, PAD = 0, 3  # end of padding (a word starts at the next step), padding
PIECES = {5: "▁hel", 6: "lo", 7: "▁world", 8: "▁a", 9: "▁b", 10: "s", 11: "▁"}
DELAY = 0.5


class Pieces:
    """A sentencepiece stand-in: the pieces of PIECES."""

    def id_to_piece(self, token: int) -> str:
        return PIECES.get(token, f"<{token}>")


def events_of(tokens: list[int]) -> list:
    words = WordEvents(Pieces(), PAD, DELAY)
    return [event for step, token in enumerate(tokens) for event in words.add(token, step)]


def offline_of(tokens: list[int]) -> list[tuple[str, float]]:
    """What `engine.offline` makes of the same tokens: its transcript's words and times."""
    transcript = Transcript(12.5)
    for step, token in enumerate(tokens):
        if token not in (EPAD, PAD):
            transcript.add(PIECES[token].replace("▁", " "), step)
    return [(w.text, max(0.0, round(w.time - DELAY, 3))) for w in transcript.words]


def t(step: int) -> float:
    return round(step / 12.5 - DELAY, 3)


def test_words_as_kyutais_models_write_them():
    """Padding, the end-of-padding token, a word's pieces, padding until the next word: each
    Word as soon as a padding token ends it, its EndWord at the end of padding announcing the
    next word, times as the offline transcript's."""
    tokens = [PAD] * 8 + [EPAD, 5, 6, PAD, PAD, EPAD, 7, PAD, PAD]
    assert events_of(tokens) == [Word("hello", t(9)), EndWord(t(14)), Word("world", t(14))]
    assert offline_of(tokens) == [("hello", t(9)), ("world", t(14))]


def test_a_word_ends_when_the_next_starts():
    tokens = [PAD] * 7 + [8, 9, 10, PAD]
    assert events_of(tokens) == [Word("a", t(7)), EndWord(t(8)), Word("bs", t(8))]
    assert offline_of(tokens) == [("a", t(7)), ("bs", t(8))]


def test_a_lone_space_piece_and_early_words():
    """A '▁' piece alone starts the next word, as offline; words in the first steps are at 0."""
    tokens = [8, 11, 10, PAD]
    assert events_of(tokens) == [Word("a", 0.0), EndWord(0.0), Word("s", 0.0)]
    assert [w for w, _ in offline_of(tokens)] == ["a", "s"]


def test_padding_inside_a_word_ends_it():
    """As Kyutai's server: the offline transcript would join 'hel' and 'lo' (no model of
    Kyutai's pads inside a word)."""
    assert events_of([PAD] * 7 + [5, PAD, 6, PAD]) == [
        Word("hel", t(7)), EndWord(t(9)), Word("lo", t(9))]


def test_random_tokens_give_the_offline_words():
    rng = np.random.default_rng(0)
    for _ in range(20):
        tokens = [PAD]
        for token in rng.choice([PAD, PAD, EPAD, 5, 6, 7, 8, 9, 10], size=60):
            no_space = token in (6, 10)  # no padding inside a word
            tokens.append(PAD if no_space and tokens[-1] in (EPAD, PAD) else int(token))
        sent = [(e.text, e.start_time) for e in events_of(tokens + [PAD]) if isinstance(e, Word)]
        assert sent == offline_of(tokens)


def test_audio_is_cut_into_frames_and_markers_wait(monkeypatch):
    """Chunks of any length come out as frames in order; a marker is due after the frames taken,
    those waiting (a partial one counted) and the delay; Step, words, then markers."""
    events = []
    stream = Stream(0, events.append, WordEvents(Pieces(), PAD, DELAY), marker_steps=7)
    audio = np.arange(5 * FRAME, dtype=np.float32)
    for chunk in np.split(audio, [100, 2000, 2001, 6000]):
        stream.add_audio(chunk)
    frames = [stream.take_frame() for _ in range(4)]
    np.testing.assert_array_equal(np.concatenate(frames), audio[:4 * FRAME])
    stream.add_audio(np.zeros(FRAME // 2, np.float32))
    stream.add_marker(9)  # 4 taken + 1.5 waiting -> 6, + 7
    for step in range(12):
        stream.stepped(PAD, np.array([0.25]), step_idx=step + 1)
    assert not any(isinstance(e, Marker) for e in events)
    stream.stepped(8, np.array([0.5]), step_idx=13)
    assert events[-2:] == [Step(13, [0.5], 1.5 * FRAME), Marker(9)]
    assert stream.take_frame() is not None and stream.take_frame() is None
    monkeypatch.setattr(transcription, "MAX_BUFFERED_SECONDS", 1.0)
    with pytest.raises(transcription.TooMuchAudio, match="more than 1 s of audio waiting"):
        stream.add_audio(np.zeros(24001, np.float32))
