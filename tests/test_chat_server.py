"""The chat server in-process, with a scripted conversation in place of the model: message order,
frame dropping, status messages, query parameters, the origin policy and the page's files."""

import asyncio
import json
import logging
import threading
import time

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer, make_mocked_request

from moshi_mlx import utils
from moshi_mlx.chat_server import STATIC_DIR, ChatServer, OriginPolicy, Sampling

FRAME = 1920
DEFAULT_SAMPLING = Sampling(0.7, 25, 0.8, 250)


class ScriptedConversation:
    """Says " w{n}" at step n and, from step 1, a voice frame of constant level n / 100.
    Records the mean of each frame it hears; `listen` can be slowed, `speak` held by a gate."""

    def __init__(self, text_sampler, audio_sampler, seed, listen_seconds=0.0, gate=None):
        self.samplers = (text_sampler, audio_sampler)
        self.seed = seed
        self.listen_seconds = listen_seconds
        self.gate = gate
        self.heard: list[float] = []

    def listen(self, pcm: np.ndarray) -> tuple[int, str]:
        assert pcm.shape == (FRAME,) and pcm.dtype == np.float32
        time.sleep(self.listen_seconds)
        self.heard.append(float(pcm.mean()))
        n = len(self.heard) - 1
        return n, f" w{n}"

    def speak(self) -> np.ndarray | None:
        if self.gate is not None:
            assert self.gate.wait(10), "the text was not sent before the voice was decoded"
            self.gate.clear()
        n = len(self.heard) - 1
        return None if n == 0 else np.full(FRAME, n / 100, np.float32)


class ScriptedWorker:
    """Stands for `ModelWorker`: makes scripted conversations, runs calls in a thread."""

    def __init__(self, **options):
        self.options = options
        self.conversations: list[ScriptedConversation] = []

    def new_conversation(self, text_sampler, audio_sampler, seed):
        if self.options.get("fail"):
            raise RuntimeError("scripted failure")
        conversation = ScriptedConversation(text_sampler, audio_sampler, seed, **self.options)
        self.conversations.append(conversation)
        return conversation

    async def run(self, fn, *args):
        return await asyncio.to_thread(fn, *args)


def serve(coroutine_fn, worker=None, static=None, **server_options):
    """Runs `coroutine_fn(server, http)` against a chat server on 127.0.0.1."""
    worker = worker or ScriptedWorker()
    chat = ChatServer(worker, DEFAULT_SAMPLING, OriginPolicy("127.0.0.1"), **server_options)

    async def main():
        async with TestServer(chat.app(static), host="127.0.0.1") as server:
            async with aiohttp.ClientSession() as http:
                return await coroutine_fn(server, http)

    return asyncio.run(main())


def pcm_frames(levels) -> bytes:
    """Frames of constant level, 16-bit PCM, one after the other."""
    return b"".join((np.full(FRAME, level) * 32768).astype("<i2").tobytes() for level in levels)


async def next_message(ws) -> bytes:
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    return msg.data


def test_text_goes_out_before_the_voice_is_decoded():
    gate = threading.Event()
    worker = ScriptedWorker(gate=gate)

    async def talk(server, http):
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            await ws.send_bytes(b"\x01" + pcm_frames([0.1, 0.2, 0.3]))
            for n in range(3):
                assert await next_message(ws) == f"\x02 w{n}".encode()
                gate.set()  # only now may the voice be decoded
                if n:
                    voice = await next_message(ws)
                    assert voice[:1] == b"\x01" and len(voice) == 1 + 2 * FRAME
                    levels = np.frombuffer(voice[1:], "<i2") / 32767
                    np.testing.assert_allclose(levels, n / 100, atol=1e-4)

    serve(talk, worker)
    np.testing.assert_allclose(worker.conversations[0].heard, [0.1, 0.2, 0.3], atol=1e-4)


def test_late_frames_are_dropped_oldest_first(caplog):
    worker = ScriptedWorker(listen_seconds=0.2)  # slower than real time (80 ms a frame)
    levels = [i / 100 for i in range(20)]

    async def talk(server, http):
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            await ws.send_bytes(b"\x01" + pcm_frames(levels))
            while True:  # until the last frame's text: nothing more is queued
                data = await next_message(ws)
                if data[:1] == b"\x02" and worker.conversations[0].heard[-1] > 0.185:
                    break

    with caplog.at_level(logging.INFO, logger="moshi_mlx"):
        serve(talk, worker, max_lag=0.16)  # two frames may wait
    heard = np.round(np.array(worker.conversations[0].heard) * 100).astype(int).tolist()
    assert heard == sorted(heard) and heard[-1] == 19 and len(heard) <= 3
    dropped = 20 - len(heard)
    assert f"20 frames received, {len(heard)} processed, {dropped} dropped" in caplog.text


def test_status_messages_when_asked():
    async def talk(server, http):
        url = server.make_url("/api/chat?audio=pcm&status=1&audio_topk=100")
        async with http.ws_connect(url) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            info = await ws.receive_bytes(timeout=10)
            await ws.send_bytes(b"\x01" + pcm_frames([0.0] * 12))
            messages = [await next_message(ws) for _ in range(12 + 11 + 1)]
            return info, messages

    info, messages = serve(talk, seed=7, max_lag=2.0)
    assert info[:1] == b"\x04"
    assert json.loads(info[1:]) == {
        "type": "conversation", "seed": 7, "audio": "pcm", "max_lag_ms": 2000,
        "text_temp": 0.7, "text_top_k": 25, "audio_temp": 0.8, "audio_top_k": 100}
    kinds = [m[0] for m in messages]
    assert kinds.count(2) == 12 and kinds.count(1) == 11 and kinds[-1] == 4
    status = json.loads(messages[-1][1:])
    assert status["type"] == "status"
    assert (status["received"], status["processed"], status["dropped"]) == (12, 12, 0)


def test_query_sets_the_sampling_and_bad_values_are_refused():
    worker = ScriptedWorker()

    async def connect(server, http):
        firsts = []
        for query in ("text_temperature=0.3&text_topk=5&pad_mult=0&text_seed=9", "",
                      "text_topk=-1", "audio_temperature=warm", "audio=mp3"):
            async with http.ws_connect(server.make_url(f"/api/chat?{query}")) as ws:
                firsts.append(await next_message(ws))
        return firsts

    firsts = serve(connect, worker)
    assert firsts[:2] == [b"\x00\x00\x00"] * 2
    assert firsts[2] == b"\x05bad request: top_k must be >= 0, got -1"
    assert firsts[3] == b"\x05bad request: audio_temperature='warm' is not a number"
    assert firsts[4] == b"\x05bad request: audio='mp3' is not one of opus, pcm"
    first, second = worker.conversations
    assert first.samplers == (utils.Sampler(temp=0.3, top_k=5), utils.Sampler(temp=0.8, top_k=250))
    assert second.samplers == (utils.Sampler(temp=0.7, top_k=25),
                               utils.Sampler(temp=0.8, top_k=250))
    assert first.seed != second.seed  # no --seed: a new random seed per conversation


def test_a_failing_conversation_ends_with_an_error_and_the_server_goes_on():
    worker = ScriptedWorker(fail=True)

    async def connect(server, http):
        async with http.ws_connect(server.make_url("/api/chat")) as ws:
            first = await next_message(ws)
        worker.options.clear()
        async with http.ws_connect(server.make_url("/api/chat")) as ws:
            return first, await next_message(ws)

    failed, then = serve(connect, worker)
    assert failed.startswith(b"\x05internal error")
    assert then == b"\x00\x00\x00"


def request(host: str, origin: str | None, scheme: str = "http"):
    headers = {"Host": host} | ({"Origin": origin} if origin else {})
    req = make_mocked_request("GET", "/api/chat", headers=headers)
    return req.clone(scheme=scheme)


@pytest.mark.parametrize("bound, host, origin, allowed", [
    ("localhost", "localhost:8998", None, True),  # Kyutai's command-line clients send none
    ("localhost", "localhost:8998", "http://localhost:8998", True),
    ("localhost", "127.0.0.1:8998", "http://127.0.0.1:8998/", True),
    ("localhost", "[::1]:8998", "http://[::1]:8998", True),
    ("localhost", "localhost:8998", "http://localhost:5173", False),  # another local server
    ("localhost", "localhost:8998", "https://evil.example", False),
    ("localhost", "localhost:8998", "null", False),  # a file:// page
    ("localhost", "evil.example:8998", "http://evil.example:8998", False),  # DNS rebinding
    ("0.0.0.0", "192.168.1.5:8998", "http://192.168.1.5:8998", True),
    ("0.0.0.0", "192.168.1.5:8998", "https://192.168.1.5:8998", False),  # scheme differs
    ("0.0.0.0", "192.168.1.5:8998", "http://evil.example", False),
])
def test_origin_policy(bound, host, origin, allowed):
    assert OriginPolicy(bound).allows(request(host, origin)) is allowed


def test_origins_allowed_explicitly():
    policy = OriginPolicy("localhost", ["http://localhost:5173/"])
    assert policy.allows(request("localhost:8998", "http://localhost:5173"))
    assert policy.allows(request("localhost:8998", "https://localhost:8998", scheme="https"))
    assert not policy.allows(request("localhost:8998", "http://localhost:5174"))


def test_another_site_cannot_open_the_websocket():
    async def connect(server, http):
        url = server.make_url("/api/chat")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, headers={"Origin": "https://evil.example"})
        own = f"http://{url.host}:{url.port}"
        async with http.ws_connect(url, headers={"Origin": own}) as ws:
            return refused.value.status, await next_message(ws)

    assert serve(connect) == (403, b"\x00\x00\x00")


def test_the_page_is_served_from_the_package():
    files = ("/app.js", "/worklets.js", "/style.css", "/favicon.svg")

    async def fetch(server, http):
        pages = {}
        for path in ("/", *files, "/missing.js"):
            async with http.get(server.make_url(path)) as response:
                pages[path] = (response.status, await response.text())
        return pages

    pages = serve(fetch, static=STATIC_DIR)
    assert pages["/"][0] == 200 and "<title>Moshi</title>" in pages["/"][1]
    assert all(pages[p][0] == 200 for p in files)
    assert pages["/missing.js"][0] == 404

    async def no_page(server, http):
        async with http.get(server.make_url("/")) as response:
            return response.status

    assert serve(no_page, static=None) == 404
