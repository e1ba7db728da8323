"""A model's files, by job: `hub` (the Hugging Face Hub, `hf://` addresses), `demo` (the demo
repository), `resolve` (the model-file flags -> local files), `memory` (the preflight), `load`
(loading Moshi). The package gathers their public names, which the apps and users import from
here (README's "Model files")."""

from .demo import DEMO_VERSION, cache_dir, demo_repo
from .errors import HubFileMissing, HubUnreachable, ModelFilesError
from .hub import parse_hf_uri
from .load import MemoryOptions, load_model, load_text_tokenizer
from .resolve import (
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
