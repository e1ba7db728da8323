"""Loading Moshi from its files, as `mlx_lm.utils.load` does for a language model: the text
tokenizer, the memory preflight (which KV cache fits), the model quantized as the file holds it,
its weights checked strictly (in this package's layout, or PyTorch moshi's as Kyutai releases
its TTS)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import sentencepiece

from .. import models
from ..models.checkpoint import model_tensors, module_quantization, read_header
from ..weights.pytorch_layout import is_pytorch_layout, load_pytorch_weights
from . import memory
from .errors import ModelFilesError
from .resolve import ModelFiles

log = logging.getLogger(__name__)


def load_text_tokenizer(path: Path, cfg: models.LmConfig) -> sentencepiece.SentencePieceProcessor:
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ModelFilesError(f"{path}: not a sentencepiece model ({e}).") from None
    if sp.vocab_size() != cfg.text_card:
        raise ModelFilesError(
            f"{path}: the text tokenizer has {sp.vocab_size()} pieces but the model's text "
            f"vocabulary has {cfg.text_card} (text_card): the tokenizer and the config do not "
            "belong to the same model.")
    return sp


@dataclass(frozen=True)
class MemoryOptions:
    """The user's memory flags: `kv_bits` (4, 8; None: an unquantized KV cache), `context`
    (steps; None: the model's), `ignore_memory`: load even when the preflight finds that the
    model does not fit; `streams`: streams served at once (a server's `--batch-size`), each of
    `rows_per_stream` rows (2 with classic guidance); `spare_mimis`: Mimi processes kept loaded
    for the next stream (a server's, one a service)."""

    kv_bits: int | None = None
    context: int | None = None
    ignore_memory: bool = False
    streams: int = 1
    rows_per_stream: int = 1
    spare_mimis: int = 0


def load_model(files: ModelFiles, warmup: bool = True, options: MemoryOptions | None = None):
    """Builds and loads Moshi, as `mlx_lm.utils.load` does for its models. First the memory
    preflight (`memory.choose`) picks the KV cache the model's steps will use (the model's
    `kv_bits` and `kv_context`).

    Args:
        files: the model's files (`resolve`).
        warmup: run one step, so that the first real one is not slower.
        options: the memory flags (KV cache bits, context, ignore the preflight); None: defaults.

    Returns:
        (model `models.Lm`, text tokenizer `sentencepiece.SentencePieceProcessor`, config
        `models.LmConfig`).

    Raises:
        memory.NotEnoughMemory: the model does not fit (unless `options.ignore_memory`).
        ModelFilesError: the tokenizer is not one for this model.
        models.CheckpointError: the weights do not match the model (names, shapes,
            quantization).
    """
    cfg = files.lm_config
    options = options or MemoryOptions()
    text_tokenizer = load_text_tokenizer(files.tokenizer, cfg)
    memory.check_setup(cfg, options.kv_bits, options.context)
    sizes = memory.ModelSizes.of(files, options.streams, options.rows_per_stream,
                                  options.spare_mimis)
    setup = memory.choose(sizes, options.kv_bits, options.context, force=options.ignore_memory)
    model = models.Lm(cfg)
    model.kv_bits, model.kv_context = setup.kv_bits, setup.context
    log.info("KV cache: %s, %d steps", f"{setup.kv_bits}-bit" if setup.kv_bits else "unquantized",
             setup.context or cfg.context)
    model.set_dtype(mx.bfloat16)
    if files.quantization is not None:  # each module as the file holds it (mixed precision too)
        found = read_header(files.moshi_weight).tensors
        models.quantize(model, layout=module_quantization(found, model_tensors(model)))
    memory.wire_model_memory()
    log.info("loading %s", files.moshi_weight)
    if is_pytorch_layout(read_header(files.moshi_weight).tensors):  # Kyutai's TTS files
        load_pytorch_weights(model, files.moshi_weight)
    else:
        model.load_weights(str(files.moshi_weight), strict=True)
    if warmup:
        model.warmup()
    return model, text_tokenizer, cfg
