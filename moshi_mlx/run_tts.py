"""Kyutai's text to speech, a drop-in for Kyutai's `run_tts`:

    python -m moshi_mlx.run_tts requests.jsonl --out-folder out/
    echo "Hello there." | python -m moshi_mlx.run_tts - --voice NAME --out-folder out/

Each line of the JSONL file is a request `{"turns": [...], "voices": [...], "id": "x"}` (turns
alternate between the speakers, the main one first; one voice per speaker); each gives
`ID.wav`, and unless `--only-wav` `ID.safetensors` (`frames`: the audio codes [n_q, frames], a
frame per 80 ms of the wav) and `ID.json` (the words with their steps, `end_step`, the text
tokens of every step, the settings), as Kyutai's MLX run_tts writes them. With `-` as input,
each line of stdin is spoken as it arrives (one voice, `--voice`), into `stdin.wav`, or to the
speakers with `--out-folder -`. Files are written as the audio comes, under a temporary name,
renamed when complete.

A voice is a speaker embedding (.safetensors) for a model with speaker conditioning
(kyutai/tts-1.6b-en_fr), or a wav for one without (kyutai/tts-0.75b-en-public): its audio,
encoded with Mimi, is spoken first and the speech goes on in its voice (the wav, the word
times and ID.safetensors leave it out; `start_step` counts its frames).
"""

import argparse
import json
import math
import queue
import sys
import threading
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import cli, model_files, models
from .audio.constants import FRAME_RATE, SAMPLE_RATE
from .audio.devices import AudioDeviceError, playback
from .audio.mimi import Mimi
from .audio.wav import WavWriter, read_wav
from .engine.tts import TtsOptions, TtsStream, tts_samplers, voice_prefix
from .model_files.demo import demo_repo
from .model_files.voices import DEFAULT_VOICE_REPO, load_voice, voice_path, voice_suffix
from .models.tts import TtsSettings, VoiceError
from .models.tts_script import ScriptError
from .utils.output import atomic_write
from .utils.safetensors import TensorInfo
from .weights.mimi_layout import MIMI_FILE
from .weights.safetensors_writer import SafetensorsWriter

log = cli.log
DEFAULT_REPO = "kyutai/tts-1.6b-en_fr"
STDIN_ID = "stdin"
QUANT_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize packs
WAIT_STEPS = 8  # after the audio of the last word, a stream waiting for text stops stepping


class RequestError(ValueError):
    """A request line that cannot be run; the message names the line."""


@dataclass
class Request:
    turns: list[str]
    voices: list[str]
    id: str


def parse_request(line: str, number: int) -> Request:
    """One JSONL line -> a Request, checked; RequestError names the line and what is wrong."""
    where = f"line {number}"
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise RequestError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise RequestError(f"{where}: a request is an object with 'turns', 'voices' and 'id'")
    unknown = sorted(set(data) - {"turns", "voices", "id"})
    if unknown:  # Kyutai's refuses them too ('prefix', in its docstring, included)
        hint = (" (the voice of a model without speaker conditioning, a wav spoken first, is "
                "given in 'voices')") if "prefix" in unknown else ""
        raise RequestError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}: a "
                           f"request has 'turns', 'voices' and 'id'{hint}")
    turns, voices, rid = data.get("turns"), data.get("voices", []), data.get("id")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
        raise RequestError(f"{where}: 'turns' must be a non-empty list of strings")
    if not any(t.strip() for t in turns):
        raise RequestError(f"{where}: the turns have no text")
    if not (isinstance(voices, list) and all(isinstance(v, str) for v in voices)):
        raise RequestError(f"{where}: 'voices' must be a list of voice names")
    if isinstance(rid, (int, float)) and not isinstance(rid, bool):
        rid = str(rid)  # a number names the files as in Kyutai's run_tts: {"id": 7} -> 7.wav
    if not (isinstance(rid, str) and rid and "/" not in rid and rid not in (".", "..")):
        raise RequestError(f"{where}: 'id' must be a non-empty file name (no '/') or a number")
    return Request(turns, voices, rid)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.run_tts",
        description="Synthesize speech with Kyutai's TTS from a JSONL file of requests "
                    "(or '-': lines of text from stdin, spoken as they arrive).")
    p.add_argument("jsonl", help="JSONL file of requests {turns, voices, id}, or - for stdin")
    p.add_argument("--out-folder", default="tts-outputs",
                   help="where ID.wav (and ID.safetensors, ID.json) go; with '-' input, - "
                        "plays the audio")
    p.add_argument("--hf-repo", default=DEFAULT_REPO,
                   help=f"repository of the model (default: {DEFAULT_REPO})")
    p.add_argument("--demo", action="store_true",
                   help="the small random TTS demo model (no download)")
    p.add_argument("--voice-repo", default=DEFAULT_VOICE_REPO,
                   help=f"repository of the voices (default: {DEFAULT_VOICE_REPO})")
    p.add_argument("--voice", action="append", default=[],
                   help="with '-' input: a voice (name in --voice-repo, hf:// address or local "
                        "file: .safetensors for a model with speaker conditioning, repeat for "
                        "more speakers; a wav spoken first for one without)")
    p.add_argument("--config", "--lm-config", dest="config", help="the model's config.json")
    p.add_argument("--tokenizer", help="the text tokenizer (sentencepiece .model)")
    p.add_argument("--mimi-weights", "--mimi-weight", dest="mimi_weights",
                   help="Mimi's weights")
    p.add_argument("--moshi-weights", "--moshi-weight", dest="moshi_weights",
                   help="the TTS model's weights (PyTorch moshi's layout, as Kyutai releases "
                        "them, or this package's)")
    p.add_argument("--nq", type=cli.positive_int, default=32,
                   help="codebooks to generate (default 32, capped at the model's)")
    p.add_argument("--temp", type=float, default=0.6, help="text and audio temperature")
    p.add_argument("--cfg-coef", type=float, default=2.0,
                   help="classifier-free guidance: for cfg-distilled models one of their 'cfg' "
                        "values; for others 1 is none, another value runs two rows a step")
    p.add_argument("--quantize", type=int, choices=QUANT_BITS,
                   help="quantize every linear layer to this many bits after loading, "
                        "cross-attention included (Kyutai's run_tts leaves it, the "
                        "embeddings and the text head unquantized); groups of 32 at 4 bits, "
                        "as Kyutai's q4 checkpoints, 64 otherwise")
    p.add_argument("--max-padding", type=int, default=8, help="most pad steps in a row")
    p.add_argument("--initial-padding", type=int, default=2, help="pad steps at the start")
    p.add_argument("--final-padding", type=int, default=4, help="steps after the last word")
    p.add_argument("--padding-bonus", type=float, default=0.0,
                   help="added to the pad logit: positive values speak slower")
    p.add_argument("--padding-between", type=int, default=1,
                   help="pad steps forced between words")
    p.add_argument("--only-wav", action="store_true", help="write only ID.wav")
    p.add_argument("--seed", type=int, default=cli.KYUTAI_SEED,
                   help="random seed (default: %(default)s, Kyutai's)")
    args = p.parse_args(argv)
    for name in ("max_padding", "initial_padding", "final_padding", "padding_between"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("temp", "cfg_coef", "padding_bonus"):
        if not math.isfinite(getattr(args, name)) or (name == "temp" and args.temp < 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number (temp >= 0)")
    return args


def load(args):
    """-> (model, tokenizer, ModelFiles, raw config)."""
    flags = (args.moshi_weights, args.mimi_weights, args.tokenizer, args.config)
    if args.demo:  # the TTS demo's files, unless a flag names another
        demo = demo_repo(kind="tts")
        names = ("model.safetensors", MIMI_FILE, "tokenizer_spm_demo.model", "config.json")
        flags = tuple(f or str(demo / n) for f, n in zip(flags, names, strict=True))
    ns = argparse.Namespace(quantized=None, hf_repo=args.hf_repo, demo=False,
                            moshi_weight=flags[0], mimi_weight=flags[1], tokenizer=flags[2],
                            lm_config=flags[3])
    files = model_files.resolve(ns)
    raw = files.lm_config.to_config_dict()
    if not files.lm_config.cross_attention and files.lm_config.tts_config is None:
        raise models.ConfigError("this model is not a TTS model (no tts_config): use "
                                 "run_inference or local for Moshi's other models")
    guided = not cfg_values(files.lm_config) and args.cfg_coef != 1  # a second row each step
    model, tokenizer, _ = model_files.load_model(
        files, warmup=False, options=model_files.MemoryOptions(rows_per_stream=1 + guided))
    if args.quantize:
        models.quantize(model, bits=args.quantize, group_size=32 if args.quantize == 4 else 64)
    return model, tokenizer, files, raw


def voices_for(names: list[str], args, raw: dict) -> list[mx.array]:
    """The speaker embeddings of a model with speaker conditioning."""
    if not names:
        raise VoiceError("this model needs a voice (--voice, or 'voices' in the request)")
    suffix = voice_suffix(raw)
    paths = [voice_path(n, args.voice_repo, suffix) for n in names]
    for name, path in zip(names, paths, strict=True):
        if path.suffix != ".safetensors":
            raise VoiceError(f"voice '{name}': this model takes speaker embeddings "
                             "(.safetensors); a wav is a voice for models without speaker "
                             "conditioning")
    return [load_voice(path) for path in paths]


def prefix_for(names: list[str], args, mimi: Mimi) -> np.ndarray | None:
    """The voice of a model without speaker conditioning: a wav's Mimi codes, or None."""
    if not names:
        return None
    if len(names) > 1:
        raise VoiceError(f"{len(names)} voices given: this model takes one (a wav spoken "
                         "before the text)")
    path = voice_path(names[0], args.voice_repo)
    if path.suffix == ".safetensors":
        raise VoiceError(f"voice '{names[0]}' is a speaker embedding: this model takes no "
                         "speaker embeddings (no 'speaker_wavs' conditioner); give a wav, "
                         "spoken before the text")
    return voice_prefix(mimi, read_wav(path, SAMPLE_RATE))


def new_stream(names: list[str], model, tokenizer, files, raw, args, stack) -> TtsStream:
    """A generation in the voice(s) `names`, closed with `stack`."""
    opts = options(args, model)
    mimi = stack.enter_context(closing(Mimi(files.mimi_weight, num_codebooks=opts.n_q)))
    if TtsSettings.of(model.cfg).multi_speaker:
        voices, prefix = voices_for(names, args, raw), None
    else:
        voices, prefix = [], prefix_for(names, args, mimi)
    return TtsStream(model, tokenizer, files.mimi_weight, voices, tts_samplers(args.temp), opts,
                     mimi, prefix)


def cfg_values(cfg) -> list[str]:
    """The `cfg` values of a cfg-distilled model ([] for one that is not)."""
    return cfg.conditioners.get("cfg", {}).get("lut", {}).get("possible_values", [])


def options(args, model) -> TtsOptions:
    values = cfg_values(model.cfg)
    cfg_value = None
    if values:
        cfg_value = format(args.cfg_coef, ".1f")
        if cfg_value not in values or float(cfg_value) != args.cfg_coef:
            raise VoiceError(f"--cfg-coef {args.cfg_coef}: this model takes "
                             f"{', '.join(values)}")
    return TtsOptions(min(args.nq, model.cfg.dep_q), cfg_value, args.max_padding,
                      args.initial_padding, args.final_padding, args.padding_between,
                      args.padding_bonus, cfg_coef=1.0 if values else args.cfg_coef)


def speak(stream: TtsStream, out) -> tuple[list[np.ndarray], list, list]:
    """Steps `stream` to its end, writing each frame's audio to `out` as it comes; -> (the
    frames of audio codes [n_q] that `out` got, one per 80 ms, as Kyutai's run_tts saves them;
    the transcript, (word, step); the text tokens (sampled, fed) of every step)."""
    frames, transcript, logged = [], [], []
    for s in stream.spoken_steps():
        logged.append(([s.step.sampled], s.step.fed))
        if s.pcm is not None:
            frames.append(np.array(s.step.frame[1:]))
            out(s.pcm)
        transcript += [(w, t) for w, t in s.step.words]
    return frames, transcript, logged


def run_request(req: Request, model, tokenizer, files, raw, args, stack) -> None:
    log.info("speaking %s", req.id)
    stream = new_stream(req.voices, model, tokenizer, files, raw, args, stack)
    for turn in req.turns:
        if turn.strip():
            stream.push_text(turn)
        else:
            stream.turn += 1  # an empty turn: the other speaker starts
    stream.end()
    folder = Path(args.out_folder)
    path = folder / f"{req.id}.wav"
    with atomic_write(path, buffering=0) as f, WavWriter(f, SAMPLE_RATE) as wav:
        frames, transcript, logged = speak(stream, wav.write)
    if not args.only_wav:
        n_q = stream.gen.codebooks
        codes = np.stack(frames, axis=1) if frames else np.zeros((n_q, 0), np.int32)
        with atomic_write(path.with_suffix(".safetensors")) as f:
            writer = SafetensorsWriter(f, [("frames", TensorInfo("int32", codes.shape))])
            writer.write("frames", mx.array(codes, mx.int32))
            writer.finish()
        # cfg_coef: the classic guidance applied, as Kyutai's (1.0 for a cfg-distilled model,
        # whose --cfg-coef is the condition `cfg`)
        info = {"hf_repo": args.hf_repo, "voice_repo": args.voice_repo,
                "model_id": raw.get("model_id"), "cfg_coef": stream.options.cfg_coef,
                "cfg": stream.options.cfg_value, "temp": args.temp,
                "max_padding": args.max_padding, "initial_padding": args.initial_padding,
                "final_padding": args.final_padding, "padding_between": args.padding_between,
                "padding_bonus": args.padding_bonus, "nq": n_q,
                "transcript": transcript,
                "consumption_times": stream.gen.state.consumption_times,
                "turns": req.turns, "voices": req.voices, "logged_text_tokens": logged,
                "end_step": stream.gen.end_step, "start_step": stream.gen.prefix_steps}
        with atomic_write(path.with_suffix(".json"), "w") as f:
            json.dump(info, f)
    log.info("wrote %s (%.1f s, %d words)", path, len(frames) / FRAME_RATE, len(transcript))


def run_stdin(model, tokenizer, files, raw, args, stack) -> None:
    """Speaks stdin line by line, as the lines arrive."""
    stream = new_stream(args.voice, model, tokenizer, files, raw, args, stack)
    lines: queue.Queue[str | None] = queue.Queue()

    def read():
        for line in sys.stdin:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True, name="stdin").start()
    gen = stream.gen

    def take(line: str | None) -> None:
        if line is None:
            stream.end()
        elif line.strip():
            stream.push_text(line, new_turn=stream.turn < 0)

    if args.out_folder == "-":
        write = stack.enter_context(playback())
    else:
        path = Path(args.out_folder) / f"{STDIN_ID}.wav"
        f = stack.enter_context(atomic_write(path, buffering=0))
        write = stack.enter_context(WavWriter(f, SAMPLE_RATE)).write
    while not stream.done:
        while not lines.empty():
            take(lines.get())
        state = gen.state
        last = state.consumption_times[-1] if state.consumption_times else -1
        caught_up = gen.step_idx > last + gen.delay_steps + WAIT_STEPS or stream.turn < 0
        if not (state.closed or state.entries or state.queued) and caught_up:
            take(lines.get())  # nothing left to say: wait for the next line
            continue
        s = stream.step()
        if s.pcm is not None:
            write(s.pcm)
        for word, t in s.words:
            print(f"{t:7.2f}s {word}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run():
        mx.random.seed(args.seed)
        if args.jsonl != "-":
            path = Path(args.jsonl)
            if not path.is_file():
                raise RequestError(f"{path}: no such file")
            requests = [parse_request(line, i + 1)
                        for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
        if args.out_folder != "-" or args.jsonl != "-":  # '-' plays only stdin's text
            Path(args.out_folder).mkdir(parents=True, exist_ok=True)
        if args.jsonl != "-" and not requests:  # as Kyutai's: nothing to do is no error
            log.warning("%s holds no request: nothing to speak", args.jsonl)
            return
        model, tokenizer, files, raw = load(args)
        with ExitStack() as stack:
            if args.jsonl == "-":
                run_stdin(model, tokenizer, files, raw, args, stack)
                return
            for req in requests:
                run_request(req, model, tokenizer, files, raw, args, stack)

    return cli.run_main(run, user_errors=(RequestError, VoiceError, ScriptError,
                                          AudioDeviceError))


if __name__ == "__main__":
    sys.exit(main())
