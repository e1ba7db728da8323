"""What `serve` loads on each service's model thread: the STT models batched over a
`Transcriber`'s streams, Kyutai's TTS over a `Synthesizer`'s. Apart from `families` so that the
conversation apps do not import the services' engine (about 30 ms of every start)."""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from . import model_files, utils
from .audio.constants import FRAME_RATE
from .audio.mimi import Mimi
from .engine.batched import BatchedStepper, BatchedTts
from .engine.speech_synthesis import Synthesizer, Voice
from .engine.transcription import MIMI_REPLY_SECONDS, Transcriber
from .engine.tts import TtsOptions, TtsStream
from .families import FamilyError, model_kind, stt_delay_seconds
from .model_files.voices import load_voice, named_voice, voice_suffix
from .models import LmConfig
from .models.tts import TtsSettings, VoiceError

# Kyutai's server configurations' asr_delay_in_tokens, by the model's audio_delay_seconds
# (stt-1b-en_fr: 0.5 s, stt-2.6b-en: 2.5 s): not the delay rounded one way
KYUTAI_ASR_DELAYS = {0.5: 6, 2.5: 32}


def asr_delay_in_tokens(cfg: LmConfig) -> int:
    """An STT model's text delay in steps as Kyutai's server is configured for it (the nearest
    step for another model)."""
    delay = stt_delay_seconds(cfg)
    return KYUTAI_ASR_DELAYS.get(delay, round(delay * FRAME_RATE))


def transcriber_loader(files: model_files.ModelFiles, rows: int,
                       memory: model_files.MemoryOptions | None = None,
                       delay_steps: int | None = None) -> Callable[[], Transcriber]:
    """What the STT service (`serve --stt`) runs on its model's thread: loads the speech-to-text
    model in `files` and a Mimi encoder for each of its `rows` streams. The service needs no
    silence prefix: clients send their own (Kyutai's file client sends 1 s), and word times are
    in the client's audio. `delay_steps`: Kyutai's server's `asr_delay_in_tokens` (None: that
    of its configurations, `asr_delay_in_tokens`). Raises FamilyError for a model of another
    family."""
    kind = model_kind(files.lm_config)
    if kind != "stt":
        raise FamilyError(f"this model ({kind}) is not a speech-to-text model")
    if delay_steps is None:
        delay_steps = asr_delay_in_tokens(files.lm_config)

    def load() -> Transcriber:
        model, tokenizer, cfg = model_files.load_model(files, options=memory)
        *mimis, spare = [Mimi(files.mimi_weight, cfg.mimi_codebooks, decoder=False,
                              reply_seconds=MIMI_REPLY_SECONDS) for _ in range(rows + 1)]
        return Transcriber(BatchedStepper(model, rows), tokenizer, mimis, delay_steps, spare)

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
    text-to-speech model in `files` and a Mimi decoder for each of its `rows` streams. Each
    stream draws with a random key of its own, from its client's seed or else `seed`: the same
    seed, text and voice give the same speech, alone or beside other streams. Voices are looked
    up by name in `voice_repo` (`default_voice` for clients that name none). Raises FamilyError
    for a model that is not Kyutai's TTS."""
    check_tts(files)

    def load() -> Synthesizer:
        model, tokenizer, cfg = model_files.load_model(files, warmup=False, options=memory)
        settings = TtsSettings.of(cfg)
        codebooks = min(options.n_q or cfg.dep_q, cfg.dep_q)
        # Kyutai's server ends a stream the model's acoustic delay after the offline rule
        # (its last step counts it): that many more frames of audio
        options_used = replace(options, n_q=codebooks,
                               final_padding=options.final_padding + cfg.max_delay)
        *mimis, spare = [Mimi(files.mimi_weight, codebooks, reply_seconds=MIMI_REPLY_SECONDS)
                         for _ in range(rows + 1)]
        voices: dict[Path, mx.array] = {}

        def new_stream(voice: Voice, mimi: Mimi, stream_seed: int | None) -> TtsStream:
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
                             options_used, mimi,
                             seed=seed if stream_seed is None else stream_seed)

        suffix = voice_suffix(files.lm_config.to_config_dict())
        find_voice = ((lambda name: named_voice(name, voice_repo, suffix))
                      if settings.multi_speaker else None)
        return Synthesizer(BatchedTts(model, rows), new_stream, mimis,
                           settings.second_stream_ahead, find_voice, default_voice, spare)

    return load
