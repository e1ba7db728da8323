"""Finding, downloading and loading the files every app needs: Moshi's weights, its config, Mimi's
weights and the text tokenizer.

Files come from a Hugging Face repository (Kyutai's defaults, picked by `-q`), from local paths,
from `hf://owner/repo/file` addresses, or from the small demo repository (`--demo`), built once in
the user's cache directory so that every app runs with no download.
"""

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import sentencepiece
from huggingface_hub import errors as hub_errors

from . import __version__, memory, models
from .models.checkpoint import (
    Quantization,
    describe,
    model_tensors,
    module_quantization,
    quantization_of,
    read_header,
)

log = logging.getLogger(__name__)

DEFAULT_REPOS = {
    None: "kyutai/moshiko-mlx-bf16",
    8: "kyutai/moshiko-mlx-q8",
    4: "kyutai/moshiko-mlx-q4",
}
DEFAULT_MOSHI_NAME = "model.safetensors"
DEFAULT_MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
DEFAULT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
CONFIG_NAME = "config.json"
DEMO_VERSION = __version__
HF_PREFIX = "hf://"


class ModelFilesError(Exception):
    """A model file that cannot be found, downloaded or used; the message says what to do."""


class HubUnreachable(ModelFilesError):
    """The Hub could not be reached and the file is not in the local cache."""


class HubFileMissing(ModelFilesError):
    """The repository exists but has no such file."""


@dataclass(frozen=True)
class ModelFiles:
    """Local paths of everything a Moshi app loads, and the quantization of the weights
    (read off the file's header; None for bf16)."""

    lm_config: models.LmConfig
    moshi_weight: Path
    mimi_weight: Path
    tokenizer: Path
    quantization: Quantization | None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Registers the model-file flags shared by every app."""
    group = parser.add_argument_group("model files")
    group.add_argument(
        "-q", "--quantized", type=int, choices=[4, 8], default=None,
        help="weights quantized to 4 or 8 bits (default: bf16); picks Kyutai's matching "
             "repository and file name")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--hf-repo", metavar="OWNER/REPO",
        help="Hugging Face repository to take the files from (default: "
             f"{DEFAULT_REPOS[None]}, or its -q8/-q4 sibling with -q)")
    where.add_argument(
        "--demo", action="store_true",
        help="use a small random demo model, built once in the cache directory: no download")
    for flag, what in (("--moshi-weight", "Moshi's weights (.safetensors)"),
                       ("--mimi-weight", "Mimi's weights (.safetensors)"),
                       ("--tokenizer", "the text tokenizer (sentencepiece .model)"),
                       ("--lm-config", "the model's config.json")):
        group.add_argument(flag, metavar="PATH", help=f"{what}: a local path or hf://owner/repo/file")


# --- Hugging Face Hub ----------------------------------------------------------------------------

def parse_hf_uri(uri: str) -> tuple[str, str]:
    """'hf://owner/repo/path/to/file' -> ('owner/repo', 'path/to/file')."""
    parts = uri.removeprefix(HF_PREFIX).split("/", 2)
    if not uri.startswith(HF_PREFIX) or len(parts) < 3 or not all(parts):
        raise ModelFilesError(f"'{uri}': expected hf://owner/repo/file")
    return f"{parts[0]}/{parts[1]}", parts[2]


def hub_download(repo_id: str, filename: str, local_only: bool = False) -> Path:
    """Downloads one file through huggingface_hub (its cache and progress bars), turning its
    errors into `ModelFilesError`s that say what to do."""
    where = f"{repo_id}/{filename}"
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=local_only))
    except hub_errors.LocalEntryNotFoundError:
        raise HubUnreachable(
            f"cannot reach the Hugging Face Hub to download {where}, and it is not in the local "
            "cache. Check your connection (set HF_HUB_OFFLINE=1 to use cached files only), pass "
            "local files with --moshi-weight, --mimi-weight, --tokenizer and --lm-config, or try "
            "--demo, a small model that needs no download.") from None
    except hub_errors.GatedRepoError:
        raise ModelFilesError(
            f"{repo_id} is gated: accept its terms on huggingface.co and log in with "
            "`hf auth login`.") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelFilesError(
            f"repository {repo_id} not found on the Hugging Face Hub (or it is private: log in "
            "with `hf auth login`). Check --hf-repo or the hf:// address.") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelFilesError(f"{repo_id}: revision not found.") from None
    except hub_errors.EntryNotFoundError:
        raise HubFileMissing(f"{repo_id} has no file '{filename}'.") from None
    except hub_errors.HFValidationError as e:
        raise ModelFilesError(f"'{repo_id}': not a valid repository id ({e}).") from None
    except hub_errors.HfHubHTTPError as e:
        raise ModelFilesError(f"downloading {where} failed: {e}") from None
    except OSError as e:
        raise ModelFilesError(f"downloading {where} failed: {e}") from None


# --- Demo repository -----------------------------------------------------------------------------

def cache_dir() -> Path:
    """moshi_mlx's cache directory: $XDG_CACHE_HOME/moshi_mlx (default ~/.cache/moshi_mlx)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moshi_mlx"


def demo_repo() -> Path:
    """The demo repository, built on first use (in a temporary directory renamed into place, so
    an interrupted build leaves nothing half-written and concurrent builds do not clash)."""
    target = cache_dir() / f"demo-{DEMO_VERSION}"
    if target.is_dir():
        return target
    from moshi_mlx.weights.demo import build_demo_repo

    def cannot_build(e: OSError) -> ModelFilesError:
        return ModelFilesError(f"cannot build the demo model in {target.parent} "
                               f"({e.strerror or e}): set XDG_CACHE_HOME to a writable directory.")

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as e:
        raise cannot_build(e) from None
    log.info("building the demo model in %s (once)", target)
    try:
        build_demo_repo(tmp)
        os.rename(tmp, target)
    except OSError as e:
        if not target.is_dir():  # else another process built it first
            raise cannot_build(e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- Resolution ----------------------------------------------------------------------------------

class _Source:
    """Where file names from a config are looked up: a local directory or a Hub repository."""

    def __init__(self, repo_id: str | None = None, directory: Path | None = None):
        self.repo_id = repo_id
        self.directory = directory
        self.hub_reachable = True

    def get(self, name: str) -> Path:
        if name.startswith(HF_PREFIX):
            return hub_download(*parse_hf_uri(name), local_only=not self.hub_reachable)
        if self.directory is not None:
            return _local_file(self.directory / name)
        return hub_download(self.repo_id, name, local_only=not self.hub_reachable)

    def config(self) -> dict | None:
        """The source's config.json, or None when it has none. When the Hub cannot be reached,
        None too, and the next files are taken from the local cache only (so a cached model runs
        offline, and a missing one fails at once with the 'cannot reach' message)."""
        if self.directory is not None:
            path = self.directory / CONFIG_NAME
            return _read_json(path) if path.is_file() else None
        try:
            return _read_json(self.get(CONFIG_NAME))
        except HubFileMissing:
            return None
        except HubUnreachable:
            self.hub_reachable = False
            return None


def _local_file(path: Path) -> Path:
    if not path.is_file():
        raise ModelFilesError(f"{path}: no such file.")
    return path


def _fetch(value: str, source: _Source) -> Path:
    """A flag's value: an hf:// address or a local path."""
    if value.startswith(HF_PREFIX):
        return source.get(value)
    return _local_file(Path(value).expanduser())


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFilesError(f"{path}: not a readable JSON config ({e}).") from None
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path}: a model config must be a JSON object.")
    return data


def quantized_name(name: str, bits: int | None) -> str:
    """Kyutai's naming of quantized files: 'model.safetensors' -> 'model.q4.safetensors' with
    `bits=4`. A name that already says its quantization (or bits None) is kept."""
    if bits is None or re.search(r"\.q\d+\.[^.]+$", name):
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.q{bits}.{ext}" if dot else f"{name}.q{bits}"


def check_quantization(path: Path, bits: int | None) -> Quantization | None:
    """The weights' quantization, read off the file's header (None: bf16). Without `-q`
    (`bits` None) the header decides; a `-q` that contradicts it is an error."""
    header = read_header(path)
    found = quantization_of(header.tensors)
    if bits is None:
        if found is not None:
            log.info("%s holds %s weights", path.name, found)
        return found
    if found is not None and found.bits == bits:
        return found
    holds = f"{path} holds {describe(header.tensors)}"
    if found is None:
        raise ModelFilesError(f"{holds} but -q {bits} was given: run without -q.")
    raise ModelFilesError(f"{holds} but -q {bits} was given: run with -q {found.bits} "
                          "(or without -q).")


def resolve(args: argparse.Namespace) -> ModelFiles:
    """Turns the flags of `add_model_args` into local files, downloading what is needed.

    A file flag wins; otherwise the file is named by the config (`moshi_name`, `mimi_name`,
    `tokenizer_name`: a name in the repository, or an hf:// address) or by Kyutai's default name,
    with `-q N` turning 'model.safetensors' into 'model.qN.safetensors'. The config is
    `--lm-config`, else the repository's config.json when a file must come from the repository,
    else Moshi 7B v0.1. The weights' quantization is read off their header: `-q` is checked
    against it before anything is loaded, and without `-q` the header decides.
    """
    bits = args.quantized
    if args.demo:
        source = _Source(directory=demo_repo())
    else:
        source = _Source(repo_id=args.hf_repo or DEFAULT_REPOS[bits])
    needs_repo = None in (args.moshi_weight, args.mimi_weight, args.tokenizer)
    if args.lm_config:
        raw = _read_json(_fetch(args.lm_config, source))
    else:
        raw = source.config() if needs_repo else None
    if raw is None:
        raw = models.config_v0_1().to_config_dict()
    lm_config = models.LmConfig.from_config_dict(raw)

    def file(flag: str | None, key: str, default: str) -> Path:
        if flag:
            return _fetch(flag, source)
        name = lm_config.extra.get(key, default)
        try:
            return source.get(quantized_name(name, bits) if key == "moshi_name" else name)
        except HubFileMissing as e:
            hint = " Pass -q 4 or -q 8 for a quantized repository." if key == "moshi_name" else ""
            raise ModelFilesError(f"{e}{hint} Name the file with the matching flag (a path or "
                                  "hf://owner/repo/file), or pick another --hf-repo.") from None

    moshi_weight = file(args.moshi_weight, "moshi_name", DEFAULT_MOSHI_NAME)
    quantization = check_quantization(moshi_weight, bits)
    mimi_weight = file(args.mimi_weight, "mimi_name", DEFAULT_MIMI_NAME)
    tokenizer = file(args.tokenizer, "tokenizer_name", DEFAULT_TOKENIZER_NAME)
    for what, path in (("Moshi", moshi_weight), ("Mimi", mimi_weight), ("tokenizer", tokenizer)):
        log.info("%s: %s", what, path)
    return ModelFiles(lm_config, moshi_weight, mimi_weight, tokenizer, quantization)


# --- Loading -------------------------------------------------------------------------------------

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
    model does not fit."""

    kv_bits: int | None = None
    context: int | None = None
    ignore_memory: bool = False


def load_model(files: ModelFiles, warmup: bool = True, options: MemoryOptions | None = None):
    """Builds and loads Moshi: -> (model `models.Lm`, text tokenizer, config). First the memory
    preflight (`memory.choose`) picks the KV cache the model's steps will use (the model's
    `kv_bits` and `kv_context`), or raises `memory.NotEnoughMemory`."""
    cfg = files.lm_config
    options = options or MemoryOptions()
    text_tokenizer = load_text_tokenizer(files.tokenizer, cfg)
    memory.check_setup(cfg, options.kv_bits, options.context)
    setup = memory.choose(memory.ModelSizes.of(files), options.kv_bits, options.context,
                          force=options.ignore_memory)
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
    model.load_weights(str(files.moshi_weight), strict=True)
    if warmup:
        model.warmup()
    return model, text_tokenizer, cfg
