"""File resolution shared by the apps. The Hub is mocked at `huggingface_hub.hf_hub_download`:
no test touches the network."""

import argparse
import json
import sys
import types
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import pytest
from huggingface_hub import errors as hub_errors

from moshi_mlx import model_files, models
from moshi_mlx.model_files import ModelFilesError
from moshi_mlx.models.checkpoint import Quantization

MIMI = "tokenizer-e351c8d8-checkpoint125.safetensors"
SPM = "tokenizer_spm_32k_3.model"
SMALL_CONFIG = Path(__file__).parent / "data" / "test_small.json"


def write_weights(path: Path, bits: int | None = None, dim: int = 64) -> Path:
    """A tiny safetensors file whose header reads as bf16 or as `bits`-bit Moshi weights."""
    tensors = {"out_norm.weight": mx.ones((dim,), mx.bfloat16)}
    if bits is None:
        tensors["text_linear.weight"] = mx.zeros((10, dim), mx.bfloat16)
    else:
        group = {4: 32, 8: 64}[bits]
        tensors["text_linear.weight"] = mx.zeros((10, dim * bits // 32), mx.uint32)
        tensors["text_linear.scales"] = mx.zeros((10, dim // group), mx.bfloat16)
        tensors["text_linear.biases"] = mx.zeros((10, dim // group), mx.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), tensors)
    return path


def hub_error(cls, message="from the fake hub"):
    return cls(message, response=types.SimpleNamespace(headers={}, request=None))


class FakeHub:
    """Stands in for `huggingface_hub.hf_hub_download`: serves files registered with `add`,
    raises what huggingface_hub 2.x raises for missing repositories and files, and, when
    `online` is False, what it raises when the Hub cannot be reached (only `cached` files are
    then served)."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[tuple[str, str], Path] = {}
        self.cached: set[tuple[str, str]] = set()
        self.online = True
        self.calls: list[tuple[str, str, bool]] = []

    def add(self, repo: str, name: str, bits: int | None = None, content: str | None = None,
            cached: bool = False) -> Path:
        path = self.root / repo / name
        if content is None and name.endswith(".safetensors"):
            write_weights(path, bits)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content or "data")
        self.files[(repo, name)] = path
        if cached:
            self.cached.add((repo, name))
        return path

    def add_kyutai_repo(self, repo: str, bits: int | None, config: dict | None = None):
        name = model_files.quantized_name("model.safetensors", bits)
        self.add(repo, name, bits)
        self.add(repo, MIMI)
        self.add(repo, SPM)
        if config is not None:
            self.add(repo, "config.json", content=json.dumps(config))

    def __call__(self, repo_id, filename, *, local_files_only=False, **kwargs):
        self.calls.append((repo_id, filename, local_files_only))
        key = (repo_id, filename)
        if local_files_only or not self.online:
            if key in self.cached:
                return str(self.files[key])
            raise hub_errors.LocalEntryNotFoundError(
                "An error happened while trying to locate the file on the Hub and we cannot "
                "find the requested files in the local cache.")
        if not any(repo == repo_id for repo, _ in self.files):
            raise hub_error(hub_errors.RepositoryNotFoundError)
        if key not in self.files:
            raise hub_error(hub_errors.RemoteEntryNotFoundError)
        return str(self.files[key])

    def downloaded(self) -> list[tuple[str, str]]:
        return [(repo, name) for repo, name, _ in self.calls]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    model_files.add_model_args(parser)
    return parser.parse_args(list(argv))


def small_config(**extra) -> dict:
    return {**json.loads(SMALL_CONFIG.read_text()), **extra}


@pytest.mark.parametrize("flags, repo, moshi_name", [
    ((), "kyutai/moshiko-mlx-bf16", "model.safetensors"),
    (("-q", "8"), "kyutai/moshiko-mlx-q8", "model.q8.safetensors"),
    (("-q", "4"), "kyutai/moshiko-mlx-q4", "model.q4.safetensors"),
])
def test_default_repository_and_file_names_follow_q(hub, flags, repo, moshi_name):
    bits = int(flags[1]) if flags else None
    hub.add_kyutai_repo(repo, bits)
    files = model_files.resolve(parse(*flags))
    names = ["config.json", moshi_name, MIMI, SPM]
    assert hub.downloaded() == [(repo, name) for name in names]
    assert files.moshi_weight == hub.files[(repo, moshi_name)]
    assert files.mimi_weight == hub.files[(repo, MIMI)]
    assert files.tokenizer == hub.files[(repo, SPM)]
    assert (files.quantization.bits if files.quantization else None) == bits
    assert files.lm_config.dim == 4096  # no config.json in the repository: Moshi 7B v0.1


def test_hf_repo_overrides_the_default(hub):
    hub.add_kyutai_repo("kyutai/moshika-mlx-q8", 8)
    files = model_files.resolve(parse("--hf-repo", "kyutai/moshika-mlx-q8", "-q", "8"))
    assert {repo for repo, _ in hub.downloaded()} == {"kyutai/moshika-mlx-q8"}
    assert files.moshi_weight == hub.files[("kyutai/moshika-mlx-q8", "model.q8.safetensors")]


def test_repository_config_json_names_the_files(hub):
    config = small_config(moshi_name="weights/moshi.q8.safetensors",
                          mimi_name="hf://other/codec/mimi.safetensors",
                          tokenizer_name="text.model")
    hub.add("me/model", "config.json", content=json.dumps(config))
    moshi = hub.add("me/model", "weights/moshi.q8.safetensors", bits=8)
    mimi = hub.add("other/codec", "mimi.safetensors")
    tokenizer = hub.add("me/model", "text.model")
    files = model_files.resolve(parse("--hf-repo", "me/model", "-q", "8"))
    assert (files.moshi_weight, files.mimi_weight, files.tokenizer) == (moshi, mimi, tokenizer)
    assert files.lm_config.dim == config["dim"]
    assert files.lm_config.extra["moshi_name"] == "weights/moshi.q8.safetensors"


def test_q_turns_the_config_moshi_name_into_its_quantized_sibling(hub):
    hub.add_kyutai_repo("me/model", 4, config=small_config(moshi_name="model.safetensors"))
    files = model_files.resolve(parse("--hf-repo", "me/model", "-q", "4"))
    assert files.moshi_weight.name == "model.q4.safetensors"
    assert files.quantization.bits == 4


@pytest.mark.parametrize("name, bits, expected", [
    ("model.safetensors", None, "model.safetensors"),
    ("model.safetensors", 4, "model.q4.safetensors"),
    ("dir/moshi.safetensors", 8, "dir/moshi.q8.safetensors"),
    ("model.q8.safetensors", 4, "model.q8.safetensors"),
])
def test_quantized_name(name, bits, expected):
    assert model_files.quantized_name(name, bits) == expected


def test_lm_config_flag_replaces_the_repository_config(hub, tmp_path):
    hub.add_kyutai_repo("kyutai/moshiko-mlx-bf16", None, config={"not": "used"})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(small_config()))
    files = model_files.resolve(parse("--lm-config", str(config)))
    assert ("kyutai/moshiko-mlx-bf16", "config.json") not in hub.downloaded()
    assert files.lm_config.dim == 256


def test_hf_addresses_in_flags(hub):
    moshi = hub.add("a/b", "sub/dir/w.q4.safetensors", bits=4)
    mimi = hub.add("c/d", "mimi.safetensors")
    tokenizer = hub.add("c/d", "spm.model")
    hub.add("e/f", "config.json", content=json.dumps(small_config()))
    files = model_files.resolve(parse(
        "-q", "4", "--moshi-weight", "hf://a/b/sub/dir/w.q4.safetensors",
        "--mimi-weight", "hf://c/d/mimi.safetensors", "--tokenizer", "hf://c/d/spm.model",
        "--lm-config", "hf://e/f/config.json"))
    assert (files.moshi_weight, files.mimi_weight, files.tokenizer) == (moshi, mimi, tokenizer)
    assert files.lm_config.dim == 256
    assert sorted(hub.downloaded()) == sorted(
        [("a/b", "sub/dir/w.q4.safetensors"), ("c/d", "mimi.safetensors"),
         ("c/d", "spm.model"), ("e/f", "config.json")])


def test_parse_hf_uri():
    assert model_files.parse_hf_uri("hf://kyutai/repo/a/b.bin") == ("kyutai/repo", "a/b.bin")
    for bad in ("hf://kyutai/repo", "hf://kyutai//file", "kyutai/repo/file"):
        with pytest.raises(ModelFilesError, match="hf://owner/repo/file"):
            model_files.parse_hf_uri(bad)


def test_local_files_need_no_hub(hub, tmp_path):
    moshi = write_weights(tmp_path / "m.safetensors")
    (tmp_path / "mimi.safetensors").write_text("x")
    (tmp_path / "spm.model").write_text("x")
    files = model_files.resolve(parse(  # Kyutai's plural flag and file:// address too
        "--moshi-weight", str(moshi), "--mimi-weights", f"file://{tmp_path}/mimi.safetensors",
        "--tokenizer", str(tmp_path / "spm.model")))
    assert hub.calls == []
    assert files.moshi_weight == moshi and files.mimi_weight == tmp_path / "mimi.safetensors"
    assert files.quantization is None
    assert files.lm_config.dim == 4096


def test_missing_local_file(hub, tmp_path):
    with pytest.raises(ModelFilesError, match="nope.safetensors: no such file"):
        model_files.resolve(parse("--moshi-weight", str(tmp_path / "nope.safetensors"),
                                  "--mimi-weight", "x", "--tokenizer", "y"))


@pytest.mark.parametrize("flag, file_bits, advice", [
    (4, None, "but -q 4 was given: run without -q"),
    (8, 4, r"but -q 8 was given: run with -q 4 \(or without -q\)"),
    (4, 8, r"but -q 4 was given: run with -q 8 \(or without -q\)"),
])
def test_q_that_does_not_match_the_file_is_caught_before_loading(hub, tmp_path, flag, file_bits,
                                                                  advice):
    hub.add_kyutai_repo(model_files.DEFAULT_REPOS[flag], flag)
    moshi = write_weights(tmp_path / "m.safetensors", file_bits)
    argv = ["--moshi-weight", str(moshi)] + (["-q", str(flag)] if flag else [])
    with pytest.raises(ModelFilesError, match=advice):
        model_files.resolve(parse(*argv))
    assert hub.downloaded() == [(model_files.DEFAULT_REPOS[flag], "config.json")]


@pytest.mark.parametrize("file_bits", [4, 8, None])
def test_without_q_the_quantization_comes_from_the_files_header(hub, tmp_path, file_bits):
    moshi = write_weights(tmp_path / "m.safetensors", file_bits)
    (tmp_path / "mimi.safetensors").write_text("x")
    (tmp_path / "spm.model").write_text("x")
    files = model_files.resolve(parse(
        "--moshi-weight", str(moshi), "--mimi-weight", str(tmp_path / "mimi.safetensors"),
        "--tokenizer", str(tmp_path / "spm.model")))
    expected = None if file_bits is None else Quantization(file_bits, {4: 32, 8: 64}[file_bits])
    assert files.quantization == expected


def test_unreachable_hub_says_how_to_proceed(hub):
    hub.add_kyutai_repo("kyutai/moshiko-mlx-q4", 4)
    hub.online = False
    with pytest.raises(model_files.HubUnreachable) as e:
        model_files.resolve(parse("-q", "4"))
    message = str(e.value)
    assert "cannot reach the Hugging Face Hub" in message
    assert "--moshi-weight" in message and "--demo" in message
    # One attempt on the network (config.json), then the local cache only: no second wait.
    assert hub.calls == [("kyutai/moshiko-mlx-q4", "config.json", False),
                         ("kyutai/moshiko-mlx-q4", "model.q4.safetensors", True)]


def test_unreachable_hub_uses_cached_files(hub):
    for name, bits in (("model.q8.safetensors", 8), (MIMI, None), (SPM, None)):
        hub.add("kyutai/moshiko-mlx-q8", name, bits, cached=True)
    hub.online = False
    files = model_files.resolve(parse("-q", "8"))
    assert files.moshi_weight == hub.files[("kyutai/moshiko-mlx-q8", "model.q8.safetensors")]


def test_missing_weights_in_a_quantized_repository_suggest_q(hub):
    hub.add_kyutai_repo("kyutai/moshika-mlx-q4", 4)
    with pytest.raises(ModelFilesError, match="has no file 'model.safetensors'. Pass -q 4 or -q 8"):
        model_files.resolve(parse("--hf-repo", "kyutai/moshika-mlx-q4"))


def test_unknown_repository(hub):
    hub.add_kyutai_repo("kyutai/moshiko-mlx-bf16", None)
    with pytest.raises(ModelFilesError, match="repository no/such not found"):
        model_files.resolve(parse("--hf-repo", "no/such"))


def test_demo_and_hf_repo_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        parse("--demo", "--hf-repo", "a/b")
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.fixture
def fake_make_demo(monkeypatch, tmp_path):
    """Replaces moshi_mlx.weights.demo with a recorder; `fail` makes the build raise."""
    builds = []
    module = types.ModuleType("moshi_mlx.weights.demo")

    def build_demo_repo(outdir: Path, seed: int = 0, kind: str = "moshi") -> Path:
        builds.append(outdir)
        (outdir / "config.json").write_text("{}")
        if module.fail:
            raise KeyboardInterrupt
        return outdir

    module.build_demo_repo = build_demo_repo
    module.fail = False
    monkeypatch.setitem(sys.modules, "moshi_mlx.weights.demo", module)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return module, builds


def test_demo_repository_is_built_once_in_the_xdg_cache(fake_make_demo, tmp_path):
    _, builds = fake_make_demo
    first = model_files.demo_repo()
    assert first == tmp_path / "cache" / "moshi_mlx" / f"demo-{model_files.DEMO_VERSION}"
    assert (first / "config.json").is_file()
    assert model_files.demo_repo() == first
    assert len(builds) == 1
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_interrupted_demo_build_leaves_nothing(fake_make_demo, tmp_path):
    module, _ = fake_make_demo
    module.fail = True
    with pytest.raises(KeyboardInterrupt):
        model_files.demo_repo()
    assert list((tmp_path / "cache" / "moshi_mlx").iterdir()) == []


def test_demo_repository_where_the_cache_cannot_be_written(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    with pytest.raises(ModelFilesError, match="cannot build the demo model in .*a-file/moshi_mlx "
                                              r"\(Not a directory\): set XDG_CACHE_HOME"):
        model_files.demo_repo()


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_files.cache_dir() == tmp_path / ".cache" / "moshi_mlx"


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_demo_files_and_model_load(demo_env, hub, bits):
    argv = ["--demo"] + (["-q", str(bits)] if bits else [])
    files = model_files.resolve(parse(*argv))
    assert hub.calls == []
    assert files.moshi_weight.name == model_files.quantized_name("model.safetensors", bits)
    assert (files.quantization.bits if files.quantization else None) == bits
    model, tokenizer, cfg = model_files.load_model(files, warmup=False)
    assert cfg is files.lm_config and model.cfg is cfg
    assert tokenizer.vocab_size() == cfg.text_card


@pytest.mark.parametrize("bits", [8, 4])
def test_a_named_quantized_file_loads_without_q(demo_env, demo_dir, hub, bits):
    moshi = demo_dir / model_files.quantized_name("model.safetensors", bits)
    files = model_files.resolve(parse("--demo", "--moshi-weight", str(moshi)))
    assert files.quantization.bits == bits
    model, _, _ = model_files.load_model(files, warmup=False)
    assert model.text_linear.bits == bits


def test_tokenizer_must_match_the_text_vocabulary(demo_dir):
    cfg = models.config_v0_1()  # 32000 text tokens; the demo tokenizer has fewer
    tokenizer = json.loads((demo_dir / "config.json").read_text())["tokenizer_name"]
    with pytest.raises(ModelFilesError, match="do not belong to the same model"):
        model_files.load_text_tokenizer(demo_dir / tokenizer, cfg)


def test_not_a_tokenizer(tmp_path):
    path = tmp_path / "spm.model"
    path.write_text("not a model")
    with pytest.raises(ModelFilesError, match="not a sentencepiece model"):
        model_files.load_text_tokenizer(path, models.config_v0_1())



def test_invalid_repository_id(monkeypatch):
    def reject(repo_id, filename, **kwargs):
        raise hub_errors.HFValidationError(
            f"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{repo_id}'.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", reject)
    with pytest.raises(ModelFilesError, match="'not a repo': not a valid repository id"):
        model_files.resolve(parse("--hf-repo", "not a repo"))
