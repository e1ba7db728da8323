"""The offline loop's plans (padding, trim, end of input, tail, word times) on a scripted
conversation: what each step was fed and what is kept, counted by hand."""

from types import SimpleNamespace

import numpy as np

from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.engine.conversation import Frame
from moshi_mlx.engine.offline import Plan, run

EOS = 99
END_OF_INPUT = np.array([7, 7], np.int32)


class Scripted:
    """Stands in for a `Conversation`: step k gives `tokens[k]` (text " wk", none for token 0)
    and, from step 1 on when `voiced`, a voice frame filled with k."""

    def __init__(self, tokens: list[int], voiced: bool = True):
        self.tokens = tokens
        self.voiced = voiced
        self.fed: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.text_tokenizer = SimpleNamespace(eos_id=lambda: EOS)

    def end_of_input_codes(self) -> np.ndarray:
        return END_OF_INPUT

    def step(self, user: np.ndarray, codes: np.ndarray | None = None) -> Frame:
        k = len(self.fed)
        self.fed.append((user.copy(), codes))
        token = self.tokens[k]
        voice = np.full(FRAME_SIZE, k, np.float32) if self.voiced and k >= 1 else None
        return Frame(k, 0.0, user, codes, token, f" w{k}" if token else None, voice=voice)


def ramp(samples: int) -> np.ndarray:
    return np.arange(1, samples + 1, dtype=np.float32)


def test_moshi_answers_for_as_long_as_the_input():
    """2.5 frames then one frame of silence for the codebook delay: 4 steps; text only of the
    3 steps holding input, voice (from step 1) cut to the input's 4800 samples."""
    pcm = ramp(4800)
    conversation = Scripted([5, 6, 0, 8])
    pieces, seen = [], []
    result = run(conversation, pcm, Plan(after=FRAME_SIZE, trim=True), on_text=pieces.append,
                 on_frame=seen.append)
    fed = np.concatenate([user for user, _ in conversation.fed])
    np.testing.assert_array_equal(fed, np.concatenate([pcm, np.zeros(3 * 1920 - 4800 + 1920)]))
    assert [codes for _, codes in conversation.fed] == [None] * 4
    assert seen == result.frames and [f.token for f in seen] == [5, 6, 0, 8]
    assert pieces == [" w0", " w1"] and result.transcript.text == "w0 w1"
    expected = np.repeat(np.arange(1, 4, dtype=np.float32), FRAME_SIZE)[:4800]
    np.testing.assert_array_equal(result.voice, expected)


def test_stt_pads_both_sides_and_times_words_in_the_input():
    """960 samples of silence before, 1920 after: ceil(7680 / 1920) = 4 steps; a word at step k
    is at k * 0.08 - 0.1 s of the input (0 at the least); every step's text is kept."""
    pcm = ramp(4800)
    conversation = Scripted([5, 6, 7, 8], voiced=False)
    result = run(conversation, pcm, Plan(before=960, after=1920, time_offset=0.1))
    fed = np.concatenate([user for user, _ in conversation.fed])
    np.testing.assert_array_equal(fed, np.concatenate([np.zeros(960), pcm, np.zeros(1920)]))
    assert [(w.text, w.frame, w.time) for w in result.transcript.words] == [
        ("w0", 0, 0.0), ("w1", 1, 0.0), ("w2", 2, 0.06), ("w3", 3, 0.14)]
    assert result.voice is None


def test_hibiki_steps_on_the_end_of_input_then_until_its_text_ends():
    """3 input steps (an end of text among them does not count), the end-of-input codes on
    silence, then silence until the step whose token is the end of text."""
    pcm = ramp(3 * FRAME_SIZE)
    conversation = Scripted([1, EOS, 3, 4, 5, EOS, 6, 7])
    result = run(conversation, pcm, Plan(end_of_input=True, tail_steps=5))
    assert [f.token for f in result.frames] == [1, EOS, 3, 4, 5, EOS]
    users, codes = zip(*conversation.fed)
    assert [c is END_OF_INPUT for c in codes] == [False, False, False, True, False, False]
    np.testing.assert_array_equal(np.concatenate(users[:3]), pcm)
    assert not np.concatenate(users[3:]).any()
    assert result.voice.shape == (5 * FRAME_SIZE,)  # every step's voice, none cut


def test_the_tail_has_a_limit_and_may_be_empty():
    pcm = ramp(FRAME_SIZE)
    endless = run(Scripted([1] * 10), pcm, Plan(end_of_input=True, tail_steps=4))
    assert len(endless.frames) == 1 + 1 + 4
    at_once = run(Scripted([1, EOS, 2, 3]), pcm, Plan(end_of_input=True, tail_steps=4))
    assert [f.token for f in at_once.frames] == [1, EOS]


def test_plan_steps_count_whole_frames():
    assert Plan().steps(1) == 1
    assert Plan().steps(FRAME_SIZE) == 1
    assert Plan(after=FRAME_SIZE).steps(FRAME_SIZE + 1) == 3
    assert Plan(before=960, after=1920, end_of_input=True).steps(4800) == 5
