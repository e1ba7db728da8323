"""The page in real browsers talking to the chat server on the demo model: headless Chromium
(Debian's package, driven by Playwright) whose fake microphone plays speech, and headless Firefox
(Debian's firefox-esr, driven through Marionette) whose fake microphone plays a 1 kHz tone; in
both, the page's audio runs at the browser's own rate. Also: Disconnect pressed while the
browser asks for the microphone leaves it released. Screenshots of the page at a laptop's and a
phone's width are saved in out/screenshots/."""

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from conftest import FRAME, demo_files, require_module, require_tool

from moshi_mlx import families
from moshi_mlx.audio.wav import read_wav
from moshi_mlx.engine.worker import ModelWorker
from moshi_mlx.utils.sampling import SamplingSettings
from moshi_mlx.web.origin import OriginPolicy
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

    def __init__(self, conversation):
        self.conversation = conversation
        self.heard: list[np.ndarray] = []
        self.said: list[str] = []

    def encode(self, pcm):
        self.heard.append(pcm)
        return self.conversation.encode(pcm)

    def moshi_step(self, codes):
        token, text, moshi_codes = self.conversation.moshi_step(codes)
        if text is not None:
            self.said.append(text)
        return token, text, moshi_codes

    def decode(self, codes):
        return self.conversation.decode(codes)

    def mimi_seconds(self, direction):
        return self.conversation.mimi_seconds(direction)

    def prepare_next(self):
        self.conversation.prepare_next()


class RecordingWorker(ModelWorker):
    def __init__(self, files):
        super().__init__(families.live_loader(files))
        self.conversations: list[RecordingConversation] = []

    def new_conversation(self, *args):
        conversation = RecordingConversation(super().new_conversation(*args))
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
    return ChatServer(worker, SamplingSettings(0.7, 25, 0.8, 250), OriginPolicy("127.0.0.1"))


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
RESULT = ("return {stats: window.stats, transcript: document.getElementById('transcript')"
          ".textContent, state: document.getElementById('state').textContent}")


async def talk_in_the_browser(worker: ModelWorker, speech: Path) -> dict:
    """Opens the page, connects, lets the fake microphone speak until Moshi has said a few
    words and played a second of voice, takes the screenshots, disconnects."""
    chat = chat_server(worker)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    async with TestServer(chat.app(STATIC_DIR), host="127.0.0.1") as server:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium(), headless=True,
                args=CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={speech}"])
            page = await browser.new_page(viewport={"width": 1100, "height": 760})
            problems = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            await page.add_init_script(KEEP_STREAMS)
            await page.goto(str(server.make_url("/")))
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
            await browser.close()
    result["problems"] = problems
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


def test_the_page_talks_with_moshi_in_chromium(worker, speech_24k):
    result = asyncio.run(talk_in_the_browser(worker, speech_24k))
    stats = result["stats"]
    print(f"\nChromium: the page's audio ran at {stats['sampleRate']} Hz")
    assert result["problems"] == [], result["problems"]
    (conversation,) = worker.conversations
    assert_talked(result, conversation)

    # The server heard the microphone: speech at about the wav's level, not silence or a tone.
    heard = frame_levels(conversation.heard)
    speech = read_wav(speech_24k, RATE)
    spoken = frame_levels(np.split(speech[: len(speech) // FRAME * FRAME], len(speech) // FRAME))
    assert stats["sentFrames"] >= len(conversation.heard) >= 12
    assert spoken.max() / 4 < heard.max() < spoken.max() * 4
    assert heard.std() > 0.3 * heard.mean()


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


# Firefox: Debian's firefox-esr, headless, driven through its Marionette port (Playwright's own
# Firefox build cannot be installed without its download).
FIREFOX_PREFS = {
    "media.navigator.streams.fake": True,  # a fake microphone: a 1 kHz tone
    "media.navigator.audio.fake_frequency": 1000,
    "media.navigator.permission.disabled": True,  # no permission prompt
    "media.autoplay.default": 0,  # audio may play
    "media.cubeb.force_mock_context": True,  # an audio device that runs with no sound card
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
def firefox(profile: Path) -> Iterator:
    """A headless Firefox with a fresh profile in `profile`: its Marionette session."""
    marionette = require_module("marionette_driver.marionette",
                                "pip install -e '.[dev]'").Marionette
    binary = require_tool("firefox-esr")
    port = free_port()
    prefs = {**FIREFOX_PREFS, "marionette.port": port}
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "user.js").write_text("".join(
        f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items()))
    browser = subprocess.Popen([binary, "--headless", "--marionette", "--no-remote",
                                "--profile", str(profile)],
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


async def in_firefox(worker: ModelWorker, profile: Path, talk: bool) -> dict:
    """Opens the page in Firefox and connects; with `talk`, lets the fake microphone play until
    Moshi has said a few words and played a second of voice, then disconnects; otherwise
    presses Disconnect while the browser asks for the microphone, then grants it."""
    chat = chat_server(worker)
    async with TestServer(chat.app(STATIC_DIR), host="127.0.0.1") as server:
        with firefox(profile) as session:
            run = asyncio.to_thread
            await run(session.navigate, str(server.make_url("/")))
            await page_script(session, CATCH_ERRORS + (KEEP_STREAMS if talk else HOLD_PERMISSION))
            connect = await run(session.find_element, "css selector", "#connect")
            await run(connect.click)
            if talk:
                await until(session, "window.stats.state === 'live'")
                await until(session, "stats.textPieces >= 12 && stats.playedSamples >= 24000 "
                                     "&& stats.server")
                await run(connect.click)
                await until(session, "window.stats.state === 'idle'")
            else:
                await until(session, "permissionAsked()")
                await run(connect.click)
                await page_script(session, "grantPermission()")
                await until(session, "grantedStreams.length === 1")
                await asyncio.sleep(0.5)
            result = await page_script(session, RESULT)
            result["errors"] = await page_script(session, "return pageErrors")
            result["tracks"] = await page_script(session, TRACKS_STATES)
    return result


def test_the_page_talks_with_moshi_in_firefox(worker, tmp_path):
    result = asyncio.run(in_firefox(worker, tmp_path / "profile", talk=True))
    stats = result["stats"]
    print(f"\nFirefox: the page's audio ran at {stats['sampleRate']} Hz")
    assert result["errors"] == [] and stats["error"] is None, result
    (conversation,) = worker.conversations
    assert_talked(result, conversation)

    # The server heard the fake microphone's 1 kHz tone at 1 kHz: the page resampled the
    # browser's rate to 24 kHz.
    heard = np.concatenate(conversation.heard[2:])  # past the start of the stream
    spectrum = np.abs(np.fft.rfft(heard * np.hanning(len(heard))))
    peak = np.fft.rfftfreq(len(heard), 1 / RATE)[spectrum.argmax()]
    assert stats["sentFrames"] >= len(conversation.heard) >= 12
    assert abs(peak - 1000) < 5, peak
    assert np.sqrt(np.mean(np.square(heard))) > 0.01


def test_disconnect_during_the_permission_prompt_releases_the_microphone_in_firefox(
        worker, tmp_path):
    result = asyncio.run(in_firefox(worker, tmp_path / "profile", talk=False))
    assert result["tracks"] and set(result["tracks"]) == {"ended"}, result["tracks"]
    assert result["state"] == "Disconnected." and result["errors"] == []
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
