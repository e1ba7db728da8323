"""Kyutai's text-to-speech on the Moshi language model: a generation session that takes words
(all at once or as they arrive) and yields, step by step (80 ms), the frame of Mimi codes made
and the words that started.

The model chooses on its text stream only "a new word starts" or "pad"; the state machine
(`tts_script.StateMachine`) feeds each word's tokens, and the audio runs `delay_steps` behind
the text (1.28 s for Kyutai's models). The speakers are a condition that every temporal layer
cross-attends to (`speaker_condition`); `cfg` and `control` are summed conditions. A model
without speaker conditioning (kyutai/tts-0.75b-en-public) takes its voice as an audio prefix:
Mimi codes forced as its first frames. A model that is not cfg-distilled (no `cfg` condition)
takes classifier-free guidance: a second, unconditioned row (`tts_condition`).
"""

from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx

from ..utils.sampling import Sampler
from .conditioner import ConditionProvider, ConditionTensor
from .generate import LmGen
from .lm import ZERO_TOKEN, Lm
from .tts_script import Entry, StateMachine, TokenIds

MAX_SPEAKERS = 5  # speaker slots of Kyutai's TTS models (tts_config may say otherwise)
SPEAKER_KEY = "speaker_wavs"  # the conditioner and the voice files' tensor


class VoiceError(ValueError):
    """A voice embedding that the model cannot take; the message names it."""


@dataclass(frozen=True)
class TtsSettings:
    """What Kyutai's TTS reads from a model's config: `delay_steps` of audio behind the text,
    `second_stream_ahead` (lookahead words), `max_speakers`, and whether the model takes
    speaker embeddings (`multi_speaker`; else a voice is an audio prefix) and a `cfg` value."""

    delay_steps: int
    second_stream_ahead: int
    max_speakers: int
    multi_speaker: bool
    cfg_values: tuple[str, ...]

    @classmethod
    def of(cls, cfg, frame_rate: float = 12.5) -> "TtsSettings":
        tts = cfg.tts_config or {}
        cfg_lut = cfg.conditioners.get("cfg", {}).get("lut", {})
        return cls(
            delay_steps=int(tts.get("audio_delay", 0) * frame_rate),
            second_stream_ahead=int(tts.get("second_stream_ahead", 0)),
            max_speakers=int(tts.get("max_speakers", MAX_SPEAKERS)),
            multi_speaker=SPEAKER_KEY in cfg.cross_conditioners,
            cfg_values=tuple(cfg_lut.get("possible_values", ())),
        )

    def machine(self, text_card: int, max_padding: int = 8,
                initial_padding: int = 2) -> StateMachine:
        return StateMachine(TokenIds(text_card + 1), self.second_stream_ahead, max_padding,
                            initial_padding)


def speaker_condition(voices: list[mx.array], max_speakers: int = MAX_SPEAKERS
                      ) -> tuple[mx.array, mx.array]:
    """Voice embeddings (each `speaker_wavs` [1, 512, T] of a voice file) -> the speaker
    condition's value: tensor [1, max_speakers * T, 512] (speaker i in slot i, the others
    zero) and mask [1, max_speakers * T], False on empty slots (they get the learnt padding).
    Raises VoiceError for too many voices or a voice of another shape."""
    if not voices:
        raise VoiceError("no voice given: this model needs at least one speaker embedding")
    if len(voices) > max_speakers:
        raise VoiceError(f"{len(voices)} voices given, the model takes at most {max_speakers}")
    shape = tuple(voices[0].shape)
    for i, v in enumerate(voices):
        if v.ndim != 3 or v.shape[0] != 1 or tuple(v.shape) != shape:
            raise VoiceError(f"voice {i + 1} has shape {list(v.shape)}: every voice must be "
                             f"[1, channels, frames] like the first, {list(shape)}")
    _, channels, frames = shape
    slots = [v[0].T.astype(mx.float32) for v in voices]
    slots += [mx.zeros((frames, channels))] * (max_speakers - len(voices))
    mask = mx.arange(max_speakers * frames) < len(voices) * frames
    return mx.concatenate(slots)[None], mask[None]


def tts_condition(provider: ConditionProvider, values: dict, cfg_coef: float = 1.0
                  ) -> ConditionTensor:
    """The condition of a generation (`provider.condition(values)`), with classifier-free
    guidance (`cfg_coef` != 1) followed by the unconditioned row (every condition dropped), as
    `TtsGen` takes it. Raises ValueError for guidance on a cfg-distilled model (one with a `cfg`
    condition: give that a value instead, as PyTorch moshi's TTSModel requires)."""
    cond = provider.condition(values)
    if cfg_coef == 1:
        return cond
    if "cfg" in provider.conditioners:
        raise ValueError("this model is cfg-distilled: give its 'cfg' condition a value "
                         "instead of classifier-free guidance")
    null = provider.unconditioned(values)
    return ConditionTensor(*(None if a is None else mx.concatenate([a, b])
                             for a, b in ((cond.tensor, null.tensor), (cond.cross, null.cross))))


@dataclass
class TtsStep:
    """What one step made. `frame`: the frame of codes completed at this step, [1 + n_q] int32
    (the fed text token, then the audio codes), None for the first `max_delay` steps;
    `frame_index` its position (frame f holds the speech of text step f - delay_steps: frames
    before `delay_steps` are silence, not audio to decode); `sampled`: the model's text choice;
    `fed`: the text token fed next (the state machine's); `words`: (word, step) started now."""

    step: int
    sampled: int
    fed: int
    frame: mx.array | None = None
    frame_index: int = -1
    words: list[tuple[str, int]] = field(default_factory=list)


class TtsGen(LmGen):
    """One TTS generation, one `step()` per 80 ms.

    Words come with `push_words` (all before the first step, or as they arrive) and `end()`
    says no more will come; `done` is true once the last word has been spoken and the audio,
    `delay_steps` behind, has caught up plus `final_padding` steps. `n_q` codebooks are
    generated (the others fed as nothing), `padding_bonus` is added to the pad token's logit
    (positive: slower speech). Greedy samplers reproduce PyTorch `moshi`'s TTSModel exactly.

    `prefix`: a voice as audio, int32 [n_q or more, P] Mimi codes (frame p in column p), forced
    as the first P frames (text steps 0..P-1: the text fed is nothing, the state machine starts
    at step P; frame p is made at step `delay_steps + p`, each codebook its delay later).
    `cfg_coef` != 1: classifier-free guidance, as Kyutai's TTS does it (PyTorch moshi's
    `cfg_is_no_text` and `cfg_is_no_prefix`): `condition` has a second, unconditioned row
    (`tts_condition`) fed no text and none of the prefix; the text choice is the conditioned
    row's, the depformer samples each codebook from `uncond + cfg_coef * (cond - uncond)`.
    `seed`: the stream draws from a random key of its own, split once a step (its draws are
    the same whatever else runs, alone or batched); None: from MLX's global random state.
    """

    def __init__(self, model: Lm, machine: StateMachine, condition: ConditionTensor,
                 delay_steps: int, text_sampler: Sampler | None = None,
                 audio_sampler: Sampler | None = None, n_q: int | None = None,
                 padding_bonus: float = 0.0, final_padding: int = 4, compile: bool = True,
                 context: int | None = None, kv_bits: int | None = None,
                 cfg_coef: float = 1.0, prefix: mx.array | None = None,
                 seed: int | None = None):
        cfg = model.cfg
        if cfg.num_user_codebooks:
            raise ValueError("not a TTS model: it takes an input audio stream "
                             f"({cfg.num_user_codebooks} codebooks)")
        n_q = cfg.dep_q if n_q is None else n_q
        if not 1 <= n_q <= cfg.dep_q:
            raise ValueError(f"n_q must be from 1 to the model's {cfg.dep_q} codebooks, got {n_q}")
        prefix = None if prefix is None else mx.array(prefix)
        rows = 1 if cfg_coef == 1 else 2
        if condition.tensor is not None and condition.tensor.shape[0] != rows:
            raise ValueError(f"the condition has {condition.tensor.shape[0]} rows, guidance "
                             f"{cfg_coef} takes {rows} (tts_condition)")
        if prefix is not None and (prefix.ndim != 2 or prefix.shape[0] < n_q
                                   or prefix.shape[1] < 1):
            raise ValueError(f"a prefix is Mimi codes [{n_q} codebooks, frames], got "
                             f"{list(prefix.shape)}")
        super().__init__(model, text_sampler=text_sampler, audio_sampler=audio_sampler,
                         cfg_coef=cfg_coef, compile=compile, context=context, kv_bits=kv_bits)
        self.codebooks = n_q
        self.machine = machine
        self.condition = condition
        self.cross = model.cross_keys_values(condition) if cfg.cross_attention else None
        self.delay_steps = delay_steps
        self.padding_bonus = padding_bonus
        self.final_padding = final_padding
        self.state = machine.new_state([])
        self.state.closed = False
        self._fed: deque[int] = deque(maxlen=self.max_delay + 1)
        self._nothing = mx.full((1, cfg.dep_q), ZERO_TOKEN, mx.int32)
        # codebook k is real from step delays[k] + delay_steps
        self._starts = [d + delay_steps for d in cfg.audio_delays[:n_q]]
        self._audio_starts = mx.array(self._starts)
        self.prefix = None if prefix is None else prefix[:n_q].astype(mx.int32)
        self.prefix_steps = 0 if prefix is None else prefix.shape[1]
        self._key = None if seed is None else mx.random.key(seed)

    @property
    def seeded(self) -> bool:
        """Whether the stream draws from a random key of its own (`seed`)."""
        return self._key is not None

    def step_keys(self) -> tuple[mx.array, mx.array] | tuple[None, None]:
        """This step's random keys, (text [1, 2], audio [1, 2]); (None, None) without a seed.
        Call once a step."""
        if self._key is None:
            return None, None
        self._key, text, audio = mx.random.split(self._key, 3)
        return text[None], audio[None]

    def push_words(self, entries: list[Entry]) -> None:
        """Words to speak after those already given (`tts_script.script_to_entries`)."""
        if self.state.closed:
            raise ValueError("end() was called: no more words can be added")
        self.state.entries.extend(entries)

    def end(self) -> None:
        """No more words: once the queue runs out, the generation ends."""
        self.state.closed = True

    @property
    def end_step(self) -> int | None:
        """The step at which the model asked for a word past the last one, once it has."""
        return self.state.end_step

    @property
    def done(self) -> bool:
        end = self.state.end_step
        return end is not None and self.step_idx >= end + self.delay_steps + self.final_padding

    def text_logits(self, logits: mx.array) -> mx.array:
        """The model's text logits of this step [1, vocab], `padding_bonus` added to pad's."""
        if not self.padding_bonus:
            return logits
        pad = self.machine.token_ids.pad
        return logits + mx.where(mx.arange(logits.shape[-1]) == pad,
                                 self.padding_bonus, 0.0).astype(logits.dtype)

    def choose_text(self, sampled: int) -> TtsStep:
        """The model sampled text token `sampled` at this step -> the step so far: the token
        fed next (the state machine's; the depformer's input now) and the words started."""
        t = self.step_idx
        heard = len(self.state.transcript)
        if t < self.prefix_steps:
            fed = ZERO_TOKEN  # the prefix has no text; the script starts after it
        else:
            fed, _ = self.machine.process(t, self.state, sampled)
        self._text = mx.array([fed], mx.int32)
        return TtsStep(t, sampled, fed, words=self.state.transcript[heard:])

    def _prefix_columns(self) -> tuple[list[int], list[bool]]:
        """This step's prefix frame of each codebook, and whether the prefix forces it."""
        columns = [self.step_idx - s for s in self._starts]
        return columns, [0 <= c < self.prefix_steps for c in columns]

    @property
    def samples_audio(self) -> bool:
        """Whether this step's audio needs the depformer (not before the audio starts, nor
        while the prefix forces every codebook)."""
        return self.step_idx >= self.delay_steps and not all(self._prefix_columns()[1])

    def take_audio(self, out: TtsStep, codes: mx.array | None) -> TtsStep:
        """The depformer's codes of this step [1, >= n_q] (None, or any, where `samples_audio`
        is False) end the step: nothing (ZERO_TOKEN) until each codebook's start, the
        prefix's codes while it lasts -> `out` with the frame this step completed."""
        t = self.step_idx
        if not self.samples_audio:
            audio = self._nothing if t < self.delay_steps else mx.concatenate(
                [self._prefix_codes(self._prefix_columns()[0]),
                 self._nothing[:, self.codebooks:]], axis=1)
        else:
            columns, forced = self._prefix_columns()
            audio = mx.where(t < self._audio_starts, ZERO_TOKEN, codes[:, :self.codebooks])
            if any(forced):
                audio = mx.where(mx.array(forced), self._prefix_codes(columns), audio)
            audio = mx.concatenate([audio, self._nothing[:, self.codebooks:]], axis=1)
        self._sampled.append(audio)
        self._fed.append(out.fed)
        mx.async_eval(audio)
        self.step_idx += 1
        frame = self.last_audio_tokens()
        if frame is not None:
            out.frame_index = t - self.max_delay
            out.frame = mx.concatenate([mx.array([self._fed[0]], mx.int32),
                                        frame[0, :self.codebooks]])
        return out

    def _prefix_codes(self, columns: list[int]) -> mx.array:
        """The prefix's code of each codebook at its frame `columns[k]` (clipped) -> [1, n_q]."""
        frames = mx.clip(mx.array(columns), 0, self.prefix_steps - 1)
        return self.prefix[mx.arange(self.codebooks), frames][None]

    def _with_null_row(self, text: mx.array, audio: mx.array, t: int
                       ) -> tuple[mx.array, mx.array]:
        """Guidance's inputs: the step's, then the unconditioned row's, which has no text
        (nothing after the initial token) and none of the prefix (nothing, past each codebook's
        initial token, until `prefix_steps + delay_steps` steps after its delay)."""
        null_text = text if t == 0 else mx.full(text.shape, ZERO_TOKEN, mx.int32)
        null_audio = audio
        if self.prefix is not None:
            limit = self.prefix_steps + self.delay_steps
            masked = mx.array([d < t <= d + limit for d in self.audio_delays])
            null_audio = mx.where(masked[None, :, None], ZERO_TOKEN, audio)
        return mx.concatenate([text, null_text]), mx.concatenate([audio, null_audio])

    def step_inputs(self) -> tuple[mx.array, mx.array]:
        """The model's inputs of this step: text [rows, 1], audio [rows, n_q, 1] (with
        guidance, the null row second)."""
        text_in, audio_in = self.input_tokens()
        if self.cfg_coef != 1:
            return self._with_null_row(text_in, audio_in, self.step_idx)
        return text_in, audio_in

    def step(self) -> TtsStep:
        """Runs one step; waits for the model's text choice (the state machine needs it)."""
        text_in, audio_in = self.step_inputs()
        hidden, logits = self.model(text_in, audio_in, cache=self.cache,
                                    condition=self.condition, cross=self.cross)
        text_key, audio_key = self.step_keys()
        # the null row of guidance, fed no text, has no say in the text
        sampled = self.text_sampler(self.text_logits(logits[:1, -1]), text_key)[0].item()
        out = self.choose_text(sampled)
        codes = (self.sample_audio(hidden, self._text, audio_key) if self.samples_audio
                 else None)
        return self.take_audio(out, codes)
