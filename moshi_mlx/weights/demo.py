"""Builds a small random Moshi repository, laid out like Kyutai's Hugging Face ones, so the apps
can be tried and tested end to end without downloading 16 GB. `--kind` picks the model family:
moshi (speech dialogue), hibiki (speech translation: a `description` conditioner, guidance,
acoustic delay 2, a depformer weight schedule and low-rank embeddings), stt (speech to text:
text only, voice-activity heads, `stt_config`) or tts (text to speech, the layout of
kyutai/tts-1.6b-en_fr: cross-attention to speaker embeddings, `cfg` and `control` conditioners,
a demuxed lookahead text stream, `tts_config`). Files:

    config.json                                   small config + the file names below
    model.safetensors, model.q8.safetensors, model.q4.safetensors    random LM, bf16 / q8 / q4
    tokenizer-e351c8d8-checkpoint125.safetensors  random Mimi that rustymimi loads
    tokenizer_spm_demo.model                      sentencepiece, vocabulary = text_card

Every file is written under a temporary name and renamed when complete; the same seed gives
byte-identical files.
"""

import json
from pathlib import Path

from moshi_mlx.models import LmConfig

from ..utils.output import atomic_path
from .common import ToolError, demo_config
from .demo_mimi import write_random_mimi
from .demo_text import train_tokenizer
from .mimi_layout import MIMI_FILE
from .quantize import quantize_file
from .random_weights import write_random_lm

MOSHI_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer_spm_demo.model"
QUANTIZED = {8: "model.q8.safetensors", 4: "model.q4.safetensors"}


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


KINDS = ("moshi", "hibiki", "stt", "tts")
HIBIKI_VALUES = ["very_bad", "bad", "neutral", "good", "very_good"]


def kind_config(kind: str) -> LmConfig:
    """The demo config of a model family (all share the demo's widths and vocabularies)."""
    base = demo_config().to_config_dict()
    if kind == "hibiki":
        dep_q = base["dep_q"]
        base |= {
            "delays": [0] + ([0] + [2] * (dep_q - 1)) * 2,
            "depformer_weights_per_step_schedule": [*range(dep_q - 2), dep_q - 2, dep_q - 2],
            "depformer_low_rank_embeddings": 64,
            "conditioners": {"description": {"type": "lut", "lut": {
                "n_bins": 31, "dim": 16, "tokenizer": "noop", "possible_values": HIBIKI_VALUES}}},
            "fuser": {"sum": ["description"]},
        }
    elif kind == "stt":
        n_q = base["n_q"] - base["dep_q"]
        base |= {"n_q": n_q, "dep_q": 0, "delays": [0] * (n_q + 1), "extra_heads_num_heads": 4,
                 "extra_heads_dim": 6,
                 "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}}
    elif kind == "tts":
        base |= tts_fields(base["dim"], dep_q=8)
    elif kind != "moshi":
        raise ToolError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return LmConfig.from_config_dict(base)


def tts_fields(dim: int, dep_q: int) -> dict:
    """The config keys that make a Kyutai TTS model (those of kyutai/tts-1.6b-en_fr), for a
    model `dim` wide generating `dep_q` codebooks."""
    cfg_values = ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]
    return {
        "n_q": dep_q, "dep_q": dep_q, "delays": [0, 0] + [2] * (dep_q - 1),
        "depformer_weights_per_step_schedule": [*range(dep_q // 2), *[dep_q // 2] * (dep_q // 2)],
        "depformer_low_rank_embeddings": 64, "demux_second_stream": True,
        "cross_attention": True,
        "conditioners": {
            "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
            "cfg": {"type": "lut", "lut": {"n_bins": len(cfg_values), "dim": 16,
                                           "tokenizer": "noop", "possible_values": cfg_values}},
            "control": {"type": "lut", "lut": {"n_bins": 1, "dim": dim, "tokenizer": "noop",
                                               "possible_values": ["ok"]}},
        },
        "fuser": {"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1,
                  "sum": ["control", "cfg"], "prepend": [], "cross": ["speaker_wavs"]},
        "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2},
        "model_id": {"sig": "demo", "epoch": 0},
    }


def build_demo_repo(outdir: str | Path, seed: int = 0, kind: str = "moshi") -> Path:
    """Writes the demo repository of `kind` (see `KINDS`) into `outdir` (created if needed)
    and returns its path."""
    outdir = Path(outdir)
    cfg = kind_config(kind)
    outdir.mkdir(parents=True, exist_ok=True)
    config = {**cfg.to_config_dict(), "moshi_name": MOSHI_NAME, "mimi_name": MIMI_FILE,
              "tokenizer_name": TOKENIZER_NAME}
    if kind != "moshi":
        config["model_type"] = kind
    write_bytes(outdir / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    write_random_lm(outdir / MOSHI_NAME, cfg, seed)
    for bits, name in QUANTIZED.items():
        quantize_file(outdir / MOSHI_NAME, outdir / name, bits=bits,
                      config=outdir / "config.json", progress=False)
    write_random_mimi(outdir / MIMI_FILE, seed)
    write_bytes(outdir / TOKENIZER_NAME, train_tokenizer(cfg.text_card))
    return outdir
