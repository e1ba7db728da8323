"""Every app checks its sampling flags the same way: values no model takes are usage errors
(exit code 2), a top-k above the model's vocabulary is one `error:` line (exit code 1) found
before the model is loaded."""

import pytest
from fake_audio import FakeSoundDevice

from moshi_mlx import cli, local, local_web, run_inference

APPS = {"local": local, "local_web": local_web, "run_inference": run_inference}
POSITIONAL = {"run_inference": ["in.wav", "out.wav"]}


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("flags", [["--text-temp", "nan"], ["--audio-temp", "-inf"],
                                   ["--audio-top-k", "-5"], ["--text-top-k", "many"]])
def test_values_no_model_takes_are_usage_errors(app, flags, capsys):
    with pytest.raises(SystemExit) as e:
        APPS[app].parse_args([*POSITIONAL.get(app, []), *flags])
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and flags[0] in errors[0], errors


@pytest.mark.parametrize("app", ["local", "local_web"])
def test_top_k_above_the_vocabulary_is_one_error_line(app, demo_env, monkeypatch, capsys):
    FakeSoundDevice.install(monkeypatch)
    loaded = []
    monkeypatch.setattr("moshi_mlx.model_files.load_model", lambda *a, **k: loaded.append(a))
    code = APPS[app].main(["--demo", "--no-browser", "--audio-top-k", "4096"]
                          if app == "local_web" else ["--demo", "--audio-top-k", "4096"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and errors == [
        "error: --audio-top-k must be an integer from 0 to 2048 (0 or 2048 keeps every token), "
        "got 4096"], err
    assert loaded == [] and "Traceback" not in err


def test_make_samplers_takes_the_vocabularies_from_the_config(tiny_cfg):
    args = local.parse_args(["--text-top-k", str(tiny_cfg.text_card),
                             "--audio-top-k", "0", "--audio-temp", "0"])
    text, audio = cli.make_samplers(args, tiny_cfg)
    assert (text.temp, text.top_k, text.top_p) == (0.7, tiny_cfg.text_card, 1.0)
    assert (audio.temp, audio.top_k, audio.top_p) == (0.0, 0, 1.0)


@pytest.mark.parametrize("flags, message", [
    (["--text-temp", "nan"], "--text-temp must be 0 (greedy) or a finite number above 0, got nan"),
    (["--audio-temp", "inf"], "--audio-temp must be 0 (greedy) or a finite number above 0"),
    (["--audio-temp", "1e309"], "--audio-temp must be 0 (greedy) or a finite number above 0"),
    (["--audio-temp", "-0.5"], "--audio-temp must be 0 (greedy) or a finite number above 0"),
    (["--text-top-k", "-1"], "--text-top-k must be an integer >= 0 (0 keeps every token)"),
    (["--audio-top-k", "1e3"], "argument --audio-top-k: invalid int value: '1e3'"),
    (["--kv-bits", "3"], "argument --kv-bits: invalid choice: 3 (choose from 4, 8)"),
    (["--context", "0"], "argument --context: must be at least 1, got 0"),
    (["--context", "2.5"], "argument --context: not a whole number: '2.5'"),
])
def test_each_usage_error_names_its_flag_and_range(capsys, flags, message):
    """Sampling and memory flags: one `error:` line with the exact message, exit code 2."""
    with pytest.raises(SystemExit) as e:
        run_inference.parse_args(["in.wav", "out.wav", *flags])
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
