"""Kyutai TTS voices: speaker embeddings (or, for a model without speaker conditioning, wavs) from
kyutai/tts-voices (by name), an hf:// address or a local file, checked before use."""

from pathlib import Path, PurePosixPath

import mlx.core as mx

from ..engine.speech_synthesis import EMBEDDING_CHANNELS
from ..models.tts import SPEAKER_KEY
from ..utils.safetensors import read_header
from .errors import HubFileMissing, ModelFilesError
from .hub import FILE_PREFIX, HF_PREFIX, hub_download, parse_hf_uri

DEFAULT_VOICE_REPO = "kyutai/tts-voices"


def voice_suffix(raw_config: dict) -> str:
    """The file suffix of a model's voices, from its config's `model_id`:
    '.{sig}@{epoch}.safetensors' (Kyutai's naming), or '' without one."""
    model_id = raw_config.get("model_id")
    if not isinstance(model_id, dict) or "sig" not in model_id:
        return ""
    return f".{model_id['sig']}@{model_id.get('epoch', 0)}.safetensors"


def voice_path(voice: str, voice_repo: str = DEFAULT_VOICE_REPO, suffix: str = "") -> Path:
    """A voice, found where Kyutai's run_tts looks: a local .safetensors (or .wav) file (the name
    with the model's `suffix` added, or the name; file://name: a local file only), an
    hf://owner/repo/file address (the suffix added unless it names a .safetensors file), or a
    name in `voice_repo`, a Hugging Face repository or a local directory (e.g.
    'expresso/ex03-ex01_happy_001_channel1_334s.wav', to which the suffix is added). A model
    without speaker conditioning has no suffix: its voices are wavs. Raises ModelFilesError for
    a voice that cannot be found."""
    if voice.startswith(HF_PREFIX):
        return hub_download(*parse_hf_uri(voice if voice.endswith(".safetensors")
                                          else voice + suffix))
    if voice.startswith(FILE_PREFIX):  # a local file only, as Kyutai's run_tts reads it
        name = voice.removeprefix(FILE_PREFIX)
        for local in (Path(name + suffix).expanduser(), Path(name).expanduser()):
            if local.is_file():
                return local
        raise ModelFilesError(f"unknown voice '{voice}': no file {name + suffix}")
    for local in (Path(voice + suffix).expanduser(), Path(voice).expanduser()):
        if local.suffix in (".safetensors", ".wav") and local.is_file():
            return local
    folder = Path(voice_repo).expanduser()
    if folder.is_dir():
        if (folder / (voice + suffix)).is_file():
            return folder / (voice + suffix)
    else:
        try:
            return hub_download(voice_repo, voice + suffix)
        except HubFileMissing:
            pass
    raise ModelFilesError(
        f"unknown voice '{voice}': {voice_repo} has no '{voice + suffix}' (the names are "
        "those of huggingface.co/kyutai/tts-voices without the suffix), and it is not a "
        "local .safetensors or .wav file.")


def named_voice(name: str, voice_repo: str = DEFAULT_VOICE_REPO, suffix: str = "") -> Path:
    """A voice by its name only (a server's clients name voices: no local path, no hf://
    address), in `voice_repo`, a Hugging Face repository or a local directory holding its
    files. Raises ModelFilesError for a voice not there."""
    parts = PurePosixPath(name).parts
    unknown = ModelFilesError(f"unknown voice '{name}' (not in {voice_repo})")
    if not parts or name.startswith(("/", HF_PREFIX)) or ".." in parts or "\\" in name:
        raise unknown
    folder = Path(voice_repo).expanduser()
    if folder.is_dir():
        path = folder.joinpath(*parts).with_name(parts[-1] + suffix)
        if not path.is_file():
            raise unknown
        return path
    try:
        return hub_download(voice_repo, name + suffix)
    except HubFileMissing:
        raise unknown from None


def load_voice(path: Path) -> mx.array:
    """A voice file's speaker embedding, `speaker_wavs` float32 [1, 512, frames]; raises
    ModelFilesError for a file that is not one."""
    header = read_header(path)
    info = header.tensors.get(SPEAKER_KEY)
    if info is None:
        raise ModelFilesError(f"{path}: not a voice embedding (no '{SPEAKER_KEY}' tensor; "
                              f"found {', '.join(sorted(header.tensors)) or 'nothing'}).")
    shape = tuple(info.shape)
    if len(shape) != 3 or shape[0] != 1 or shape[1] != EMBEDDING_CHANNELS or shape[2] < 1:
        raise ModelFilesError(f"{path}: '{SPEAKER_KEY}' has shape {list(shape)}, a voice "
                              f"embedding is [1, {EMBEDDING_CHANNELS}, frames].")
    return mx.load(str(path))[SPEAKER_KEY].astype(mx.float32)
