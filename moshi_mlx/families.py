"""Kyutai's model families: Moshi converses, Hibiki translates speech (its own voice and text),
the STT models transcribe it (text with word times). All run Moshi's loop (Mimi encode -> `LmGen`
step -> Mimi decode: `engine.conversation`) with what each family needs, as Kyutai's PyTorch
`run_inference` does it: Hibiki's `description` condition, guidance and end-of-input token; STT's
silence padding from `stt_config` (the offline loop's `Plan`).

The family comes from config.json: `model_type` when given, else text-only models (`dep_q` 0)
are STT and conditioned ones Hibiki. Kyutai's TTS models (`model_type` 'tts') have their own
loop and apps (`engine.tts`, `run_tts`): the conversation apps refuse them with that pointer;
`serve --tts` loads them (`speech_services`).
"""

from collections.abc import Callable
from pathlib import Path

import sentencepiece

from . import model_files, models, utils
from .audio.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from .audio.mimi_process import LIVE_REPLY_SECONDS
from .engine.conversation import Conversation
from .engine.offline import Plan
from .models.conditioner import ConditionTensor

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
