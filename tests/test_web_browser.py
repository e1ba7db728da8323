"""The page in real browsers talking to the chat server on the demo model: headless Chromium
(Debian's package, driven by Playwright) whose fake microphone plays speech, and headless Firefox
(Debian's firefox-esr, driven through Marionette) whose fake microphone plays a 1 kHz tone; in
both, the page's audio runs at the browser's own rate, through a private sound server the tests
start (the `pulse` fixture), so they pass whether or not the machine runs one. Also: Disconnect
pressed while the browser asks for the microphone leaves it released; each wait of the page
(its audio code, the browser's audio, the server's handshake) gives up at its deadline with a
message, in Chromium, and in Firefox with no sound server at all. Screenshots of the page at a
laptop's and a phone's width are saved in out/screenshots/."""

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import FRAME, demo_files, require_module, require_tool

from moshi_mlx import families
from moshi_mlx.audio.wav import read_wav
from moshi_mlx.engine.worker import ModelWorker
from moshi_mlx.utils.sampling import SamplingSettings
from moshi_mlx.web.origin import OriginPolicy
from moshi_mlx.web.protocol import PcmAudio
from moshi_mlx.web.server import STATIC_DIR, ChatServer

pytestmark = pytest.mark.slow  # a server and Chromium

async_playwright = require_module("playwright.async_api",
                                  "pip install -e '.[dev]'").async_playwright
RATE = 24000

SCREENSHOTS = Path(__file__).parents[1] / "out" / "screenshots"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]


def chromium() -> str:
    return require_tool("chromium")


class RecordingConversation:
    """A conversation that keeps what it heard (frames) and said (text pieces)."""

    def __init__(self, conversation, samplers):
        self.conversation = conversation
        self.samplers = samplers  # (text, audio)
        self.heard: list[np.ndarray] = []
        self.said: list[str] = []
        self.voiced: list[np.ndarray] = []

    def encode(self, pcm):
        self.heard.append(pcm)
        return self.conversation.encode(pcm)

    def moshi_step(self, codes):
        token, text, moshi_codes = self.conversation.moshi_step(codes)
        if text is not None:
            self.said.append(text)
        return token, text, moshi_codes

    def decode(self, codes):
        pcm = self.conversation.decode(codes)
        self.voiced.append(pcm)
        return pcm

    def mimi_seconds(self, direction):
        return self.conversation.mimi_seconds(direction)

    def prepare_next(self):
        self.conversation.prepare_next()


class RecordingWorker(ModelWorker):
    def __init__(self, files):
        super().__init__(families.live_loader(files))
        self.vocab = (files.lm_config.text_card, files.lm_config.card)
        self.conversations: list[RecordingConversation] = []

    def new_conversation(self, text_sampler, audio_sampler, *args):
        conversation = RecordingConversation(
            super().new_conversation(text_sampler, audio_sampler, *args),
            (text_sampler, audio_sampler))
        self.conversations.append(conversation)
        return conversation


@pytest.fixture(scope="module")
def loaded_worker(demo_cache):
    worker = RecordingWorker(demo_files(demo_cache))
    worker.load()
    yield worker
    worker.close()


@pytest.fixture
def worker(loaded_worker):
    loaded_worker.conversations.clear()
    return loaded_worker


def chat_server(worker: ModelWorker) -> ChatServer:
    return ChatServer(worker, SamplingSettings(0.7, 25, 0.8, 250), OriginPolicy("127.0.0.1"),
                      vocab=worker.vocab)


# Keeps the streams getUserMedia gave in `grantedStreams`, to see that the page stops them.
KEEP_STREAMS = """
const ask = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
window.grantedStreams = [];
navigator.mediaDevices.getUserMedia = async (constraints) => {
  const stream = await ask(constraints);
  window.grantedStreams.push(stream);
  return stream;
};
"""
# Then stands for the browser's permission prompt: getUserMedia waits for `grantPermission()`.
HOLD_PERMISSION = KEEP_STREAMS + """
const keep = navigator.mediaDevices.getUserMedia;
let grant = null;
window.permissionAsked = () => grant !== null;
window.grantPermission = () => grant();
navigator.mediaDevices.getUserMedia = (constraints) => new Promise((resolve, reject) => {
  grant = () => keep(constraints).then(resolve, reject);
});
"""
TRACKS_STATES = "return grantedStreams.flatMap((s) => s.getTracks().map((t) => t.readyState))"
# The recording the page offers: its file name and bytes (base64), once the download link shows.
FETCH_RECORDING = """
const link = document.getElementById("recording");
if (document.getElementById("recording-box").hidden) return null;
const bytes = new Uint8Array(await (await fetch(link.href)).arrayBuffer());
let text = "";
for (let i = 0; i < bytes.length; i += 8192) {
  text += String.fromCharCode(...bytes.subarray(i, i + 8192));
}
return {name: link.download, wav: btoa(text)};
"""
SETTINGS_LOADED = "document.querySelector('[name=text_topk]').max !== ''"
SETTINGS = "return Object.fromEntries(new FormData(document.getElementById('settings')))"
# What the tests choose in the page's settings, and what the server must then sample with.
CHOSEN = {"text_temperature": "0.5", "text_topk": "40", "audio_temperature": "0.6",
          "audio_topk": "100"}
RESULT = ("return {stats: window.stats, transcript: document.getElementById('transcript')"
          ".textContent, state: document.getElementById('state').textContent}")


async def talk_in_the_browser(worker: ModelWorker, speech: Path, sound: dict) -> dict:
    """Opens the page, connects, lets the fake microphone speak until Moshi has said a few
    words and played a second of voice, takes the screenshots, disconnects. The browser plays
    through the sound server that the environment variables `sound` name."""
    chat = chat_server(worker)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    async with TestServer(chat.app(STATIC_DIR), host="127.0.0.1") as server:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium(), headless=True, env=dict(os.environ, **sound),
                args=CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={speech}"])
            page = await browser.new_page(viewport={"width": 1100, "height": 760})
            problems = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            await page.add_init_script(KEEP_STREAMS)
            await page.goto(str(server.make_url("/")))
            await page.wait_for_function(SETTINGS_LOADED)
            defaults = await page.evaluate(f"(() => {{ {SETTINGS} }})()")
            await page.click(".settings summary")
            for name, value in CHOSEN.items():
                await page.fill(f"[name={name}]", value)
            await page.reload()  # the settings are kept for the next visit
            await page.wait_for_function(SETTINGS_LOADED)
            kept = await page.evaluate(f"(() => {{ {SETTINGS} }})()")
            await page.click("#connect")
            await page.wait_for_function("window.stats.state === 'live'", timeout=60_000)
            await page.wait_for_function(
                "stats.textPieces >= 12 && stats.playedSamples >= 24000 && stats.server",
                timeout=60_000)
            await page.screenshot(path=SCREENSHOTS / "page-laptop.png")
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.screenshot(path=SCREENSHOTS / "page-phone.png")
            await page.click("#connect")
            await page.wait_for_function("window.stats.state === 'idle'")
            result = await page.evaluate(f"(() => {{ {RESULT} }})()")
            result["tracks"] = await page.evaluate(f"(() => {{ {TRACKS_STATES} }})()")
            result["recording"] = await page.evaluate(f"(async () => {{ {FETCH_RECORDING} }})()")
            await page.screenshot(path=SCREENSHOTS / "page-after.png", full_page=True)
            await browser.close()
    result.update(problems=problems, defaults=defaults, kept=kept)
    return result


def frame_levels(frames) -> np.ndarray:
    return np.sqrt(np.mean(np.square(np.stack(frames)), axis=1))


def assert_talked(result: dict, conversation: RecordingConversation) -> None:
    """The page showed Moshi's text as it came, played its voice, showed the server's figures,
    and ended as Disconnect ends it, the microphone released."""
    stats = result["stats"]
    assert result["state"] == "Disconnected."
    assert result["tracks"] and set(result["tracks"]) == {"ended"}, result["tracks"]
    assert result["transcript"].strip()
    assert "".join(conversation.said).lstrip().startswith(result["transcript"])
    assert stats["textPieces"] >= 12 and stats["receivedFrames"] >= 12
    assert stats["playedSamples"] >= RATE
    assert {"received", "processed", "dropped", "queued", "latency_voice_ms"} <= set(
        stats["server"])


def assert_sampled_as_chosen(conversation: RecordingConversation) -> None:
    """The server sampled with the settings chosen in the page (CHOSEN)."""
    text, audio = conversation.samplers
    assert (text.temp, text.top_k, audio.temp, audio.top_k) == (0.5, 40, 0.6, 100)


def assert_recorded(recording: dict, conversation: RecordingConversation) -> None:
    """The page's recording is a 24 kHz stereo wav: on the left, the user's audio exactly as
    the server heard it; on the right, Moshi's voice exactly as the server sent it, its frames
    in order, with silence only between frames (where Moshi's voice came later than the
    user's audio)."""
    assert recording is not None and recording["name"].endswith(".wav"), recording
    with wave.open(io.BytesIO(base64.b64decode(recording["wav"]))) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (2, RATE, 2)
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
    user, moshi = samples[:, 0], samples[:, 1]
    # The server hears the user's frames in order, less those it dropped when behind.
    sent = iter(user[: len(user) // FRAME * FRAME].reshape(-1, FRAME))
    for frame in conversation.heard:
        heard = np.round(frame * 32768).astype(np.int16)
        assert any(np.array_equal(heard, s) for s in sent), "a frame heard was not recorded"
    voice = [np.frombuffer(PcmAudio().encode(pcm), "<i2") for pcm in conversation.voiced]
    at = matched = 0
    while at < len(moshi) and matched < len(voice):
        if np.array_equal(moshi[at: at + FRAME], voice[matched]):
            at, matched = at + FRAME, matched + 1
        else:
            assert moshi[at] == 0, f"sample {at} of Moshi's side is not from its frame {matched}"
            at += 1
    assert matched >= 12 and not moshi[at:].any(), (matched, len(voice))


def test_the_page_talks_with_moshi_in_chromium(worker, speech_24k, pulse):
    result = asyncio.run(talk_in_the_browser(worker, speech_24k, pulse))
    stats = result["stats"]
    print(f"\nChromium: the page's audio ran at {stats['sampleRate']} Hz")
    assert result["problems"] == [], result["problems"]
    (conversation,) = worker.conversations
    assert_talked(result, conversation)
    # The settings start at the server's defaults, are kept for the next visit, and are sent.
    assert result["defaults"] == {"text_temperature": "0.7", "text_topk": "25",
                                  "audio_temperature": "0.8", "audio_topk": "250"}
    assert result["kept"] == CHOSEN
    assert_sampled_as_chosen(conversation)
    assert_recorded(result["recording"], conversation)

    # The server heard the microphone: speech at about the wav's level, not silence or a tone.
    heard = frame_levels(conversation.heard)
    speech = read_wav(speech_24k, RATE)
    spoken = frame_levels(np.split(speech[: len(speech) // FRAME * FRAME], len(speech) // FRAME))
    assert stats["sentFrames"] >= len(conversation.heard) >= 12
    assert spoken.max() / 4 < heard.max() < spoken.max() * 4
    assert heard.std() > 0.3 * heard.mean()


async def settings_out_of_range_in_chromium(worker: ModelWorker) -> dict:
    """Types a text top-k above the vocabulary and presses Connect; then reloads the page."""
    async with TestServer(chat_server(worker).app(STATIC_DIR), host="127.0.0.1") as server:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS)
            page = await browser.new_page()
            await page.goto(str(server.make_url("/")))
            await page.wait_for_function(SETTINGS_LOADED)
            await page.click(".settings summary")
            result = {"max": await page.get_attribute("[name=text_topk]", "max")}
            await page.fill("[name=text_topk]", str(worker.vocab[0] + 1))
            await page.fill("[name=audio_temperature]", "-1")
            result["note"] = await page.text_content("#settings-note")
            await page.click("#connect")
            await asyncio.sleep(0.5)
            result.update(await page.evaluate(f"(() => {{ {RESULT} }})()"))
            await page.reload()
            await page.wait_for_function(SETTINGS_LOADED)
            result["after reload"] = await page.evaluate(f"(() => {{ {SETTINGS} }})()")
            await browser.close()
    return result


def test_a_setting_out_of_its_range_is_refused_by_the_page_in_chromium(worker):
    result = asyncio.run(settings_out_of_range_in_chromium(worker))
    text_vocab = worker.vocab[0]
    assert result["max"] == str(text_vocab)  # the server's range
    assert result["note"] == (f"Text top-k must be a whole number from 0 to {text_vocab}. "
                              "Audio temperature must be a number of 0 or more."), result
    assert result["state"] == "Could not start: a setting is out of its range (see Settings)."
    assert result["stats"]["state"] == "error" and worker.conversations == []
    # Values out of range are not kept: the server's defaults come back.
    assert result["after reload"]["text_topk"] == "25"
    assert result["after reload"]["audio_temperature"] == "0.8"


async def disconnect_during_the_prompt_in_chromium(worker: ModelWorker) -> tuple[dict, list]:
    chat = chat_server(worker)
    async with TestServer(chat.app(STATIC_DIR), host="127.0.0.1") as server:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS)
            page = await browser.new_page()
            await page.goto(str(server.make_url("/")))
            await page.evaluate(f"() => {{ {HOLD_PERMISSION} }}")
            await page.click("#connect")
            await page.wait_for_function("permissionAsked()")
            await page.click("#connect")  # Disconnect, while the browser asks
            await page.evaluate("() => { grantPermission(); }")
            await page.wait_for_function("grantedStreams.length === 1")
            await asyncio.sleep(0.5)
            tracks = await page.evaluate(f"(() => {{ {TRACKS_STATES} }})()")
            result = await page.evaluate(f"(() => {{ {RESULT} }})()")
            await browser.close()
    return result, tracks


def test_disconnect_during_the_permission_prompt_releases_the_microphone_in_chromium(worker):
    result, tracks = asyncio.run(disconnect_during_the_prompt_in_chromium(worker))
    assert tracks and set(tracks) == {"ended"}, tracks
    assert result["state"] == "Disconnected." and result["stats"]["state"] == "idle"
    assert worker.conversations == []  # no conversation was opened


# What stands in for each wait that never ends, in Chromium: the page's worklets never arrive,
# the AudioContext never starts (as Firefox's without a sound server), the server never answers.
NEVER = {
    "worklets": "AudioWorklet.prototype.addModule = () => new Promise(() => {});",
    "audio": "AudioContext.prototype.resume = () => new Promise(() => {});",
    "handshake": "",  # the server's part: silent_chat
}


async def silent_chat(request: web.Request) -> web.WebSocketResponse:
    """A chat endpoint that accepts the websocket and never sends the handshake."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for _ in ws:
        pass
    return ws


async def a_wait_that_never_ends(worker: ModelWorker, step: str) -> tuple[dict, float]:
    """Connects with deadlines of 2 s while `step` never ends; -> the page's state and tracks
    once it gave up, and the seconds it took."""
    if step == "handshake":
        app = web.Application()
        app.router.add_get("/api/chat", silent_chat)
        app.router.add_get("/", lambda _: web.FileResponse(STATIC_DIR / "index.html"))
        app.router.add_static("/", STATIC_DIR)
    else:
        app = chat_server(worker).app(STATIC_DIR)
    async with TestServer(app, host="127.0.0.1") as server:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS)
            page = await browser.new_page()
            await page.add_init_script(KEEP_STREAMS + NEVER[step])
            await page.goto(str(server.make_url("/")))
            await page.evaluate("() => { for (const k in deadlines) deadlines[k] = 2000; }")
            started = time.monotonic()
            await page.click("#connect")
            await page.wait_for_function("window.stats.state === 'error'", timeout=30_000)
            took = time.monotonic() - started
            result = await page.evaluate(f"(() => {{ {RESULT} }})()")
            result["tracks"] = await page.evaluate(f"(() => {{ {TRACKS_STATES} }})()")
            result["button"] = await page.text_content("#connect")
            await browser.close()
    return result, took


@pytest.mark.parametrize("step, says", [
    ("worklets", "the page's audio code did not load"),
    ("audio", "the browser's audio did not start"),
    ("handshake", "Moshi did not answer"),
])
def test_each_wait_of_the_page_has_a_deadline_in_chromium(worker, step, says):
    result, took = asyncio.run(a_wait_that_never_ends(worker, step))
    assert result["state"].startswith(f"Could not start: {says}"), result
    assert 1.5 < took < 15, took
    assert result["button"] == "Connect"
    if step != "worklets":  # the microphone is asked for after the worklets load
        assert result["tracks"] and set(result["tracks"]) == {"ended"}, result["tracks"]
    assert worker.conversations == []


# Firefox: Debian's firefox-esr, headless, driven through its Marionette port (Playwright's own
# Firefox build cannot be installed without its download).
FIREFOX_PREFS = {
    "media.navigator.streams.fake": True,  # a fake microphone: a 1 kHz tone
    "media.navigator.audio.fake_frequency": 1000,
    "media.navigator.permission.disabled": True,  # no permission prompt
    "media.autoplay.default": 0,  # audio may play
    "media.autoplay.block-webaudio": False,
    "app.update.enabled": False,
    "app.normandy.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "network.captive-portal-service.enabled": False,
    "extensions.update.enabled": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def firefox(profile: Path, sound: dict) -> Iterator:
    """A headless Firefox with a fresh profile in `profile`, its audio through the sound server
    that the environment variables `sound` name (the `pulse` fixture's, or one that is not
    there): its Marionette session."""
    marionette = require_module("marionette_driver.marionette",
                                "pip install -e '.[dev]'").Marionette
    binary = require_tool("firefox-esr")
    port = free_port()
    prefs = {**FIREFOX_PREFS, "marionette.port": port}
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "user.js").write_text("".join(
        f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items()))
    browser = subprocess.Popen([binary, "--headless", "--marionette", "--no-remote",
                                "--profile", str(profile)], env=dict(os.environ, **sound),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        session = marionette(host="127.0.0.1", port=port)
        session.start_session(timeout=60)
        yield session
        session.delete_session()
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()


# Errors that reach the page's window (an exception, a rejected promise), kept for the test.
CATCH_ERRORS = """
window.pageErrors = [];
window.addEventListener("error", (e) => pageErrors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => pageErrors.push(String(e.reason)));
"""


async def page_script(session, script: str):
    """Runs `script` (a function's body) in the page itself, not in Marionette's sandbox (which
    does not see what the page's scripts set)."""
    return await asyncio.to_thread(session.execute_script, script, sandbox=None)


async def until(session, condition: str, timeout: float = 60.0) -> None:
    """Waits until the page's `condition` (a JS expression) is true."""
    deadline = time.monotonic() + timeout
    while not await page_script(session, f"return Boolean({condition})"):
        state = await page_script(session, RESULT)
        assert time.monotonic() < deadline, f"no {condition} within {timeout} s: {state}"
        await asyncio.sleep(0.2)


async def in_firefox(worker: ModelWorker, profile: Path, sound: dict, scenario: str) -> dict:
    """Opens the page in Firefox and connects, then plays one scenario:
    - "talk": the fake microphone plays until Moshi has said a few words and played a second of
      voice, then Disconnect;
    - "prompt": Disconnect while the browser asks for the microphone, then permission given;
    - "no audio": the browser's audio cannot start (no sound server); the page gives up at its
      deadline, shortened here to 3 s."""
    chat = chat_server(worker)
    async with TestServer(chat.app(STATIC_DIR), host="127.0.0.1") as server:
        with firefox(profile, sound) as session:
            run = asyncio.to_thread
            await run(session.navigate, str(server.make_url("/")))
            setup = HOLD_PERMISSION if scenario == "prompt" else KEEP_STREAMS
            if scenario == "talk":  # the settings chosen, kept for the next visit
                await until(session, SETTINGS_LOADED)
                await page_script(session, CHOOSE_SETTINGS)
                await run(session.refresh)
                await until(session, SETTINGS_LOADED)
            await page_script(session, CATCH_ERRORS + setup + "deadlines.audio = 3000;")
            connect = await run(session.find_element, "css selector", "#connect")
            await run(connect.click)
            if scenario == "talk":
                await until(session, "window.stats.state === 'live'")
                await until(session, "stats.textPieces >= 12 && stats.playedSamples >= 24000 "
                                     "&& stats.server")
                await run(connect.click)
                await until(session, "window.stats.state === 'idle'")
            elif scenario == "prompt":
                await until(session, "permissionAsked()")
                await run(connect.click)
                await page_script(session, "grantPermission()")
                await until(session, "grantedStreams.length === 1")
                await asyncio.sleep(0.5)
            else:
                await until(session, "window.stats.state === 'error'", timeout=30)
            result = await page_script(session, RESULT)
            result["errors"] = await page_script(session, "return pageErrors")
            result["tracks"] = await page_script(session, TRACKS_STATES)
            result["settings"] = await page_script(session, SETTINGS)
            result["recording"] = await run(session.execute_async_script, RESOLVE_WITH.format(
                FETCH_RECORDING), sandbox=None, script_timeout=30_000)
    return result


# Marionette's asynchronous script: the function's body, its value given to the last argument.
RESOLVE_WITH = "const done = arguments[arguments.length - 1]; (async () => {{ {} }})().then(done);"
CHOOSE_SETTINGS = f"""
const form = document.getElementById("settings");
for (const [name, value] of Object.entries({json.dumps(CHOSEN)})) form.elements[name].value = value;
form.dispatchEvent(new Event("input"));
"""


def test_the_page_talks_with_moshi_in_firefox(worker, pulse, tmp_path):
    result = asyncio.run(in_firefox(worker, tmp_path / "profile", pulse, "talk"))
    stats = result["stats"]
    print(f"\nFirefox: the page's audio ran at {stats['sampleRate']} Hz")
    assert result["errors"] == [] and stats["error"] is None, result
    (conversation,) = worker.conversations
    assert_talked(result, conversation)
    assert result["settings"] == CHOSEN
    assert_sampled_as_chosen(conversation)
    assert_recorded(result["recording"], conversation)

    # The server heard the fake microphone's 1 kHz tone at 1 kHz: the page resampled the
    # browser's rate to 24 kHz.
    heard = np.concatenate(conversation.heard[2:])  # past the start of the stream
    spectrum = np.abs(np.fft.rfft(heard * np.hanning(len(heard))))
    peak = np.fft.rfftfreq(len(heard), 1 / RATE)[spectrum.argmax()]
    assert stats["sentFrames"] >= len(conversation.heard) >= 12
    assert abs(peak - 1000) < 5, peak
    assert np.sqrt(np.mean(np.square(heard))) > 0.01


def test_disconnect_during_the_permission_prompt_releases_the_microphone_in_firefox(
        worker, pulse, tmp_path):
    result = asyncio.run(in_firefox(worker, tmp_path / "profile", pulse, "prompt"))
    assert result["tracks"] and set(result["tracks"]) == {"ended"}, result["tracks"]
    assert result["state"] == "Disconnected." and result["errors"] == []
    assert worker.conversations == []


def test_firefox_without_a_sound_server_says_so_and_releases_the_microphone(worker, tmp_path):
    """No sound server: Firefox's AudioContext never starts (resume() never settles). The page
    says what to do at its deadline and releases the microphone; no conversation opens."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    nowhere = {"XDG_RUNTIME_DIR": str(runtime), "PULSE_SERVER": f"unix:{runtime}/no-server"}
    result = asyncio.run(in_firefox(worker, tmp_path / "profile", nowhere, "no audio"))
    assert result["state"].startswith("Could not start: the browser's audio did not start"), result
    assert "sound server" in result["state"]
    assert result["tracks"] and set(result["tracks"]) == {"ended"}, result["tracks"]
    assert result["errors"] == []
    assert worker.conversations == []


@pytest.fixture(scope="module")
def kyutai_client() -> Path:
    """A build of Kyutai's web client (`client/` of github.com/kyutai-labs/moshi), named by
    KYUTAI_WEB_CLIENT; nothing here builds it (its code is not this project's), so without one
    the test is skipped, in CI too."""
    built = os.environ.get("KYUTAI_WEB_CLIENT")
    if not built or not (Path(built) / "index.html").is_file():
        pytest.skip("Kyutai's web client is not built: build client/ of kyutai-labs/moshi "
                    "(npm ci && npx vite build) and set KYUTAI_WEB_CLIENT to its dist/")
    return Path(built)


async def talk_with_kyutais_client(worker: ModelWorker, client: Path, speech: Path) -> str:
    """Kyutai's web client served by the chat server (`--static`) in Chromium: Connect, then
    the fake microphone speaks until Moshi has said a dozen pieces; the page's text."""
    chat = chat_server(worker)
    async with TestServer(chat.app(client), host="127.0.0.1") as server:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium(), headless=True,
                args=CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={speech}"])
            page = await browser.new_page()
            await page.goto(str(server.make_url("/")))
            await page.get_by_role("button", name="Connect").click()
            deadline = time.monotonic() + 60
            while not (worker.conversations and len(worker.conversations[0].said) >= 12):
                assert time.monotonic() < deadline, "Moshi said nothing to Kyutai's client"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # the last pieces reach the page
            text = await page.evaluate("() => document.body.innerText")
            await browser.close()
    return text


def test_kyutais_web_client_still_talks_with_moshi(kyutai_client, worker, speech_24k):
    text = asyncio.run(talk_with_kyutais_client(worker, kyutai_client, speech_24k))
    (conversation,) = worker.conversations
    assert len(conversation.heard) >= 12  # its Opus audio was decoded
    words = [w for w in "".join(conversation.said).split() if len(w) >= 3]
    shown = [w for w in words if w in text]
    print(f"\nKyutai's web client showed {len(shown)} of Moshi's {len(words)} words")
    assert words and len(shown) >= len(words) // 2, (words, text)  # Moshi's words, on its page
