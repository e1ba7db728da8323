"""Helium, Kyutai's text model: continues a prompt, printing the text as it is generated.

    python -m moshi_mlx.run_helium --prompt "Aujourd'hui, il est temps" --nsteps 100
    python -m moshi_mlx.run_helium --quantize-bits 4 --save-quantized helium.q4.safetensors
    python -m moshi_mlx.run_helium --weights helium.q4.safetensors

A drop-in for Kyutai's `moshi_mlx.run_helium` (its flags, their meaning and defaults), with a
causal prompt prefill, a stop at the tokenizer's end of sequence, pre-quantized files and the
sampling flags of mlx_lm's `generate` (`--temp`, `--top-p`, `--top-k`, `--seed`).
"""

import argparse
import codecs
import json
import logging
import sys
import time
from pathlib import Path

import mlx.core as mx
import sentencepiece
from mlx.utils import tree_flatten

from . import cli, models, utils
from .model_files import memory
from .model_files.errors import HubUnreachable, ModelFilesError
from .model_files.hub import HF_PREFIX, hub_download, parse_hf_uri
from .models.checkpoint import (
    check_file_matches_model,
    model_tensors,
    module_quantization,
    read_header,
)
from .models.checkpoint import load as load_checkpoint
from .models.helium import Helium, HeliumConfig, generate, helium_1_preview_2b
from .utils.output import atomic_write, check_writable

log = logging.getLogger("moshi_mlx")

DEFAULT_REPO = "kyutai/helium-1-preview-2b-mlx"
WEIGHTS_NAME = "helium-1-preview-2b-bf16.safetensors"
TOKENIZER_NAME = "tokenizer_spm_48k_multi6_2.model"
QUANT_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize packs
GROUP_SIZES = (32, 64, 128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_mlx.run_helium",
        description="Continue a text prompt with Helium, Kyutai's text language model (by "
                    f"default {DEFAULT_REPO}), printing the text as it is generated. Generation "
                    "stops after --nsteps tokens or at the end of sequence.")
    parser.add_argument("--prompt", default="Aujourd'hui, il est temps",
                        help="the text to continue (default: %(default)r)")
    parser.add_argument("--nsteps", type=int, default=20,
                        help="tokens to generate at most (default: %(default)s; 0 prints the "
                             "prompt only, e.g. with --save-quantized)")
    parser.add_argument("--verbose", action="store_true",
                        help="one line per token: step, token id, text")
    files = parser.add_argument_group("model files")
    files.add_argument("--hf-repo", default=DEFAULT_REPO, metavar="OWNER/REPO",
                       help="Hugging Face repository of the weights and tokenizer (default: "
                            f"%(default)s, files {WEIGHTS_NAME} and {TOKENIZER_NAME})")
    files.add_argument("--weights", metavar="PATH",
                       help="Helium's weights in Kyutai's MLX layout (.safetensors; bf16 or "
                            "quantized, as --save-quantized writes): a path or hf://owner/repo/file")
    files.add_argument("--tokenizer", metavar="PATH",
                       help="the sentencepiece tokenizer (.model): a path or hf://owner/repo/file")
    files.add_argument("--config", metavar="CONFIG_JSON",
                       help="the model's config.json in transformers' Helium format (a path or "
                            "hf://owner/repo/file; default: helium-1-preview-2b)")
    files.add_argument("--ignore-memory", action="store_true",
                       help="load even when the model does not fit the memory available")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--quantize-bits", type=int, choices=QUANT_BITS,
                       help="quantize the bf16 weights to this many bits after loading")
    quant.add_argument("--quantize-group-size", type=int, choices=GROUP_SIZES, default=64,
                       help="quantization group size (default: %(default)s)")
    quant.add_argument("--save-quantized", metavar="PATH",
                       help="with --quantize-bits: also save the quantized weights there "
                            "(.safetensors), to load later with --weights")
    sampling = parser.add_argument_group(
        "sampling", "at the temperature, among the top-k most likely tokens when --top-k is set, "
                    "else within the top-p probability mass (Kyutai's defaults)")
    sampling.add_argument("--temp", type=float, default=0.8,
                          help="sampling temperature, 0 for greedy (default: %(default)s)")
    sampling.add_argument("--top-p", type=float, default=0.95,
                          help="nucleus sampling mass, 1 to keep every token (default: "
                               "%(default)s)")
    sampling.add_argument("--top-k", type=int, default=0,
                          help="sample among the top-k tokens (replaces --top-p); 0 for none "
                               "(default: %(default)s)")
    sampling.add_argument("--seed", type=int, default=cli.KYUTAI_SEED,
                          help="random seed (default: %(default)s, Kyutai's)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with the usage errors (exit code 2) of values no model takes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nsteps < 0:
        parser.error(f"--nsteps must be 0 or more, got {args.nsteps}")
    try:
        utils.check_temperature(args.temp, "--temp")
        utils.check_top_k(args.top_k, None, "--top-k")
    except utils.SamplingError as e:
        parser.error(str(e))
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be above 0 and at most 1, got {args.top_p}")
    if args.save_quantized and args.quantize_bits is None:
        parser.error("--save-quantized needs --quantize-bits (the weights to save are the "
                     "quantized ones)")
    return args


def fetch(value: str | None, repo: str, default_name: str) -> Path:
    """A file flag's value (a local path or hf://owner/repo/file), else `default_name` of
    `repo`, downloaded through huggingface_hub."""
    try:
        if value is None:
            return hub_download(repo, default_name)
        if value.startswith(HF_PREFIX):
            return hub_download(*parse_hf_uri(value))
    except HubUnreachable:
        where = value or f"{repo}/{default_name}"
        raise ModelFilesError(f"cannot reach the Hugging Face Hub to download {where}, and it "
                              "is not in the local cache. Check your connection, or pass local "
                              "files with --weights, --tokenizer (and --config).") from None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelFilesError(f"{path}: no such file.")
    return path


def read_config(args: argparse.Namespace) -> HeliumConfig:
    if args.config is None:
        return helium_1_preview_2b()
    path = fetch(args.config, args.hf_repo, "config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFilesError(f"{path}: not a readable JSON config ({e}).") from None
    try:
        return HeliumConfig.from_hf_config(data)
    except models.ConfigError as e:
        raise models.ConfigError(f"{path}: {e}") from None


def load_tokenizer(path: Path, cfg: HeliumConfig) -> sentencepiece.SentencePieceProcessor:
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ModelFilesError(f"{path}: not a sentencepiece model ({e}).") from None
    if sp.vocab_size() != cfg.vocab:
        raise ModelFilesError(f"{path}: the tokenizer has {sp.vocab_size()} pieces but the model's "
                              f"vocabulary has {cfg.vocab}: they do not belong to the same model "
                              "(--config gives another model's shape).")
    return sp


def load_model(weights: Path, cfg: HeliumConfig, bits: int | None, group_size: int) -> Helium:
    """Helium with the weights of `weights`, quantized as the file holds them (read off its
    header), then to `bits` when given; checked strictly (names, shapes)."""
    model = Helium(cfg)
    model.set_dtype(mx.bfloat16)
    found = read_header(weights).tensors
    layout = module_quantization(found, model_tensors(model))
    if layout:
        if bits is not None:
            raise ModelFilesError(f"{weights} holds quantized weights already: run without "
                                  "--quantize-bits.")
        models.quantize(model, layout=layout)
    check_file_matches_model(
        weights, model, "Check that the file and the config (--config) belong to the same model.")
    log.info("loading %s", weights)
    model.load_weights(list(load_checkpoint(weights).items()), strict=True)
    if bits is not None:
        try:
            models.quantize(model, bits=bits, group_size=group_size)
        except ValueError as e:  # a width the group size does not divide
            raise models.ConfigError(f"cannot quantize this model with --quantize-group-size "
                                     f"{group_size}: {e}") from None
    mx.eval(model.parameters())
    return model


class TextStream:
    """The text of sentencepiece tokens given one at a time, each part as soon as it is whole:
    pieces with '\u2581' for spaces, byte pieces (`<0xNN>`) joined into UTF-8 characters,
    control pieces (`<s>`, `</s>`) as no text. mlx_lm's `SPMStreamingDetokenizer` does this but
    its module imports `transformers`; sentencepiece itself decodes whole sequences only."""

    def __init__(self, sp: sentencepiece.SentencePieceProcessor):
        self.sp = sp
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token: int) -> str:
        """The text `token` completes ('' while a character's bytes are incomplete)."""
        piece = self.sp.id_to_piece(token)
        if self.sp.is_control(token):
            data = b""
        elif self.sp.is_byte(token):
            data = bytes([int(piece[3:5], 16)])
        else:
            data = piece.replace("\u2581", " ").encode()
        return self.utf8.decode(data)

    def finish(self) -> str:
        """What is left: an incomplete character, as U+FFFD."""
        return self.utf8.decode(b"", final=True)


def print_continuation(model: Helium, sp: sentencepiece.SentencePieceProcessor,
                       prompt: list[int], sampler: utils.Sampler, args: argparse.Namespace) -> None:
    """Prints the prompt, then each token's text as soon as it is sampled (`--verbose`: one line
    per token), then logs the count and speeds."""
    stream = TextStream(sp)
    if args.verbose:
        print("prompt", args.prompt, flush=True)
    else:
        print(args.prompt, end="", flush=True)
    times = [time.perf_counter()]
    for step, token in enumerate(generate(model, prompt, sampler, args.nsteps, sp.eos_id())):
        times.append(time.perf_counter())
        text = stream.add(token)
        if args.verbose:
            print(step, token, repr(text), flush=True)
        else:
            print(text, end="", flush=True)
    print("" if args.verbose else stream.finish(), flush=True)
    count = len(times) - 1
    if args.nsteps == 0:
        return
    speed = f", then {(count - 1) / (times[-1] - times[1]):.1f} tokens/s" if count > 1 else ""
    log.info("%d tokens (%s); the prompt's %d tokens and the first in %.2f s%s", count,
             "end of sequence" if count < args.nsteps else f"{args.nsteps} steps", len(prompt),
             times[min(count, 1)] - times[0], speed)


def run(args: argparse.Namespace) -> None:
    cfg = read_config(args)
    weights = fetch(args.weights, args.hf_repo, WEIGHTS_NAME)
    sp = load_tokenizer(fetch(args.tokenizer, args.hf_repo, TOKENIZER_NAME), cfg)
    prompt = ([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(args.prompt)
    if not prompt:
        raise ModelFilesError(f"{args.tokenizer or TOKENIZER_NAME}: the tokenizer has no "
                              "beginning-of-sequence token to continue an empty prompt from.")
    utils.check_top_k(args.top_k, cfg.vocab, "--top-k")
    sampler = utils.Sampler(temp=args.temp, top_p=args.top_p, top_k=args.top_k)
    if args.save_quantized:
        check_writable(args.save_quantized)
    memory.check_fits(memory.estimate_text_model(cfg, weights, args.quantize_bits),
                      force=args.ignore_memory)
    memory.wire_model_memory()
    model = load_model(weights, cfg, args.quantize_bits, args.quantize_group_size)
    if args.save_quantized:
        print(f"saving quantized weights in {args.save_quantized}", flush=True)  # as Kyutai's
        with atomic_write(args.save_quantized) as f:
            mx.save_safetensors(f, dict(tree_flatten(model.parameters())), {"format": "mlx"})
    mx.random.seed(cli.choose_seed(args.seed))
    print_continuation(model, sp, prompt, sampler, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
