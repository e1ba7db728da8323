"""`python -m moshi_mlx.run_tts` on the random TTS demo repository (`--demo`), voices from a
Hub mocked at `huggingface_hub.hf_hub_download` (tests/test_model_files.py's FakeHub): the
JSONL requests' outputs, stdin text, and bad input giving one `error:` line and no file."""

import io
import json

import huggingface_hub
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import read_24k, write_pcm16
from test_model_files import FakeHub

from moshi_mlx import run_tts

pytestmark = pytest.mark.slow  # the app, Mimi's process

SUFFIX = ".demo@0.safetensors"  # the demo config's model_id


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An XDG cache holding the TTS demo repository, built once."""
    root = tmp_path_factory.mktemp("tts-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        run_tts.demo_repo(kind="tts")
    return root


def voice_file(path, frames=10, channels=512, seed=0, key="speaker_wavs"):
    rng = np.random.default_rng(seed)
    mx.save_safetensors(str(path), {key: mx.array(rng.standard_normal((1, channels, frames)),
                                                  mx.float32)})
    return path


@pytest.fixture
def env(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.chdir(tmp_path)
    hub = FakeHub(tmp_path / "hub")
    (tmp_path / "hub").mkdir()
    for i, name in enumerate(("alice", "bob")):
        path = voice_file(tmp_path / "hub" / f"{name}.safetensors", seed=i)
        hub.files[("kyutai/tts-voices", name + SUFFIX)] = path
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    return tmp_path


def run(capsys, *argv) -> tuple[int, str]:
    code = run_tts.main([*argv, "--demo", "--nq", "4", "--seed", "1"])
    return code, capsys.readouterr()


def write_jsonl(path, *requests):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in requests))
    return path


def test_requests_give_wav_frames_and_transcript(env, capsys):
    jsonl = write_jsonl(env / "in.jsonl",
                        {"turns": ["Hello there.", "Fine, thanks."], "voices": ["alice", "bob"],
                         "id": "two"},
                        {"turns": ["One <break time=\"1s\"/> two."], "voices": ["alice"],
                         "id": "one"})
    code, out = run(capsys, str(jsonl), "--out-folder", "out", "--padding-bonus", "1.5")
    assert code == 0, out.err
    for rid, words in (("two", ["Hello", "there.", "Fine,", "thanks."]), ("one", ["One", "two."])):
        info = json.loads((env / "out" / f"{rid}.json").read_text())
        assert [w for w, _ in info["transcript"]] == words
        assert info["nq"] == 4 and info["padding_bonus"] == 1.5
        assert info["cfg"] == "2.0" and info["cfg_coef"] == 1.0  # as Kyutai's: no classic CFG
        steps = [s for _, s in info["transcript"]]
        assert steps == sorted(steps) and info["end_step"] > steps[-1]
        frames = mx.load(str(env / "out" / f"{rid}.safetensors"))["frames"]
        assert frames.shape[0] == 4  # the codebooks
        pcm = read_24k(env / "out" / f"{rid}.wav", 1)
        assert len(pcm) == frames.shape[1] * 1920  # a frame of codes per 80 ms of audio
        assert len(info["logged_text_tokens"]) == info["end_step"] + 16 + 4  # delay, final
    one = json.loads((env / "out" / "one.json").read_text())
    assert one["transcript"][1][1] - one["transcript"][0][1] >= 12  # the 1 s break
    assert sorted(p.name for p in (env / "out").iterdir()) == [
        "one.json", "one.safetensors", "one.wav", "two.json", "two.safetensors", "two.wav"]


def test_only_wav_and_stdin_lines_quantized(env, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world.\n\nAnd more words.\n"))
    code, out = run(capsys, "-", "--voice", "bob", "--out-folder", "o", "--only-wav",
                    "--quantize", "8")
    assert code == 0, out.err
    said = [line.split()[1] for line in out.out.splitlines()]
    assert said == ["Hello", "world.", "And", "more", "words."]
    assert [p.name for p in (env / "o").iterdir()] == ["stdin.wav"]
    assert len(read_24k(env / "o" / "stdin.wav", 1)) > 0


def test_quantize_covers_cross_attention(env):
    """--quantize 4: every linear layer at 4 bits in groups of 32, cross-attention and the text
    head included (Kyutai's run_tts leaves them in bf16); the speaker conditioner,
    run once per text, stays exact."""
    model, *_ = run_tts.load(run_tts.parse_args(["-", "--demo", "--quantize", "4"]))
    layer = model.transformer.layers[0]
    linears = [m for module in (layer.cross_attention, layer.self_attn, layer.gating,
                                model.text_linear, model.depformer)
               for _, m in module.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert len(linears) > 6 and all(isinstance(m, nn.QuantizedLinear)
                                    and (m.bits, m.group_size) == (4, 32) for m in linears)
    speaker = model.condition_provider.conditioners["speaker_wavs"]
    assert type(speaker.output_proj) is nn.Linear


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1: not JSON"),
    ('{"turns": ["hi"], "voices": ["alice"], "id": "a", "prefix": "a.wav"}',
     "unknown key(s) 'prefix'"),
    ('{"turns": [], "voices": ["alice"], "id": "a"}', "'turns' must be a non-empty list"),
    ('{"turns": ["  "], "voices": ["alice"], "id": "a"}', "the turns have no text"),
    ('{"turns": ["hi"], "voices": ["alice"], "id": "../a"}', "'id' must be"),
    ('{"turns": ["hi"], "voices": ["nobody"], "id": "a"}', "unknown voice 'nobody'"),
    ('{"turns": ["hi"], "voices": [], "id": "a"}', "needs a voice"),
    ('{"turns": ["hi"], "voices": ["wide.safetensors"], "id": "a"}', "has shape [1, 256, 10]"),
    ('{"turns": ["hi"], "voices": ["other.safetensors"], "id": "a"}', "not a voice embedding"),
    (json.dumps({"turns": ["hi"], "voices": [f"{v}.safetensors" for v in "abcdef"], "id": "a"}),
     "at most 5"),
    ('{"turns": ["hi <break time=\\"2x\\"/>"], "voices": ["alice"], "id": "a"}',
     "break needs a time in seconds"),
])
def test_bad_input_is_one_error_line_and_no_file(env, capsys, line, message):
    voice_file(env / "wide.safetensors", channels=256)
    voice_file(env / "other.safetensors", key="embedding")
    for name in "abcdef":
        voice_file(env / f"{name}.safetensors")
    jsonl = write_jsonl(env / "in.jsonl", line)
    code, out = run(capsys, str(jsonl), "--out-folder", "out")
    assert code == 1
    errors = [x for x in out.err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.err
    assert not (env / "out").exists() or not list((env / "out").iterdir())


def test_bad_cfg_coef_and_missing_file(env, capsys):
    jsonl = write_jsonl(env / "in.jsonl", {"turns": ["hi"], "voices": ["alice"], "id": "a"})
    code, out = run(capsys, str(jsonl), "--cfg-coef", "1.7")
    assert code == 1 and "--cfg-coef 1.7: this model takes 1.0, 1.5" in out.err
    code, out = run(capsys, str(env / "missing.jsonl"))
    assert code == 1 and "no such file" in out.err


def test_a_file_without_requests_is_nothing_to_do(env, capsys):
    """As Kyutai's run_tts: exit code 0, the output folder made and left empty (a folder named
    '-' too: only stdin's text is played)."""
    for folder in ("o", "-"):
        code, out = run(capsys, str(write_jsonl(env / "empty.jsonl", "", "  ")),
                        "--out-folder", folder)
        assert code == 0 and "holds no request" in out.err and "error" not in out.err
        assert list((env / folder).iterdir()) == []


def test_a_number_as_id_names_the_files():
    """Kyutai's run_tts names the files f"{id}.wav" whatever the id's JSON type."""
    line = '{"turns": ["hi"], "voices": ["alice"], "id": %s}'
    assert [run_tts.parse_request(line % rid, 1).id for rid in ("7", "-2", "1.5")] == [
        "7", "-2", "1.5"]
    for rid in ("true", "null", "[1]", '""'):
        with pytest.raises(run_tts.RequestError, match="'id' must be"):
            run_tts.parse_request(line % rid, 1)


@pytest.mark.parametrize("flags, message", [
    (["--temp", "nan"], "--temp must be a finite number"),
    (["--max-padding", "-1"], "--max-padding must be >= 0"),
    (["--nq", "0"], "argument --nq: must be at least 1"),
    (["--quantize", "7"], "argument --quantize: invalid choice"),
])
def test_flag_values_no_model_takes_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_tts.parse_args(["in.jsonl", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def public(env):
    """A model as kyutai/tts-0.75b-en-public (no speaker conditioning, not cfg-distilled) with
    the demo's vocabularies and Mimi: its config and random weights."""
    from moshi_mlx.models import LmConfig
    from moshi_mlx.weights.random_weights import write_random_lm

    d = json.loads((run_tts.demo_repo(kind="tts") / "config.json").read_text())
    del d["conditioners"]["speaker_wavs"], d["conditioners"]["cfg"]
    d |= {"cross_attention": False, "fuser": {"sum": ["control"], "prepend": [], "cross": []}}
    (env / "public.json").write_text(json.dumps(d))
    write_random_lm(env / "public.safetensors", LmConfig.from_config_dict(d), seed=3)
    return ["--config", str(env / "public.json"),
            "--moshi-weights", str(env / "public.safetensors")]


def speech_wav(path, seconds=1.0):
    t = np.arange(int(24000 * seconds)) / 24000
    return write_pcm16(path, 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t), 24000)


def test_a_wav_voice_is_spoken_first_by_a_model_without_speakers(env, capsys, public):
    """The wav's Mimi codes (rustymimi's own encoding of the wav, frame by frame) are the first
    frames; the wav written and the frames saved leave them out, the word steps count them;
    the default --cfg-coef 2 guides this model with a second row."""
    import rustymimi

    from moshi_mlx.audio.mimi import Mimi
    from moshi_mlx.audio.wav import read_wav
    from moshi_mlx.engine.tts import voice_prefix

    voice = speech_wav(env / "me.wav")
    jsonl = write_jsonl(env / "in.jsonl", {"turns": ["Hello there."], "voices": ["me.wav"],
                                           "id": "p"})
    code, out = run(capsys, str(jsonl), "--out-folder", "out", *public)
    assert code == 0, out.err
    info = json.loads((env / "out" / "p.json").read_text())
    prefix = 13 - 2  # 1 s: 12.5 frames, the last partial one padded, 2 dropped (as Kyutai)
    assert info["start_step"] == prefix and info["cfg_coef"] == 2.0
    assert [w for w, _ in info["transcript"]] == ["Hello", "there."]
    assert info["transcript"][0][1] >= prefix + 2  # the initial padding after the prefix
    frames = np.array(mx.load(str(env / "out" / "p.safetensors"))["frames"])
    mimi_file = run_tts.demo_repo(kind="tts") / run_tts.MIMI_FILE
    pcm = np.pad(read_wav(voice, 24000), (0, 13 * 1920 - 24000))
    tokenizer = rustymimi.Tokenizer(str(mimi_file), num_codebooks=4)
    codes = [tokenizer.encode_step(f[None, None])[0, :, 0] for f in pcm.reshape(13, 1920)]
    mimi = Mimi(mimi_file, num_codebooks=4)
    try:
        assert (voice_prefix(mimi, read_wav(voice, 24000)) == np.stack(codes[:prefix], 1)).all()
    finally:
        mimi.close()
    assert all(fed == -1 for _, fed in info["logged_text_tokens"][:prefix])  # no text fed
    assert info["logged_text_tokens"][prefix][1] != -1  # during the prefix, then text
    pcm_out = read_24k(env / "out" / "p.wav", 1)
    assert frames.shape[0] == 4 and len(pcm_out) == frames.shape[1] * 1920
    assert frames.shape[1] == len(info["logged_text_tokens"]) - 18 - prefix  # delays 16 + 2


@pytest.mark.parametrize("voices, message", [
    (["alice.safetensors"], "'alice.safetensors' is a speaker embedding: this model takes no"),
    (["me.wav", "me.wav"], "2 voices given: this model takes one"),
    (["text.wav"], "text.wav: not a wav file"),
    (["short.wav"], "the voice's audio is too short"),
])
def test_bad_voices_of_a_model_without_speakers_are_one_error(env, capsys, public, voices,
                                                              message):
    voice_file(env / "alice.safetensors")
    speech_wav(env / "me.wav")
    speech_wav(env / "short.wav", seconds=0.15)
    (env / "text.wav").write_text("not audio")
    jsonl = write_jsonl(env / "in.jsonl", {"turns": ["hi"], "voices": voices, "id": "a"})
    code, out = run(capsys, str(jsonl), "--out-folder", "out", *public)
    errors = [x for x in out.err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(errors) == 1 and message in errors[0], out.err
    assert not (env / "out").exists() or not list((env / "out").iterdir())


def test_a_wav_voice_for_a_model_with_speakers_is_one_error(env, capsys):
    speech_wav(env / "me.wav")
    jsonl = write_jsonl(env / "in.jsonl", {"turns": ["hi"], "voices": ["me.wav"], "id": "a"})
    code, out = run(capsys, str(jsonl), "--out-folder", "out")
    assert code == 1 and "voice 'me.wav': this model takes speaker embeddings" in out.err


def test_a_voice_as_a_file_address(tmp_path, monkeypatch):
    """file://NAME, as Kyutai's run_tts reads it: the local file NAME with the model's suffix
    (or NAME), never the voice repository."""
    from moshi_mlx.model_files import ModelFilesError
    from moshi_mlx.model_files.voices import voice_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "v").mkdir()
    voice_file(tmp_path / "v" / f"alice{SUFFIX}")
    assert str(voice_path("file://v/alice", "kyutai/tts-voices", SUFFIX)) == f"v/alice{SUFFIX}"
    with pytest.raises(ModelFilesError, match="unknown voice 'file://v/bob'"):
        voice_path("file://v/bob", "kyutai/tts-voices", SUFFIX)
