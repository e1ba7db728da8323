"""Turning the model-file flags into local files: Moshi's weights, its config, Mimi's weights and
the text tokenizer, from a Hugging Face repository (Kyutai's defaults, picked by `-q`), local
paths, `hf://owner/repo/file` addresses or the demo repository; the weights' quantization read
off their header."""

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..utils.safetensors import Quantization, describe, quantization_of, read_header
from .demo import demo_repo
from .errors import HubFileMissing, HubUnreachable, ModelFilesError
from .hub import FILE_PREFIX, HF_PREFIX, hub_download, parse_hf_uri

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
    # Kyutai's local and local_web spell the weights' flags in the singular, its run_inference
    # in the plural: both are taken.
    for flags, what in ((("--moshi-weight", "--moshi-weights"), "Moshi's weights (.safetensors)"),
                        (("--mimi-weight", "--mimi-weights"), "Mimi's weights (.safetensors)"),
                        (("--tokenizer",), "the text tokenizer (sentencepiece .model)"),
                        (("--lm-config",), "the model's config.json")):
        group.add_argument(*flags, metavar="PATH",
                           help=f"{what}: a local path or hf://owner/repo/file")


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
    """A flag's value: an hf:// address or a local path (file://path too)."""
    if value.startswith(HF_PREFIX):
        return source.get(value)
    return _local_file(Path(value.removeprefix(FILE_PREFIX)).expanduser())


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
    return _resolve(args, source)


def resolve_repo(repo_or_dir: str) -> ModelFiles:
    """A model's files from a Hub repository ('kyutai/stt-1b-en_fr-mlx') or a local directory
    holding a repository's files, as its config.json names them (the servers' `--stt`)."""
    path = Path(repo_or_dir).expanduser()
    source = _Source(directory=path) if path.is_dir() else _Source(repo_id=repo_or_dir)
    none = argparse.Namespace(quantized=None, moshi_weight=None, mimi_weight=None,
                              tokenizer=None, lm_config=None)
    return _resolve(none, source)


def _resolve(args: argparse.Namespace, source: _Source) -> ModelFiles:
    bits = args.quantized
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
