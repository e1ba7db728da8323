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
from aiohttp.test_utils import TestServer
from chat_client import receive_within
from conftest import FRAME
from server_probes import gone_client

from moshi_mlx import utils
from moshi_mlx.engine.worker import ModelThread
from moshi_mlx.utils.sampling import SamplingSettings
from moshi_mlx.web.origin import OriginPolicy
from moshi_mlx.web.protocol import PcmAudio
from moshi_mlx.web.server import STATIC_DIR, ChatServer

DEFAULT_SAMPLING = SamplingSettings(0.7, 25, 0.8, 250)


class ScriptedConversation:
    """Says " w{n}" at step n and, from step 1, a voice frame of constant level n / 100.
    Records the mean of each frame it hears; Moshi's step can be slowed (`step_seconds`) or
    made to raise (`fail_at`), the decoding held by a gate, the clean-up by another
    (`cleanup_gate`)."""

    def __init__(self, text_sampler, audio_sampler, seed, step_seconds=0.0, gate=None,
                 fail_at=None, cleanup_gate=None):
        self.samplers = (text_sampler, audio_sampler)
        self.seed = seed
        self.step_seconds = step_seconds
        self.gate = gate
        self.fail_at = fail_at
        self.cleanup_gate = cleanup_gate
        self.heard: list[float] = []
        self.ended = False

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        assert pcm.shape == (FRAME,) and pcm.dtype == np.float32
        self.heard.append(float(pcm.mean()))
        return np.array([len(self.heard) - 1])

    def moshi_step(self, codes: np.ndarray):
        n = int(codes[0])
        time.sleep(self.step_seconds)
        if n == self.fail_at:
            raise RuntimeError("scripted failure")
        return n, f" w{n}", None if n == 0 else codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        if self.gate is not None:  # one permit per text the client has received
            assert self.gate.acquire(timeout=10), "the voice waited for its text in vain"
        return np.full(FRAME, int(codes[0]) / 100, np.float32)

    def mimi_seconds(self, direction: str) -> float:
        return 0.0

    def prepare_next(self):
        if self.cleanup_gate is not None:
            assert self.cleanup_gate.wait(timeout=30), "the clean-up was never let through"
        self.ended = True


class ScriptedWorker:
    """Stands for `ModelWorker`: makes scripted conversations, runs calls in its thread."""

    def __init__(self, **options):
        self.options = options
        self.conversations: list[ScriptedConversation] = []
        self.executor = ModelThread("scripted-model")

    def new_conversation(self, text_sampler, audio_sampler, seed):
        if self.options.get("fail"):
            raise RuntimeError("scripted failure")
        conversation = ScriptedConversation(text_sampler, audio_sampler, seed, **self.options)
        self.conversations.append(conversation)
        return conversation

    async def run(self, fn, *args):
        return await asyncio.wrap_future(self.executor.submit(fn, *args))


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
    msg = await receive_within(ws, 10)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    return msg.data


def test_text_goes_out_before_the_voice_is_decoded():
    """Moshi's voice of step n is decoded only once the client has received the text of step n
    (the decoder waits for it): the text is not held back by the voice."""
    gate = threading.Semaphore(0)
    worker = ScriptedWorker(gate=gate)

    async def talk(server, http):
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            await ws.send_bytes(b"\x01" + pcm_frames([0.1, 0.2, 0.3]))
            received = []
            while len(received) < 5:
                received.append(await next_message(ws))
                if received[-1][:1] == b"\x02" and received[-1] != b"\x02 w0":
                    gate.release()
            return received

    received = serve(talk, worker)
    assert [m for m in received if m[:1] == b"\x02"] == [b"\x02 w0", b"\x02 w1", b"\x02 w2"]
    voices = [m for m in received if m[:1] == b"\x01"]
    for n, voice in enumerate(voices, start=1):
        assert received.index(f"\x02 w{n}".encode()) < received.index(voice)
        assert len(voice) == 1 + 2 * FRAME
        np.testing.assert_allclose(np.frombuffer(voice[1:], "<i2") / 32767, n / 100, atol=1e-4)
    np.testing.assert_allclose(worker.conversations[0].heard, [0.1, 0.2, 0.3], atol=1e-4)


def test_late_frames_are_dropped_oldest_first(caplog):
    worker = ScriptedWorker(step_seconds=0.2)  # slower than real time (80 ms a frame)
    levels = [i / 100 for i in range(20)]

    async def talk(server, http):
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            await ws.send_bytes(b"\x01" + pcm_frames(levels))
            while True:  # until the last frame's text: nothing more is queued
                data = await next_message(ws)
                heard = worker.conversations[0].heard
                if heard[-1] > 0.185 and data == f"\x02 w{len(heard) - 1}".encode():
                    break

    with caplog.at_level(logging.INFO, logger="moshi_mlx"):
        serve(talk, worker, max_lag=0.16)  # two frames may wait
    heard = np.round(np.array(worker.conversations[0].heard) * 100).astype(int).tolist()
    # Moshi's frame, one in its queue, one in the encoder's hands, 2 waiting in front of it
    assert heard == sorted(heard) and heard[-1] == 19 and len(heard) <= 5
    dropped = 20 - len(heard)
    assert (f"20 frames received, {len(heard)} processed, {dropped} dropped; latency text "
            in caplog.text)


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
    for latency in ("latency_text_ms", "latency_voice_ms"):
        assert 0 <= status[latency]["p50"] <= status[latency]["p95"]
    assert set(status["stages_ms"]) == {"input", "encode", "moshi", "decode", "output"}


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
    assert firsts[2] == (b"\x05bad request: text_topk must be an integer >= 0 (0 keeps every "
                         b"token), got -1")
    assert firsts[3] == (b"\x05bad request: audio_temperature='warm' is not a number: it must "
                         b"be 0 (greedy) or a finite number above 0")
    assert firsts[4] == b"\x05bad request: audio='mp3' is not one of opus, pcm"
    first, second = worker.conversations
    assert first.samplers == (utils.Sampler(temp=0.3, top_k=5, top_p=1.0),
                              utils.Sampler(temp=0.8, top_k=250, top_p=1.0))
    assert second.samplers == (utils.Sampler(temp=0.7, top_k=25, top_p=1.0),
                               utils.Sampler(temp=0.8, top_k=250, top_p=1.0))
    assert first.seed != second.seed  # no --seed: a new random seed per conversation


def test_query_values_out_of_the_vocabulary_name_the_parameter_and_its_range():
    async def connect(server, http):
        firsts = []
        for query in ("audio_topk=2049", "text_topk=99999999999999999999999",
                      "text_temperature=nan", "audio_temperature=1e309", "text_topk=1.5"):
            async with http.ws_connect(server.make_url(f"/api/chat?{query}")) as ws:
                firsts.append((await next_message(ws), await ws.receive(timeout=10)))
        return firsts

    firsts = serve(connect, vocab=(32000, 2048))
    assert [m for m, _ in firsts] == [
        b"\x05bad request: audio_topk must be an integer from 0 to 2048 (0 or 2048 keeps every "
        b"token), got 2049",
        b"\x05bad request: text_topk must be an integer from 0 to 32000 (0 or 32000 keeps every "
        b"token), got 99999999999999999999999",
        b"\x05bad request: text_temperature must be 0 (greedy) or a finite number above 0, "
        b"got nan",
        b"\x05bad request: audio_temperature must be 0 (greedy) or a finite number above 0, "
        b"got inf",
        b"\x05bad request: text_topk='1.5' is not a number: it must be an integer from 0 to "
        b"32000"]
    assert all(close.type == aiohttp.WSMsgType.CLOSE and close.extra for _, close in firsts)


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


def test_a_stage_that_raises_ends_the_conversation_and_the_next_one_works(caplog):
    worker = ScriptedWorker(fail_at=2)

    async def connect(server, http):
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            await ws.send_bytes(b"\x01" + pcm_frames([0.1] * 5))
            received = []
            async for msg in ws:
                received.append(msg.data)
            close = (ws.close_code, msg.extra if msg.type == aiohttp.WSMsgType.CLOSE else None)
        worker.options.clear()
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            await ws.send_bytes(b"\x01" + pcm_frames([0.1] * 2))
            return received, close, [await next_message(ws) for _ in range(3)]

    with caplog.at_level(logging.INFO, logger="moshi_mlx"):
        received, close, then = serve(connect, worker)
    assert received[-1].startswith(b"\x05internal error")
    assert b"\x02 w2" not in received and close[0] == 1011
    assert "conversation failed in its moshi stage" in caplog.text
    assert then == [b"\x02 w0", b"\x02 w1",
                    b"\x01" + PcmAudio().encode(np.full(FRAME, 0.01, np.float32))]
    assert all(c.ended for c in worker.conversations)  # Mimi's next streams prepared


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


async def receive_until_closed(ws) -> tuple[list[bytes], tuple]:
    """The server's messages until it closes (the client answers its pings meanwhile):
    (messages, (close code, reason))."""
    messages = []
    while (msg := await ws.receive(timeout=90)).type == aiohttp.WSMsgType.BINARY:
        messages.append(msg.data)
    return messages, (ws.close_code, msg.extra if msg.type == aiohttp.WSMsgType.CLOSE else None)


@pytest.mark.slow  # a 10 s pause, in real time
def test_a_live_client_may_pause_and_only_the_idle_limit_ends_its_conversation():
    """A client that answers pings but sends its first audio 3 s late (a permission prompt),
    then pauses 10 s, keeps its conversation; once it sends no audio for `idle_timeout` it is
    closed with the reason, and the next client has the model."""

    async def pause(server, http):
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            with pytest.raises(asyncio.TimeoutError):  # nothing to say for 3 s, no close
                await receive_within(ws, 3)
            await ws.send_bytes(b"\x01" + pcm_frames([0.1]))
            first = await next_message(ws)
            with pytest.raises(asyncio.TimeoutError):
                await receive_within(ws, 10)
            await ws.send_bytes(b"\x01" + pcm_frames([0.2, 0.3]))
            return [first] + [await next_message(ws) for _ in range(4)]

    received = serve(pause)
    assert [m for m in received if m[:1] == b"\x02"] == [b"\x02 w0", b"\x02 w1", b"\x02 w2"]
    assert [m for m in received if m[:1] == b"\x01"] == [
        b"\x01" + PcmAudio().encode(np.full(FRAME, n / 100, np.float32)) for n in (1, 2)]

    async def idle(server, http):
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            await ws.send_bytes(b"\x01" + pcm_frames([0.1]))
            ended = await receive_until_closed(ws)
        async with http.ws_connect(server.make_url("/api/chat")) as next_client:
            return ended, await next_message(next_client)

    (messages, close), handshake = serve(idle, idle_timeout=1.0)
    assert messages == [b"\x02 w0"]  # Moshi's text for the frame it heard, then the close
    assert close == (aiohttp.WSCloseCode.OK, "no audio for 1 s")
    assert handshake == b"\x00\x00\x00"


@pytest.mark.slow  # the 2 s rule, in real time
def test_a_client_that_answers_no_pings_frees_the_model_2_s_after_its_last_pong(caplog):
    """A client that sends a second of audio, then stops reading and answering pings with its
    socket open: 2 s after its last pong the model is free (the next client's handshake), with
    one log line; not before."""

    async def vanish(server, http):
        return await gone_client(server.host, server.port, frames=12)

    with caplog.at_level(logging.INFO, logger="moshi_mlx"):
        gone = serve(vanish)
    print(f"\nthe model was free {gone.freed_after:.2f} s after the client's last pong")
    assert gone.first == b"\x00\x00\x00" and gone.pongs >= 2
    assert gone.busy_meanwhile.startswith(b"\x05busy")
    assert 2.0 <= gone.freed_after < 5.0  # the rule is 2 s; the rest: clean-up, a loaded machine
    lines = [r.message for r in caplog.records if "answered no ping" in r.message]
    assert len(lines) == 1 and "answered no ping for 2.0 s (gone)" in lines[0], lines
    assert not [r.getMessage() for r in caplog.records if r.exc_info]  # no traceback


def test_a_client_beyond_the_one_holding_the_model_is_always_told_busy():
    """While a conversation's clean-up is held, the next client is accepted and waits; a third
    is refused. Once the clean-up is done and the second talks, a fourth is refused too (the
    first conversation's end must not free the second's turn)."""
    cleanup = threading.Event()
    worker = ScriptedWorker(cleanup_gate=cleanup)

    async def clients(server, http):
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as first:
            assert await next_message(first) == b"\x00\x00\x00"
            await first.send_bytes(b"\x01" + pcm_frames([0.1]))
            assert await next_message(first) == b"\x02 w0"
        await asyncio.sleep(0.3)  # the first conversation's clean-up has begun, and waits
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as second:
            waiting = asyncio.create_task(next_message(second))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # accepted: it waits for the clean-up
            refused = []
            async with http.ws_connect(server.make_url("/api/chat")) as third:
                refused.append(await next_message(third))
            cleanup.set()
            assert await waiting == b"\x00\x00\x00"
            for _ in range(3):
                async with http.ws_connect(server.make_url("/api/chat")) as other:
                    refused.append(await next_message(other))
                    close = await other.receive(timeout=10)
            await second.send_bytes(b"\x01" + pcm_frames([0.2]))
            talked = await next_message(second)
        return refused, close, talked

    refused, close, talked = serve(clients, worker)
    assert all(m.startswith(b"\x05busy") for m in refused), refused
    assert close.type == aiohttp.WSMsgType.CLOSE
    assert close.data == aiohttp.WSCloseCode.TRY_AGAIN_LATER
    assert talked == b"\x02 w0"


def test_closes_that_aiohttp_makes_itself_carry_a_reason():
    async def connect(server, http):
        async with http.ws_connect(server.make_url("/api/chat?audio=pcm")) as ws:
            assert await next_message(ws) == b"\x00\x00\x00"
            await ws.send_bytes(b"\x01" + bytes(300_000))
            while (msg := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY:
                pass
            return ws.close_code, msg.extra

    assert serve(connect) == (aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
                              "message too big: at most 256 KiB")
