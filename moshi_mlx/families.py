"""Kyutai's model families: Moshi converses, Hibiki translates speech (its own voice and text),
the STT models transcribe it (text with word times). All run Moshi's loop (Mimi encode -> `LmGen`
step -> Mimi decode: `engine.conversation`) with what each family needs, as Kyutai's PyTorch
`run_inference` does it: Hibiki's `description` condition, guidance and end-of-input token; STT's
silence padding from `stt_config` (the offline loop's `Plan`).

The family comes from config.json: `model_type` when given, else text-only models (`dep_q` 0)
are STT and conditioned ones Hibiki. Kyutai's TTS models (`model_type` 'tts') have their own
loop and apps (`engine.tts`, `run_tts`): the conversation apps refuse them with that pointer;
`serve --tts` loads them with `synthesizer_loader`.
"""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import sentencepiece

from . import model_files, models, utils
from .audio.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from .audio.mimi import Mimi
from .audio.mimi_process import LIVE_REPLY_SECONDS
from .engine.batched import BatchedStepper
from .engine.conversation import Conversation
from .engine.offline import Plan
from .engine.speech_synthesis import Synthesizer, Voice
from .engine.transcription import MIMI_REPLY_SECONDS, Transcriber
from .engine.tts import TtsOptions, TtsStream
from .model_files.voices import load_voice, named_voice, voice_suffix
from .models.conditioner import ConditionTensor
from .models.tts import TtsSettings, VoiceError

KINDS = ("moshi", "hibiki", "stt")
HIBIKI_CONDITION = ("description", "very_good", "very_bad")
"""Hibiki's conditioner, the value it runs with, and the one guidance steers away from."""
TRANSLATION_TAIL_SECONDS = 10.0
"""After the input, Hibiki runs until it ends its text (EOS), at most this long."""


class FamilyError(ValueError):
    """A model or option this app cannot run; the message says why."""


def model_kind(cfg: models.LmConfig) -> str:
    kind = cfg.extra.get("model_type")
    if kind is None:
        kind = "stt" if cfg.dep_q == 0 else "hibiki" if cfg.conditioners else "moshi"
    if kind == "tts":
        raise FamilyError("this is a text-to-speech model (model_type 'tts'): run it with "
                          "python -m moshi_mlx.run_tts (or serve it with serve --tts)")
    if kind not in KINDS:
        raise FamilyError(f"config.json: model_type {kind!r} is not one this app runs "
                          f"({', '.join(KINDS)})")
    return kind


def hibiki_condition(model: models.Lm, cfg_coef: float) -> ConditionTensor:
    """Hibiki's condition rows: 'very_good', then with guidance 'very_bad' (as Kyutai runs it)."""
    name, value, negative = HIBIKI_CONDITION
    provider = model.condition_provider
    if provider is None or set(provider.conditioners) != {name}:
        have = ", ".join(provider.conditioners) if provider is not None else "none"
        raise FamilyError(f"this model's conditioners ({have}) are not Hibiki's '{name}'")
    return provider.condition_tensor(name, [value] + ([negative] if cfg_coef != 1 else []))


def stt_padding(cfg: models.LmConfig) -> tuple[int, int]:
    """Samples of silence before and after the input for an STT model: its silence prefix, and
    its text delay plus one second (so the last words come out)."""
    stt = cfg.stt_config or {}
    before = int(stt.get("audio_silence_prefix_seconds", 0.0) * SAMPLE_RATE)
    after = int((stt.get("audio_delay_seconds", 0.0) + 1.0) * SAMPLE_RATE)
    return before, after


def stt_delay_seconds(cfg: models.LmConfig) -> float:
    """An STT model's text delay: seconds between a word in its input and the step it comes at."""
    return (cfg.stt_config or {}).get("audio_delay_seconds", 0.0)


def stt_offset_seconds(cfg: models.LmConfig) -> float:
    """Seconds between the input's time and the step its words come at (the silence prefix
    included, as `run_inference` pads the input)."""
    return (cfg.stt_config or {}).get("audio_silence_prefix_seconds", 0.0) + stt_delay_seconds(cfg)


def check_cfg_coef(cfg: models.LmConfig, cfg_coef: float) -> None:
    """Guidance (`cfg_coef` other than 1) is for conditioned models: Hibiki."""
    if cfg_coef != 1 and (model_kind(cfg) != "hibiki" or not cfg.conditioners):
        raise FamilyError("--cfg-coef needs a conditioned model (Hibiki); this one has none")


def conversation_condition(model: models.Lm, cfg_coef: float) -> ConditionTensor | None:
    """The condition a model's conversations step with (Hibiki's; none for the others)."""
    check_cfg_coef(model.cfg, cfg_coef)
    return hibiki_condition(model, cfg_coef) if model_kind(model.cfg) == "hibiki" else None


def conversation(model: models.Lm, text_tokenizer: sentencepiece.SentencePieceProcessor,
                 mimi_weight: str | Path, text_sampler: utils.Sampler,
                 audio_sampler: utils.Sampler, cfg_coef: float = 1.0,
                 **options) -> Conversation:
    """A conversation with `model`, conditioned as its family needs (Hibiki, with guidance when
    `cfg_coef` is not 1); `options`: `Conversation`'s (Mimi's span and deadline)."""
    return Conversation(model, text_tokenizer, mimi_weight, text_sampler, audio_sampler,
                        cfg_coef=cfg_coef, condition=conversation_condition(model, cfg_coef),
                        **options)


def live_loader(files: model_files.ModelFiles,
                samplers: tuple[utils.Sampler, utils.Sampler] | None = None,
                cfg_coef: float = 1.0, memory: model_files.MemoryOptions | None = None,
                mimi_max_seq_len: int = 8192) -> Callable[[], Conversation]:
    """What `engine.worker.ModelWorker` runs on the model's thread: loads the model in `files`
    (with the memory preflight, `memory`) and makes the conversation its family needs, with
    Mimi's live deadline. `samplers`: (text, audio) that conversations will mostly use, warmed
    up at load; `mimi_max_seq_len`: Mimi's span (see `audio.mimi.Mimi`)."""

    def load() -> Conversation:
        model, tokenizer, _ = model_files.load_model(files, options=memory)
        return conversation(model, tokenizer, files.mimi_weight,
                            *(samplers or (utils.Sampler(), utils.Sampler())), cfg_coef,
                            mimi_max_seq_len=mimi_max_seq_len,
                            mimi_reply_seconds=LIVE_REPLY_SECONDS)

    return load


def transcriber_loader(files: model_files.ModelFiles, rows: int,
                       memory: model_files.MemoryOptions | None = None
                       ) -> Callable[[], Transcriber]:
    """What the STT service (`serve --stt`) runs on its model's thread: loads the speech-to-text
    model in `files` and a Mimi encoder for each of its `rows` streams. The service needs no
    silence prefix: clients send their own (Kyutai's file client sends 1 s), and word times are
    in the client's audio. Raises FamilyError for a model of another family."""
    kind = model_kind(files.lm_config)
    if kind != "stt":
        raise FamilyError(f"this model ({kind}) is not a speech-to-text model")

    def load() -> Transcriber:
        model, tokenizer, cfg = model_files.load_model(files, options=memory)
        mimis = [Mimi(files.mimi_weight, cfg.mimi_codebooks, decoder=False,
                      reply_seconds=MIMI_REPLY_SECONDS) for _ in range(rows)]
        return Transcriber(BatchedStepper(model, rows), tokenizer, mimis, stt_delay_seconds(cfg))

    return load


def check_tts(files: model_files.ModelFiles, voice_repo: str | None = None,
              default_voice: str | None = None) -> None:
    """FamilyError unless the model in `files` is Kyutai's TTS; with `voice_repo`, for a model
    with speaker conditioning, ModelFilesError unless `default_voice` is there (as Kyutai's
    server, which refuses to start without its default voice)."""
    if files.lm_config.tts_config is None:
        raise FamilyError("this model is not a text-to-speech model (no tts_config in its "
                          "config.json)")
    if voice_repo is not None and TtsSettings.of(files.lm_config).multi_speaker:
        suffix = voice_suffix(files.lm_config.to_config_dict())
        try:
            named_voice(default_voice, voice_repo, suffix)
        except model_files.ModelFilesError as e:
            raise model_files.ModelFilesError(f"--voice: {e}") from None


def synthesizer_loader(files: model_files.ModelFiles, rows: int, voice_repo: str,
                       default_voice: str, samplers: tuple[utils.Sampler, utils.Sampler],
                       options: TtsOptions, seed: int,
                       memory: model_files.MemoryOptions | None = None
                       ) -> Callable[[], Synthesizer]:
    """What the TTS service (`serve --tts`) runs on its model's thread: loads the
    text-to-speech model in `files` (random state from `seed`) and a Mimi decoder for each of
    its `rows` streams; voices are looked up by name in `voice_repo` (`default_voice` for
    clients that name none). Raises FamilyError for a model that is not Kyutai's TTS."""
    check_tts(files)

    def load() -> Synthesizer:
        mx.random.seed(seed)
        model, tokenizer, cfg = model_files.load_model(files, warmup=False, options=memory)
        settings = TtsSettings.of(cfg)
        codebooks = min(options.n_q or cfg.dep_q, cfg.dep_q)
        options_used = replace(options, n_q=codebooks)
        mimis = [Mimi(files.mimi_weight, codebooks, reply_seconds=MIMI_REPLY_SECONDS)
                 for _ in range(rows)]
        voices: dict[Path, mx.array] = {}

        def new_stream(voice: Voice, mimi: Mimi) -> TtsStream:
            if isinstance(voice, Path):
                if voice not in voices:
                    try:
                        voices[voice] = load_voice(voice)
                    except model_files.ModelFilesError as e:
                        raise VoiceError(str(e)) from None
                embeddings = [voices[voice]]
            else:
                embeddings = [] if voice is None else [mx.array(voice)]
            return TtsStream(model, tokenizer, files.mimi_weight, embeddings, samplers,
                             options_used, mimi)

        suffix = voice_suffix(files.lm_config.to_config_dict())
        find_voice = ((lambda name: named_voice(name, voice_repo, suffix))
                      if settings.multi_speaker else None)
        return Synthesizer(new_stream, mimis, settings.second_stream_ahead, find_voice,
                           default_voice)

    return load


def offline_plan(conversation: Conversation) -> Plan:
    """How `run_inference` streams an input through each family: Moshi gets silence while its
    codebook delays fill, and answers for as long as the input; Hibiki the end-of-input frame,
    then silence until its text ends; STT its silence before and after."""
    kind = model_kind(conversation.cfg)
    if kind == "moshi":
        return Plan(after=conversation.max_delay * FRAME_SIZE, trim=True)
    if kind == "hibiki":
        return Plan(end_of_input=True, tail_steps=int(TRANSLATION_TAIL_SECONDS * FRAME_RATE))
    before, after = stt_padding(conversation.cfg)
    return Plan(before=before, after=after, time_offset=stt_offset_seconds(conversation.cfg))
