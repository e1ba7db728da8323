"""Fixtures and helpers shared by the tests: import the helpers with `from conftest import ...`;
write one here rather than again in a test file."""

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import aiohttp
import mlx.core as mx
import mlx.nn as nn
import msgpack
import numpy as np
import pytest
from chat_client import receive_within
from mlx.utils import tree_flatten, tree_unflatten

from moshi_mlx import model_files, models
from moshi_mlx.models.checkpoint import ST_DTYPES, TensorInfo
from moshi_mlx.weights.safetensors_writer import write_sparse

DATA = Path(__file__).parent / "data"
# Kyutai's audio format, written here rather than imported from moshi_mlx so that the tests
# notice a change to the package's constants.
RATE = 24000  # Hz
FRAME = 1920  # samples per 80 ms frame


# Test files that keep real-time pace, wait on wall-clock deadlines (Mimi's 1.5 s, a page's)
# or pings, or measure a device: `make test` runs their tests one at a time, after the others
# have run on two workers, so that no other test takes their cores.
REALTIME_FILES = {
    "test_app_faults.py", "test_audio_devices.py", "test_chat_server.py", "test_echo_device.py",
    "test_engine.py", "test_live_families.py", "test_local.py", "test_local_device.py",
    "test_local_web.py", "test_mimi.py", "test_model_thread.py", "test_serve.py",
    "test_serve_cli.py", "test_serve_tts.py", "test_server_probes.py", "test_sound_devices.py",
    "test_web_browser.py", "test_worklets.py",
}


def pytest_configure(config):
    # A run started in the background by a shell without job control ignores SIGINT, and the
    # apps it starts would inherit that: their Ctrl-C tests would find Ctrl-C ignored. A
    # handler here is reset to the default in every child.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in REALTIME_FILES:
            item.add_marker(pytest.mark.realtime)


@pytest.fixture(autouse=True)
def end_unused_mimi_processes():
    """After each test, conversations no longer used, also those in reference cycles (an engine
    and its callbacks), are collected: their Mimi processes (~350 MB each) end."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """PyTorch (the parity references) on one thread: on two cores shared with another test or
    a model's thread, its spinning threads made a parity test ten times slower (47 s against
    4.7 s, measured)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def keep_log_handlers():
    """An app's main() run in the test's process gives the `moshi_mlx` logger a handler on the
    test's captured stderr: it is removed after the test, so that later tests do not log to a
    closed stream."""
    log = logging.getLogger("moshi_mlx")
    handlers = list(log.handlers)
    yield
    log.handlers[:] = handlers


def read_pcm16(path: Path) -> tuple[np.ndarray, int, int]:
    """A 16-bit wav -> (samples float [n * channels], interleaved, in [-1, 1); sample rate in Hz;
    channels)."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2, f"{path}: {8 * w.getsampwidth()}-bit, not 16-bit"
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768
        return data, w.getframerate(), w.getnchannels()


def read_24k(path: Path, channels: int) -> np.ndarray:
    """A 16-bit 24 kHz wav of `channels` channels (asserted) -> float [samples, channels]."""
    data, rate, found = read_pcm16(path)
    assert (rate, found) == (RATE, channels), f"{path}: {rate} Hz, {found} channels"
    return data.reshape(-1, channels)


def write_pcm16(path: Path, samples: np.ndarray, rate: int) -> Path:
    """float [samples] (mono) or [samples, channels], clipped to [-1, 1] -> a 16-bit wav."""
    samples = np.asarray(samples)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def energy_db(x: np.ndarray) -> float:
    """Mean power, dB relative to full scale."""
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def rms(x: np.ndarray) -> float:
    """Root mean square; 0 for no samples."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def load_config(name: str, **overrides) -> models.LmConfig:
    d = json.loads((DATA / f"{name}.json").read_text())
    d.update(overrides)
    return models.LmConfig.from_config_dict(d)


def tiny_config(**overrides) -> models.LmConfig:
    """A very small Moshi (same structure as 7B: 16 codebooks, 8 generated, delays)."""
    d = json.loads((DATA / "test_small.json").read_text())
    d.update(dim=64, num_heads=4, num_layers=2, text_card=50, card=40, depformer_dim=32,
             depformer_num_heads=2, depformer_num_layers=2, depformer_dim_feedforward=96)
    d.update(overrides)
    return models.LmConfig.from_config_dict(d)


def random_model(cfg: models.LmConfig, seed: int = 0, dtype=mx.float32) -> models.Lm:
    """An Lm with random weights, norms included, at a scale that keeps activations O(1)."""
    mx.random.seed(seed)
    model = models.Lm(cfg)
    params = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "out_norm" in name:
            p = 1.0 + 0.1 * mx.random.normal(p.shape)
        elif ".emb" in name or "_emb" in name:
            p = mx.random.normal(p.shape)
        else:
            p = mx.random.normal(p.shape) * (p.shape[-1] ** -0.5)
        params.append((name, p))
    model.update(tree_unflatten(params))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def save_model(model: nn.Module, path: Path) -> Path:
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
    return path


@pytest.fixture
def tiny_cfg() -> models.LmConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """An XDG cache directory holding the demo repository, built once per test session
    (the user's own cache is left alone)."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        model_files.demo_repo()
    return cache


@pytest.fixture(scope="session")
def demo_dir(demo_cache) -> Path:
    return demo_cache / "moshi_mlx" / f"demo-{model_files.DEMO_VERSION}"


def demo_files(demo_cache: Path, *flags: str) -> model_files.ModelFiles:
    """The demo repository's files, as the apps resolve them from `--demo` and `flags`."""
    parser = argparse.ArgumentParser()
    model_files.add_model_args(parser)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(demo_cache))
        return model_files.resolve(parser.parse_args(["--demo", *flags]))


@pytest.fixture
def demo_env(demo_cache, monkeypatch) -> dict:
    """Environment for running the apps on the session's demo repository."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    return dict(os.environ)


def write_sparse_checkpoint(manifest: Path, out: Path) -> Path:
    """A safetensors file with the tensor layout of a `tests/data` manifest: a real header
    followed by a hole as large as the data (all zeros, no disk used)."""
    tensors = json.loads(manifest.read_text())["tensors"]
    return write_sparse(out, [(name, TensorInfo(ST_DTYPES[t["st_dtype"]], tuple(t["shape"])))
                              for name, t in sorted(tensors.items())])


def missing(what: str) -> NoReturn:
    """Skips the test (or the module) with `what` as the visible reason; fails it when CI=true,
    where everything the tests need is installed."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (required when CI=true)", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def require_tool(name: str, package: str | None = None) -> str:
    """The path of a system program the test needs; without it the test is skipped with the
    reason, or fails when CI=true (`missing`)."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is needed by this test: apt-get install {package or name}")
    return path


def require_module(name: str, install: str) -> ModuleType:
    """The Python module `name`, imported; without it the test (or the module) is skipped with
    the reason, or fails when CI=true (`missing`)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python module {name} is needed by these tests: {install}")


def make_speech(path: Path, text: str, rate: int = 24000, channels: int = 1) -> Path:
    """English speech from espeak-ng, converted by sox to a 16-bit wav at `rate` Hz."""
    raw = path.with_name(f"{path.stem}.espeak.wav")
    subprocess.run([require_tool("espeak-ng"), "-v", "en-us", "-s", "150", "-w", raw, text],
                   check=True)
    subprocess.run([require_tool("sox"), raw, "-r", str(rate), "-c", str(channels), "-b", "16",
                    path], check=True)
    return path


@pytest.fixture(scope="session")
def pulse(tmp_path_factory) -> dict:
    """A private PulseAudio daemon with virtual devices (`virtual_audio.VIRTUAL_DEVICES`);
    -> the environment variables of its clients."""
    from virtual_audio import start_pulse, stop_pulse

    env = start_pulse(tmp_path_factory.mktemp("pulse"))
    yield env
    stop_pulse(env)


@pytest.fixture(scope="session")
def speech_24k(tmp_path_factory) -> Path:
    """About 3 s of English speech, as a 24 kHz mono 16-bit wav."""
    return make_speech(tmp_path_factory.mktemp("speech-24k") / "speech24k.wav",
                       "Hello Moshi. How are you today?")


@contextmanager
def serving_in_thread(app) -> Iterator[int]:
    """An aiohttp `app` on 127.0.0.1 (any port), its event loop on a thread of its own: the
    port; cleaned up at the end."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    runner = web.AppRunner(app)

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        yield runner.addresses[0][1]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)


async def used_slots(session, server) -> int:
    """The slots in use of `server`'s one speech service (`/api/modules_info`), which must be
    `server.module`: (type, path, total slots; strings, as Kyutai's server writes them)."""
    async with session.get(f"{server.http}/api/modules_info") as response:
        (module,) = await response.json()
    assert (module["type"], module["path"], module["total_slots"]) == server.module
    assert isinstance(module["used_slots"], str)
    return int(module["used_slots"])


async def slots_in_use(session, server, count: int, seconds: float = 15) -> None:
    """Waits until `count` slots are held (the slot of a client that left is freed once its
    Mimi is ready for the next stream)."""
    deadline = time.monotonic() + seconds
    while await used_slots(session, server) != count:
        assert time.monotonic() < deadline, f"not {count} slots in use after {seconds} s"
        await asyncio.sleep(0.1)


def silent_websocket(port: int, target: str) -> socket.socket:
    """A websocket to 127.0.0.1:`port` `target` (path and query, with the default api key),
    opened by hand: it will never read again (no pong), as a client whose process froze."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\nkyutai-api-key: public_token\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


@pytest.fixture
def mimi_fails_to_start_once(monkeypatch) -> list:
    """The next `Mimi.reset()` (a slot's codec, starting a stream) raises MimiError, as when
    its process cannot start; the later ones work. -> the Mimis whose reset failed."""
    from moshi_mlx.audio.mimi import Mimi
    from moshi_mlx.audio.mimi_process import MimiError

    failed, reset = [], Mimi.reset

    def reset_once_failing(self):
        if not failed:
            failed.append(self)
            raise MimiError("the audio codec's process exited at start (a test's failure)")
        return reset(self)

    monkeypatch.setattr(Mimi, "reset", reset_once_failing)
    return failed


async def codec_fails_then_next_client_served(session, server, connect, address: str,
                                              served) -> None:
    """A speech service whose slot's Mimi does not start (`mimi_fails_to_start_once`): that
    client gets Error and a close 1011, the slot is freed, and the next client is `served`
    (a coroutine function of its websocket)."""
    from moshi_mlx.web.speech import CODEC_DID_NOT_START

    await slots_in_use(session, server, 0)
    ws = await connect(session, address)
    msg = await receive_within(ws, 30)
    assert msg.type == aiohttp.WSMsgType.BINARY, f"{msg.type}: {msg.data}"
    assert msgpack.unpackb(msg.data) == {"type": "Error", "message": CODEC_DID_NOT_START}
    assert (await receive_within(ws, 10)).type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1011
    await slots_in_use(session, server, 0)
    async with await connect(session, address) as second:
        await served(second)


def kyutai_asr_words(tokens: list[int], delay_steps: int, decode) -> list[tuple]:
    """moshi-core's `asr.rs` (`State::step_tokens`) on one stream's text tokens, as Kyutai's
    server runs it, written here from its source: the text read from step `delay_steps`
    (counted from 1); a padding token (3, or 0: the end of padding) ends the word being spelled,
    `decode(its tokens)`; the end of padding times the last word sent's end and the next word's
    start. -> ("Word", text, start_time) and ("EndWord", stop_time)."""
    events, word, unended, last_stop = [], [], False, 0.0
    for step_idx, token in enumerate(tokens, start=1):
        if step_idx < delay_steps:
            continue
        if token in (0, 3):
            if word:
                events.append(("Word", decode(word), last_stop))
                word, unended = [], True
        else:
            word.append(token)
        if token == 0:
            stop = (step_idx - delay_steps) / 12.5
            if unended:
                events.append(("EndWord", stop))
                unended = False
            last_stop = stop
    return events
