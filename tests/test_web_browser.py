"""The page in a real browser: headless Chromium (Debian's package, driven by Playwright) whose
fake microphone plays speech, talking to the chat server on the demo model. Screenshots of the
page at a laptop's and a phone's width are saved in out/screenshots/."""

import asyncio
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from conftest import FRAME, demo_files, require_module, require_tool

from moshi_mlx.audio.wav import read_wav
from moshi_mlx.chat_server import STATIC_DIR, ChatServer, Sampling
from moshi_mlx.engine.worker import ModelWorker
from moshi_mlx.web.origin import OriginPolicy

pytestmark = pytest.mark.slow  # a server and Chromium

async_playwright = require_module("playwright.async_api",
                                  "pip install -e '.[dev]'").async_playwright

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
        super().__init__(files)
        self.conversations: list[RecordingConversation] = []

    def new_conversation(self, *args):
        conversation = RecordingConversation(super().new_conversation(*args))
        self.conversations.append(conversation)
        return conversation


@pytest.fixture
def worker(demo_cache):
    worker = RecordingWorker(demo_files(demo_cache))
    worker.load()
    yield worker
    worker.close()


async def talk_in_the_browser(worker: ModelWorker, speech: Path) -> dict:
    """Opens the page, connects, lets the fake microphone speak until Moshi has said a few
    words and played a second of voice, takes the screenshots, disconnects."""
    chat = ChatServer(worker, Sampling(0.7, 25, 0.8, 250), OriginPolicy("127.0.0.1"))
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
            result = await page.evaluate(
                "({stats: window.stats, transcript: document.getElementById('transcript')"
                ".textContent, state: document.getElementById('state').textContent})")
            await browser.close()
    result["problems"] = problems
    return result


def frame_levels(frames) -> np.ndarray:
    return np.sqrt(np.mean(np.square(np.stack(frames)), axis=1))


def test_the_page_talks_with_moshi(worker, speech_24k):
    result = asyncio.run(talk_in_the_browser(worker, speech_24k))
    stats = result["stats"]
    assert result["problems"] == [], result["problems"]
    assert result["state"] == "Disconnected."
    (conversation,) = worker.conversations

    # The server heard the microphone: speech at about the wav's level, not silence or a tone.
    heard = frame_levels(conversation.heard)
    speech = read_wav(speech_24k, 24000)
    spoken = frame_levels(np.split(speech[: len(speech) // FRAME * FRAME], len(speech) // FRAME))
    assert stats["sentFrames"] >= len(conversation.heard) >= 12
    assert spoken.max() / 4 < heard.max() < spoken.max() * 4
    assert heard.std() > 0.3 * heard.mean()

    # The page showed Moshi's text as it came, and played its voice.
    assert result["transcript"].strip()
    assert "".join(conversation.said).lstrip().startswith(result["transcript"])
    assert stats["textPieces"] >= 12 and stats["receivedFrames"] >= 12
    assert stats["playedSamples"] >= 24000
    assert {"received", "processed", "dropped", "queued", "latency_voice_ms"} <= set(
        stats["server"])
