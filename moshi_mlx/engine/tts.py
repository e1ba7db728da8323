"""Text to speech as a stream: words in (all at once or as they arrive), one 80 ms frame of
24 kHz audio out per step, with the times at which words start. The model's side is
`models.tts.TtsGen`; this adds the text tokenizer, the conditions and Mimi (the decoder, and
the encoder of a voice given as audio: `voice_prefix`)."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np
import sentencepiece

from ..audio.constants import FRAME_RATE, FRAME_SIZE
from ..audio.mimi import Mimi
from ..models import Lm
from ..models.tts import TtsGen, TtsSettings, TtsStep, VoiceError, speaker_condition, tts_condition
from ..models.tts_script import NoWords, script_to_entries
from ..utils.sampling import Sampler


@dataclass(frozen=True)
class TtsOptions:
    """Kyutai's TTS knobs (run_tts's flags): codebooks `n_q` (None: all), the `cfg` value of a
    cfg-distilled model (a string of its `cfg` conditioner, e.g. "2.0"; None: none), the
    classifier-free guidance `cfg_coef` of a model that is not (1: none; else two rows a step),
    and the state machine's paddings in steps of 80 ms, `padding_bonus` on the pad logit;
    `max_break_seconds` caps a `<break>` (None: no cap; Kyutai's server caps at 10 s)."""

    n_q: int | None = None
    cfg_value: str | None = "2.0"
    max_padding: int = 8
    initial_padding: int = 2
    final_padding: int = 4
    padding_between: int = 1
    padding_bonus: float = 0.0
    cfg_coef: float = 1.0
    max_break_seconds: float | None = None


PREFIX_TRIM = 2  # frames dropped at the end of an encoded voice (PyTorch moshi's TTS does so)


def voice_prefix(mimi: Mimi, pcm: np.ndarray) -> np.ndarray:
    """A voice given as audio (float32 [samples] at 24 kHz) -> the prefix of a model without
    speaker conditioning: its Mimi codes int32 [codebooks, frames], the last partial frame
    padded with silence and the last `PREFIX_TRIM` frames dropped, as Kyutai's TTS does. Mimi
    encodes frame by frame (causal: as at once). Raises VoiceError for audio too short."""
    frames = -(-len(pcm) // FRAME_SIZE)
    if frames <= PREFIX_TRIM:
        raise VoiceError(f"the voice's audio is too short ({len(pcm) / FRAME_SIZE / FRAME_RATE:.2f}"
                         f" s): it needs more than {PREFIX_TRIM / FRAME_RATE:.2f} s")
    pcm = np.pad(np.asarray(pcm, np.float32), (0, frames * FRAME_SIZE - len(pcm)))
    codes = [mimi.encode(frame) for frame in pcm.reshape(frames, FRAME_SIZE)]
    return np.stack(codes[:-PREFIX_TRIM], axis=1)


def tts_samplers(temp: float) -> tuple[Sampler, Sampler]:
    """PyTorch moshi's TTS sampling: (text, audio) at `temp` with top-k 25 and 250."""
    return Sampler(temp=temp, top_k=25), Sampler(temp=temp, top_k=250)


@dataclass
class SpokenStep:
    """One step of a `TtsStream`: `pcm` float32 [1920] at 24 kHz once the audio has started
    (None before), the model's `step` (`words`: (word, seconds) that started at it)."""

    step: TtsStep
    pcm: np.ndarray | None = None
    words: list[tuple[str, float]] = field(default_factory=list)


class TtsStream:
    """One generation with a loaded TTS model: `push_text` (a turn's text, as it arrives),
    `end()`, then `step()` until `done`; each step decodes the frame it completes.

    `voices`: speaker embeddings (`speaker_wavs` [1, 512, T] each; main speaker first), for a
    model with speaker conditioning. Turns alternate speakers as in Kyutai's scripts; text
    pushed with `new_turn=False` continues the current turn. `prefix`: for a model without
    speaker conditioning, a voice as Mimi codes [n_q, P] (`voice_prefix`): the speech goes on
    from it (its P frames are decoded, not output; word times count from the speech).
    `seed`: the stream's own random key (`TtsGen`); None: MLX's global random state.
    """

    def __init__(self, model: Lm, tokenizer: sentencepiece.SentencePieceProcessor,
                 mimi_weight, voices: list[mx.array], samplers: tuple[Sampler, Sampler],
                 options: TtsOptions = TtsOptions(), mimi: Mimi | None = None,
                 prefix: np.ndarray | None = None, seed: int | None = None):
        """`mimi`: a decoder of `n_q` codebooks at the start of a stream, owned by the caller
        (a server's slot); None: the stream loads its own and `close()` ends it."""
        cfg = model.cfg
        self.settings = TtsSettings.of(cfg, FRAME_RATE)
        self.options = options
        self.tokenizer = tokenizer
        machine = self.settings.machine(cfg.text_card, options.max_padding,
                                        options.initial_padding)
        values = {}
        provider = model.condition_provider
        names = set(provider.conditioners) if provider is not None else set()
        if "control" in names:
            values["control"] = "ok"
        if "cfg" in names:
            values["cfg"] = options.cfg_value
        if self.settings.multi_speaker:
            values["speaker_wavs"] = speaker_condition(voices, self.settings.max_speakers)
        elif voices:
            raise VoiceError("this model takes no speaker embeddings (no 'speaker_wavs' "
                             "conditioner): its voice is audio spoken before the text")
        condition = tts_condition(provider, values, options.cfg_coef)
        self.gen = TtsGen(model, machine, condition, self.settings.delay_steps, *samplers,
                          n_q=options.n_q, padding_bonus=options.padding_bonus,
                          final_padding=options.final_padding, cfg_coef=options.cfg_coef,
                          prefix=prefix, seed=seed)
        self._own_mimi = mimi is None
        self.mimi = Mimi(mimi_weight, num_codebooks=self.gen.codebooks) if mimi is None else mimi
        self.turn = -1

    def push_text(self, text: str, new_turn: bool = True) -> int:
        """Queues `text` (words, `<break time="1s"/>`) -> the number of words. Raises
        `ScriptError` for a text that cannot be spoken (`NoWords` when nothing is in it, a bad
        break)."""
        if new_turn:
            self.turn += 1
        turns = [""] * max(self.turn, 0) + [text]
        entries = script_to_entries(
            self.tokenizer.encode, self.gen.machine.token_ids, FRAME_RATE, turns,
            self.settings.multi_speaker and new_turn, self.options.padding_between,
            self.options.max_break_seconds)
        if not entries:
            raise NoWords("nothing to say: the text has no words")
        self.gen.push_words(entries)
        return len(entries)

    def end(self) -> None:
        self.gen.end()

    @property
    def done(self) -> bool:
        return self.gen.done

    def step(self) -> SpokenStep:
        return self.speak(self.gen.step())

    def spoken_steps(self) -> Iterator[SpokenStep]:
        """`step()` until `done`, each step yielded once spoken; Mimi decodes a step's frame
        (in its process, waited on by a thread) while the model makes the next one."""
        with ThreadPoolExecutor(1, thread_name_prefix="mimi-decode") as decoder:
            pending = None
            while not self.done:
                s = self.gen.step()
                if s.frame is not None:  # read here: MLX stays on the model's thread
                    s = replace(s, frame=np.array(s.frame))
                if pending is not None:
                    yield pending.result()
                pending = decoder.submit(self.speak, s)
            if pending is not None:
                yield pending.result()

    def speak(self, s: TtsStep) -> SpokenStep:
        """A step of the model (`gen.step()`, or a batched step of `gen`'s) -> it spoken: the
        frame it completed decoded by Mimi, its words timed."""
        start = self.gen.prefix_steps  # the speech's first step
        out = SpokenStep(s, words=[(w, (t - start) / FRAME_RATE) for w, t in s.words])
        if s.frame is not None and s.frame_index >= self.settings.delay_steps:
            codes = np.array(s.frame[1:], dtype=np.int32)
            pcm = np.clip(self.mimi.decode(codes), -1, 1).reshape(FRAME_SIZE)
            if s.frame_index >= self.settings.delay_steps + start:
                out.pcm = pcm
        return out

    def close(self) -> None:
        if self._own_mimi:
            self.mimi.close()
