"""The files every app needs, by job: `files.hub` (the Hugging Face Hub, `hf://` addresses),
`files.demo` (the demo repository), `files.resolve` (the model-file flags -> local files),
`files.memory` (the preflight), `files.load` (loading Moshi). This module gathers their public
names, which the apps and users import from here."""

from .files.demo import DEMO_VERSION, cache_dir, demo_repo
from .files.errors import HubFileMissing, HubUnreachable, ModelFilesError
from .files.hub import parse_hf_uri
from .files.load import MemoryOptions, load_model, load_text_tokenizer
from .files.resolve import (
    DEFAULT_REPOS,
    ModelFiles,
    add_model_args,
    quantized_name,
    resolve,
    resolve_repo,
)

__all__ = ["DEFAULT_REPOS", "DEMO_VERSION", "HubFileMissing", "HubUnreachable", "MemoryOptions",
           "ModelFiles", "ModelFilesError", "add_model_args", "cache_dir", "demo_repo",
           "load_model", "load_text_tokenizer", "parse_hf_uri", "quantized_name", "resolve",
           "resolve_repo"]
