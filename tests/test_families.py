"""Hibiki and STT end to end: `run_inference --hf-repo` on generated demo repositories of each
kind (`make_demo --kind`), the Hub mocked at `huggingface_hub.hf_hub_download`."""

import json
from math import ceil
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
import rustymimi
from conftest import DATA, RATE, read_24k, write_pcm16
from test_model_files import FakeHub

from moshi_mlx import families, model_files, models, run_inference, utils
from moshi_mlx.audio.constants import FRAME_SIZE
from moshi_mlx.engine import offline
from moshi_mlx.weights.demo import build_demo_repo
from moshi_mlx.weights.mimi_layout import MIMI_FILE

pytestmark = pytest.mark.slow  # the app on demo models, Hibiki's and STT's


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-repos")
    return {kind: build_demo_repo(root / kind, seed=5, kind=kind) for kind in ("hibiki", "stt")}


@pytest.fixture
def hub(tmp_path, monkeypatch, repos) -> FakeHub:
    """The demo repositories served as kyutai/hibiki-demo and kyutai/stt-demo."""
    fake = FakeHub(tmp_path / "hub")
    for kind, path in repos.items():
        for f in path.iterdir():
            fake.files[(f"kyutai/{kind}-demo", f.name)] = f
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """1.5 s of a modulated tone with noise, 24 kHz mono."""
    t = np.arange(int(1.5 * RATE)) / RATE
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    x += 0.05 * np.random.default_rng(0).normal(size=t.size)
    return write_pcm16(tmp_path_factory.mktemp("speech") / "in.wav", x, RATE)


def test_config_json_names_the_family(repos):
    kinds = {k: families.model_kind(models.LmConfig.from_config_dict(
        json.loads((p / "config.json").read_text()))) for k, p in repos.items()}
    assert kinds == {"hibiki": "hibiki", "stt": "stt"}
    assert families.model_kind(models.config_v0_1()) == "moshi"


def test_guidance_is_for_hibiki_only(repos):
    cfgs = {k: models.LmConfig.from_config_dict(json.loads((p / "config.json").read_text()))
            for k, p in repos.items()}
    families.check_cfg_coef(cfgs["hibiki"], 3.0)
    for cfg in (models.config_v0_1(), cfgs["stt"]):
        families.check_cfg_coef(cfg, 1.0)
        with pytest.raises(families.FamilyError, match="--cfg-coef needs a conditioned model"):
            families.check_cfg_coef(cfg, 3.0)


def test_stt_transcribes_with_word_times(hub, speech, tmp_path, capsys):
    """The transcript is the greedy text of the padded input (0.5 s text delay + 1 s after it),
    its words timed in the input's seconds; no wav is written."""
    report_path = tmp_path / "stt.json"
    argv = [str(speech), "--hf-repo", "kyutai/stt-demo", "--text-temp", "0", "--json",
            str(report_path)]
    assert run_inference.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["model_type"] == "stt" and report["output"] is None
    assert {name for _, name in hub.downloaded()} >= {
        "config.json", "model.safetensors", "tokenizer_spm_demo.model"}
    frames = ceil((int(1.5 * RATE) + int(1.5 * RATE)) / FRAME_SIZE)
    assert report["timing"]["steps"] == frames
    assert report["text"] == " ".join(printed.split())
    assert report["words"], "nothing was transcribed"
    for w in report["words"]:
        assert w["time"] == max(0.0, round(w["frame"] / 12.5 - 0.5, 3))

    # The same steps by hand: Mimi codes of the padded input into a greedy LmGen.
    files = model_files.resolve(run_inference.parse_args(argv))
    model, tokenizer, cfg = model_files.load_model(files, warmup=False)
    pcm = np.concatenate([read_24k(speech, 1)[:, 0].astype(np.float32),
                          np.zeros(int(1.5 * RATE), np.float32)])
    pcm = np.concatenate([pcm, np.zeros(frames * FRAME_SIZE - len(pcm), np.float32)])
    mimi = rustymimi.Tokenizer(str(files.mimi_weight), num_codebooks=cfg.n_q)
    gen = models.LmGen(model, text_sampler=utils.Sampler(temp=0))
    codes = [mimi.encode_step(pcm[None, None, f * FRAME_SIZE:(f + 1) * FRAME_SIZE])[0, :, 0]
             for f in range(frames)]
    tokens = [gen.step(mx.array(c.astype(np.int32)[None])).item() for c in codes]
    pieces = [tokenizer.id_to_piece(t).replace("▁", " ") for t in tokens if t not in (0, 3)]
    assert " ".join("".join(pieces).split()) == report["text"]


def test_stt_quantized(hub, speech, tmp_path):
    report_path = tmp_path / "stt.json"
    assert run_inference.main([str(speech), "--hf-repo", "kyutai/stt-demo", "-q", "8",
                               "--json", str(report_path)]) == 0
    assert ("kyutai/stt-demo", "model.q8.safetensors") in hub.downloaded()
    assert json.loads(report_path.read_text())["moshi_weight"].endswith("model.q8.safetensors")


def test_hibiki_translates_with_guidance(hub, speech, tmp_path, monkeypatch, capsys):
    """Voice and text; after the input, the end-of-input frame then silence until the text
    ends or the tail's limit (here 0.4 s, 5 steps); the voice covers every step once the
    codebook delays (2) have filled. Guidance changes the result for the same seed."""
    monkeypatch.setattr(families, "TRANSLATION_TAIL_SECONDS", 0.4)
    outputs = {}
    for coef, quant in (("3", []), ("1", []), ("3", ["-q", "4"])):
        out, report_path = tmp_path / "out.wav", tmp_path / "h.json"
        argv = [str(speech), str(out), "--hf-repo", "kyutai/hibiki-demo", "--cfg-coef", coef,
                "--seed", "4", "--json", str(report_path), *quant]
        assert run_inference.main(argv) == 0
        printed = capsys.readouterr().out
        report = json.loads(report_path.read_text())
        steps = ceil(int(1.5 * RATE) / FRAME_SIZE) + 1 + 5
        assert report["model_type"] == "hibiki" and report["cfg_coef"] == float(coef)
        assert report["timing"]["steps"] == steps
        pcm = read_24k(out, 1)[:, 0]
        assert len(pcm) == (steps - 2) * FRAME_SIZE
        assert np.sqrt(np.mean(pcm**2)) > 1e-3
        assert printed.strip()
        outputs[coef, bool(quant)] = out.read_bytes()
    assert outputs["3", False] != outputs["1", False]
    assert ("kyutai/hibiki-demo", "model.q4.safetensors") in hub.downloaded()


@pytest.mark.parametrize("argv, message", [
    (["--hf-repo", "kyutai/stt-demo", "--cfg-coef", "3"], "--cfg-coef needs a conditioned"),
    (["out.wav", "--hf-repo", "kyutai/stt-demo"], "this model (stt) has no voice"),
])
def test_family_misuse_is_one_clear_line_before_loading(hub, speech, capsys, argv, message):
    assert run_inference.main([str(speech), *argv]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "loading" not in err


def test_cfg_coef_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        run_inference.parse_args(["in.wav", "--cfg-coef", "nan"])
    assert e.value.code == 2
    assert "--cfg-coef must be a positive number" in capsys.readouterr().err


def test_make_demo_kinds_are_reproducible(repos, tmp_path):
    """Same seed, same bytes (the conditioner and low-rank tables included); the q8 file loads
    into the model `-q 8` builds."""
    again = build_demo_repo(tmp_path / "hibiki", seed=5, kind="hibiki")
    for name in ("config.json", "model.safetensors", "model.q8.safetensors"):
        assert (again / name).read_bytes() == (repos["hibiki"] / name).read_bytes(), name
    cfg = models.LmConfig.from_config_dict(json.loads((again / "config.json").read_text()))
    assert cfg.extra["model_type"] == "hibiki" and cfg.depformer_low_rank_embeddings == 64
    model = models.Lm(cfg)
    models.quantize(model, bits=8, group_size=64)
    model.load_weights(str(again / "model.q8.safetensors"), strict=True)


def test_hibiki_stops_when_its_text_ends(repos, monkeypatch):
    """After the input, the tail runs until the model samples the tokenizer's end of text: here
    the end of text is set to the token greedy decoding gives 3 steps into the tail."""
    files = model_files.ModelFiles(
        models.LmConfig.from_config_dict(json.loads((repos["hibiki"] / "config.json").read_text())),
        repos["hibiki"] / "model.safetensors", repos["hibiki"] / MIMI_FILE,
        repos["hibiki"] / "tokenizer_spm_demo.model", None)
    model, tokenizer, _ = model_files.load_model(files, warmup=False)
    greedy = utils.Sampler(temp=0)
    pcm = np.random.default_rng(1).normal(0, 0.1, 6 * FRAME_SIZE).astype(np.float32)

    def run_once() -> list[int]:
        conversation = families.conversation(model, tokenizer, files.mimi_weight, greedy, greedy,
                                             3.0)
        result = offline.run(conversation, pcm, families.offline_plan(conversation))
        return [f.token for f in result.frames]

    monkeypatch.setattr(families, "TRANSLATION_TAIL_SECONDS", 1.0)
    tokens = run_once()
    assert len(tokens) == 6 + 1 + 12
    eos = tokens[6 + 1 + 2]  # the token of the third silent step after the end-of-input frame
    first = tokens.index(eos, 6)  # where it first comes after the input
    monkeypatch.setattr(tokenizer, "eos_id", lambda: eos)
    assert run_once() == tokens[:first + 1]


def test_tts_models_are_sent_to_run_tts():
    cfg = models.LmConfig.from_config_dict(json.loads((DATA / "small_tts.json").read_text()))
    with pytest.raises(families.FamilyError, match="run_tts"):
        families.model_kind(cfg)
