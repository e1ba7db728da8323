"""Our `run_tts` beside Kyutai's MLX `run_tts` (PyPI moshi_mlx 0.3.0, in `.venv-kyutai`, run as
a subprocess in a clean environment so that this package is not on its path) on the same files:
a random float32 TTS checkpoint in the layout Kyutai releases (PyTorch names, stacked attention
weights) at a tiny width of `kyutai/tts-1.6b-en_fr`'s config, the demo tokenizer, a random Mimi,
voices in a local folder, the same JSONL requests, greedy (`--temp 0`: Kyutai's sampler takes
the argmax, as ours does).

Where Kyutai's is right, both must write the same frames of codes (`ID.safetensors`), word
timestamps, consumption times, text tokens and end steps (`ID.json`). Where it is not, the test
asserts the difference: `--nq` and `--padding-bonus` have no effect on Kyutai's; its attention
reaches one step further back than the model's `context` (PyTorch's, and ours, attend to
`context` steps, the current one included). Not tested here, as it needs more than 4096 steps
(minutes on Kyutai's side): its rotating cache holds 4096 steps whatever the context, and past
them its window is taken from the wrong end of the rotated buffer.

Kyutai's Mimi decodes after the generation, one frame at a time, at about 1 s per 80 ms frame on
this 2-core CPU: both decoders are replaced by silence here (the wav is not compared, only its
length; the codes it would decode are).
"""

import json
import os
import subprocess
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import missing
from mlx.utils import tree_flatten

from moshi_mlx import run_tts
from moshi_mlx.engine import tts as tts_engine
from moshi_mlx.models import Lm, LmConfig
from moshi_mlx.weights.demo import kind_config
from moshi_mlx.weights.demo_mimi import write_random_mimi
from moshi_mlx.weights.demo_text import train_tokenizer
from moshi_mlx.weights.pytorch_layout import to_pytorch_layout

pytestmark = pytest.mark.slow  # Kyutai's run_tts in subprocesses

KYUTAI = Path(__file__).resolve().parents[1] / ".venv-kyutai" / "bin" / "python"
SUFFIX = ".1e68beda@240.safetensors"  # the voices' suffix, from model_id below
REQUESTS = [
    {"turns": ["Hello there, how are you doing today?"], "voices": ["voices/alice"], "id": "one"},
    {"turns": ["Hello there.", "Fine, thanks, and you?"], "voices": ["voices/alice", "voices/bob"],
     "id": "two"},
]
# Kyutai's run_tts with its Mimi decoder replaced by silence of the right length (see above).
SILENT_MIMI = """
import runpy, sys
import mlx.core as mx
from moshi_mlx.models import mimi
mimi.Mimi.decode_step = lambda self, codes: mx.zeros((codes.shape[0], 1, 1920))
sys.argv[0] = "run_tts"
runpy.run_module("moshi_mlx.run_tts", run_name="__main__", alter_sys=True)
"""


def tts_config(**changes) -> dict:
    """The demo TTS config (`kyutai/tts-1.6b-en_fr`'s keys, dim 256), 2 layers."""
    return kind_config("tts").to_config_dict() | {
        "num_layers": 2, "model_id": {"sig": "1e68beda", "epoch": 240}} | changes


def random_weights(cfg: LmConfig, seed: int = 0) -> dict[str, mx.array]:
    """float32 weights (not bf16 values) of `Lm(cfg)`: matrices normal with variance 1 / last
    dimension, token embeddings standard normal (the tokens weigh on the hidden state), norm
    scales around 1; the text head's "new word" and "pad" rows scaled up so that the model's
    own choice between them sets the word timestamps."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in tree_flatten(Lm(cfg).parameters()):
        noise = rng.standard_normal(p.shape).astype(np.float32)
        if p.ndim == 1:
            value = noise * 0.3 + (0 if name.endswith(".bias") else 1)
        elif "emb" in name.split(".")[-2] or name.endswith("learnt_padding"):
            value = noise
        else:
            value = noise * p.shape[-1] ** -0.5
        if name == "text_linear.weight":
            value[[0, 3]] *= 4  # new word, pad
        out[name] = mx.array(value)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder with config.json, model.safetensors (float32, Kyutai's released layout), the
    tokenizer, Mimi, voices/{alice,bob}SUFFIX, requests.jsonl (REQUESTS), one.jsonl (the
    first) and context{10,11}.json (the config with a short attention context)."""
    if not KYUTAI.exists():
        missing(f"Kyutai's moshi_mlx is needed by this test: make .venv-kyutai/.installed "
                f"(no {KYUTAI})")
    root = tmp_path_factory.mktemp("kyutai-tts")
    config = tts_config()
    (root / "config.json").write_text(json.dumps(config))
    for context in (CONTEXT, CONTEXT + 1):
        (root / f"context{context}.json").write_text(json.dumps(config | {"context": context}))
    cfg = LmConfig.from_config_dict(config)
    mx.save_safetensors(str(root / "model.safetensors"),
                        to_pytorch_layout(random_weights(cfg), cfg))
    (root / "tokenizer.model").write_bytes(train_tokenizer(cfg.text_card))
    write_random_mimi(root / "mimi.safetensors", num_codebooks=cfg.dep_q)
    (root / "voices").mkdir()
    rng = np.random.default_rng(1)
    for name in ("alice", "bob"):
        mx.save_safetensors(str(root / "voices" / f"{name}{SUFFIX}"), {"speaker_wavs": mx.array(
            rng.standard_normal((1, 512, 10)).astype(np.float32))})
    (root / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in REQUESTS))
    (root / "one.jsonl").write_text(json.dumps(REQUESTS[0]))
    return root


def model_flags(root: Path, config: str = "config.json") -> list[str]:
    return ["--config", str(root / config), "--tokenizer", str(root / "tokenizer.model"),
            "--mimi-weights", str(root / "mimi.safetensors"),
            "--moshi-weights", str(root / "model.safetensors")]


def kyutai_run_tts(root: Path, out: str, *flags: str, config: str = "config.json",
                   requests: str = "requests.jsonl") -> Path:
    """Kyutai's run_tts (`python -I`: no PYTHONPATH, no current directory on its path) in
    `root`, which holds the voices; -> its output folder."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(KYUTAI), "-I", "-c", SILENT_MIMI, *model_flags(root, config),
                           "--temp", "0", "--out-folder", out, *flags, requests],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / out


class SilentMimi:
    """Our Mimi decoder replaced by silence, as Kyutai's is (the codes are compared)."""

    def __init__(self, path, num_codebooks: int):
        pass

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.zeros(1920, np.float32)

    def close(self) -> None:
        pass


def our_run_tts(root: Path, out: str, *flags: str, config: str = "config.json",
                requests: str = "requests.jsonl") -> Path:
    """Our run_tts on the same files, in this process, in `root`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(tts_engine, "Mimi", SilentMimi)
        code = run_tts.main([*model_flags(root, config), "--temp", "0", "--out-folder", out,
                             *flags, requests])
    assert code == 0
    return root / out


def outputs(folder: Path, rid: str) -> tuple[np.ndarray, dict]:
    """(frames [n_q, T], the JSON) of request `rid`."""
    frames = np.array(mx.load(str(folder / f"{rid}.safetensors"))["frames"])
    return frames, json.loads((folder / f"{rid}.json").read_text())


COMPARED = ("transcript", "consumption_times", "logged_text_tokens", "end_step", "start_step")
SETTINGS = ("hf_repo", "voice_repo", "model_id", "cfg_coef", "temp", "max_padding",
            "initial_padding", "final_padding", "padding_between", "padding_bonus", "turns",
            "voices")


def test_greedy_outputs_match_kyutais_mlx_run_tts(files):
    """One and two speakers: the same codes, words, steps, text tokens and settings (ID.json)
    as Kyutai's."""
    theirs, ours = kyutai_run_tts(files, "kyutai"), our_run_tts(files, "ours")
    for request in REQUESTS:
        rid = request["id"]
        k_frames, k_info = outputs(theirs, rid)
        o_frames, o_info = outputs(ours, rid)
        assert o_frames.shape == k_frames.shape and o_frames.shape[0] == 8
        np.testing.assert_array_equal(o_frames, k_frames, err_msg=rid)
        for key in COMPARED + SETTINGS:
            assert o_info[key] == k_info[key], f"{rid}: {key}"
        assert [w for w, _ in o_info["transcript"]] == " ".join(request["turns"]).split()
        sampled = {s[0] for s, _ in o_info["logged_text_tokens"]}
        assert {0, 3} <= sampled, "the model's own choices should include new word and pad"
        for folder in (theirs, ours):  # the wav: a frame of codes per 80 ms
            with wave.open(str(folder / f"{rid}.wav")) as w:
                assert w.getnframes() == 1920 * k_frames.shape[1]


CONTEXT = 10  # steps of attention in the config of the window case


def test_where_kyutais_is_wrong_the_difference_is_asserted(files):
    """Kyutai's run_tts on a config whose attention `context` is 10 steps, with `--nq 4
    --padding-bonus 2`, writes what ours writes with a context of 11 and neither flag:
    - it accepts `--nq` and `--padding-bonus` and ignores both (its TTSModel stores them, its
      generation reads neither): 8 codebooks, the speed unchanged;
    - its attention keeps `context` steps besides the current one, one more than the model
      (PyTorch's `delta < context`, which ours matches: tests/test_tts_parity.py).
    Ours on the same files and flags honours them: 4 codebooks, slower speech, and with the
    context of the config (10) other codes than Kyutai's."""
    flags = ("--nq", "4", "--padding-bonus", "2")
    short, one = f"context{CONTEXT}.json", {"requests": "one.jsonl"}
    theirs = kyutai_run_tts(files, "k-window", *flags, config=short, **one)
    widened = our_run_tts(files, "o-widened", config=f"context{CONTEXT + 1}.json", **one)
    as_config = our_run_tts(files, "o-window", config=short, **one)
    honoured = our_run_tts(files, "o-flags", *flags, config=short, **one)
    k_frames, k_info = outputs(theirs, "one")
    w_frames, w_info = outputs(widened, "one")
    assert k_frames.shape[0] == 8 and k_frames.shape[1] > 2 * CONTEXT
    np.testing.assert_array_equal(k_frames, w_frames)
    for key in COMPARED:
        assert k_info[key] == w_info[key], key
    c_frames, c_info = outputs(as_config, "one")
    assert c_frames.shape != k_frames.shape or (c_frames != k_frames).any() or \
        c_info["logged_text_tokens"] != k_info["logged_text_tokens"]
    h_frames, h_info = outputs(honoured, "one")
    assert h_frames.shape[0] == 4 and h_info["nq"] == 4
    assert h_info["transcript"][-1][1] > c_info["transcript"][-1][1]  # later: slower
