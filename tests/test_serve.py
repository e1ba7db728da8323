"""`serve --stt`: Kyutai's /api/asr-streaming, spoken by clients written here (MessagePack maps
over a websocket), on the small random STT model of `make_demo --kind stt` (text delay 0.5 s,
four voice-activity heads), two slots.

What a client can tell is checked: the message sequence and encoding, the words and times
against Kyutai's server's algorithm on the offline run's tokens of the same audio, markers,
slots, the api key, a vanished client, bad input (one client's problem only)."""

import asyncio
import time
from math import ceil
from types import SimpleNamespace

import aiohttp
import mlx.core as mx
import msgpack
import numpy as np
import pytest
import sphn
from chat_client import receive_within
from conftest import (
    FRAME,
    RATE,
    codec_fails_then_next_client_served,
    kyutai_asr_words,
    serving_in_thread,
    silent_websocket,
    slots_in_use,
    used_slots,
)

from moshi_mlx import __version__, families, model_files, speech_services, utils
from moshi_mlx.engine import offline, transcription
from moshi_mlx.engine.worker import ModelThread
from moshi_mlx.web import speech as speech_web
from moshi_mlx.web.asr import AsrService
from moshi_mlx.web.speech import BUILD_INFO_KEYS, speech_app
from moshi_mlx.weights.demo import MOSHI_NAME, build_demo_repo

pytestmark = pytest.mark.slow  # a server with its model and Mimi processes

ROWS = 2
KEY = "public_token"
DELAY_STEPS = 6  # Kyutai's asr_delay_in_tokens for a 0.5 s delay: word times, marker's wait


@pytest.fixture(scope="module")
def stt_dir(tmp_path_factory):
    """The demo STT repository, its text head changed so that the model writes padding (3) and
    ends of padding (0) often, in the place of two tokens it writes often: words for Kyutai's
    server to make (of the text between padding tokens; the random model writes no padding)."""
    repo = build_demo_repo(tmp_path_factory.mktemp("stt-repo"), seed=5, kind="stt")
    weights = mx.load(str(repo / MOSHI_NAME))
    head = weights["text_linear.weight"]
    rows = mx.arange(head.shape[0])[:, None]
    padding = mx.where(rows == 3, 1.5 * head[610], mx.where(rows == 0, 1.5 * head[583], head))
    weights["text_linear.weight"] = padding.astype(head.dtype)
    mx.save_safetensors(str(repo / MOSHI_NAME), weights)
    return repo


@pytest.fixture(scope="module")
def server(stt_dir):
    """The STT service on 127.0.0.1 (any port), its event loop on a thread of its own."""
    files = model_files.resolve_repo(str(stt_dir))
    model_thread = ModelThread("test-stt")
    transcriber = model_thread.submit(speech_services.transcriber_loader(files, ROWS)).result()
    running = model_thread.submit(transcriber.run)
    asr = AsrService(transcriber, frozenset({KEY, "second_key"}))
    with serving_in_thread(speech_app([asr.service()])) as port:
        yield SimpleNamespace(url=f"ws://127.0.0.1:{port}/api/asr-streaming",
                              http=f"http://127.0.0.1:{port}", files=files, asr=asr, port=port,
                              module=("batched_asr", "/api/asr-streaming", str(ROWS)))
    transcriber.stop()
    running.result(timeout=10)
    transcriber.close_all()


def speech(seconds: float, seed: int) -> np.ndarray:
    """A modulated tone with noise, float32 at 24 kHz."""
    t = np.arange(int(seconds * RATE)) / RATE
    x = 0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    x += 0.05 * np.random.default_rng(seed).normal(size=t.size)
    return x.astype(np.float32)


UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # a websocket handshake's headers


def packb(message: dict) -> bytes:
    return msgpack.packb(message, use_single_float=True)


async def connect(session: aiohttp.ClientSession, url: str, **kwargs):
    return await session.ws_connect(url, headers={"kyutai-api-key": KEY}, **kwargs)


async def receive(ws) -> dict:
    msg = await receive_within(ws, 60)
    assert msg.type == aiohttp.WSMsgType.BINARY, f"{msg.type}: {msg.data}"
    return msgpack.unpackb(msg.data)


async def send_audio(ws, pcm: np.ndarray, chunk: int = 3000) -> None:
    for start in range(0, len(pcm), chunk):
        await ws.send_bytes(packb({"type": "Audio", "pcm": pcm[start:start + chunk].tolist()}))


async def transcribe(ws, pcm: np.ndarray, marker: int = 1) -> list[dict]:
    """Kyutai's file client's way: the audio, a Marker, then silence; the messages until the
    Marker comes back (Ready excluded)."""
    assert (await receive(ws)) == {"type": "Ready"}
    await send_audio(ws, pcm)
    await ws.send_bytes(packb({"type": "Marker", "id": marker}))
    await send_audio(ws, np.zeros(2 * RATE, np.float32), chunk=RATE)
    messages = []
    while (message := await receive(ws))["type"] != "Marker":
        messages.append(message)
    assert message == {"type": "Marker", "id": marker}
    return messages


def run(coroutine):
    return asyncio.run(coroutine)


def kyutai_words(server, pcm: np.ndarray, steps: int) -> list[dict]:
    """The Word and EndWord messages of Kyutai's server (conftest's `kyutai_asr_words`) for the
    text tokens of the first `steps` steps of the offline run (run_inference's loop) of `pcm`,
    greedy."""
    model, tokenizer, _ = model_files.load_model(server.files, warmup=False)
    conversation = families.conversation(model, tokenizer, server.files.mimi_weight,
                                         utils.Sampler(temp=0), utils.Sampler())
    try:
        result = offline.run(conversation, pcm, families.offline_plan(conversation))
    finally:
        conversation.close()
    tokens = [frame.token for frame in result.frames[:steps]]
    assert len(tokens) == steps
    return [{"type": "Word", "text": e[1], "start_time": e[2]} if e[0] == "Word"
            else {"type": "EndWord", "stop_time": e[1]}
            for e in kyutai_asr_words(tokens, DELAY_STEPS, tokenizer.decode)]


def test_words_and_times_are_kyutais_on_the_offline_tokens(server):
    """The same audio, padded as the offline loop pads it: the Word and EndWord messages Kyutai's
    server makes of the offline run's text tokens. One Step per frame with the four heads'
    probabilities, counted as Kyutai's server counts its steps (its two warm-up steps first)."""
    pcm = speech(2.0, seed=2)
    padded = np.concatenate([pcm, np.zeros(int(1.5 * RATE), np.float32)])
    frames = ceil(len(padded) / FRAME)
    padded = np.concatenate([padded, np.zeros(frames * FRAME - len(padded), np.float32)])

    async def client():
        async with aiohttp.ClientSession() as session, await connect(session, server.url) as ws:
            return await transcribe(ws, padded)

    messages = run(client())
    steps = [m for m in messages if m["type"] == "Step"]
    assert len(steps) == frames + DELAY_STEPS
    assert all(len(m["prs"]) == 4 and all(0 <= p <= 1 for p in m["prs"]) for m in steps)
    assert [m["step_idx"] for m in steps] == list(range(steps[0]["step_idx"],
                                                        steps[0]["step_idx"] + len(steps)))
    assert steps[0]["step_idx"] >= 3
    words = [m for m in messages if m["type"] in ("Word", "EndWord")]
    # the events of the first `frames` steps come first (then those of the silence after)
    expected = kyutai_words(server, pcm, frames)
    assert expected, "nothing was transcribed"
    assert words[:len(expected)] == expected


def test_step_probabilities_are_float32_and_times_float64(server):
    """Kyutai's server writes its f32 vectors as MessagePack float32, its f64 times as float64."""

    async def client():
        async with aiohttp.ClientSession() as session, await connect(session, server.url) as ws:
            await receive(ws)
            await send_audio(ws, speech(4.0, seed=2))
            raw = {}  # the first Step and the first Word
            while len(raw) < 2:
                data = (await receive_within(ws, 60)).data
                raw.setdefault(msgpack.unpackb(data)["type"], data)
                raw.pop("EndWord", None)
            return raw

    raw = run(client())
    prs = raw["Step"][raw["Step"].index(b"\xa3prs\x94") + 5:]  # an array of 4: 0xca, 4 bytes
    assert [prs[i] for i in range(0, 20, 5)] == [0xCA] * 4
    assert raw["Word"][raw["Word"].index(b"\xaastart_time") + 11] == 0xCB  # 0xcb, 8 bytes


def test_marker_waits_for_the_audio_before_it_and_the_delay(server):
    """A marker after 2.5 frames comes back after 2 + 6 steps (as Kyutai's server: the whole
    frames before it, then its asr_delay_in_tokens); audio after it is still taken and the
    server does not close."""

    async def client():
        async with aiohttp.ClientSession() as session, await connect(session, server.url) as ws:
            assert (await receive(ws))["type"] == "Ready"
            await send_audio(ws, speech(2.5 * FRAME / RATE, seed=3))
            await ws.send_bytes(packb({"type": "Marker", "id": 42}))
            await send_audio(ws, np.zeros(20 * FRAME, np.float32), chunk=FRAME)
            steps = 0
            while (message := await receive(ws))["type"] != "Marker":
                steps += message["type"] == "Step"
            assert message == {"type": "Marker", "id": 42}
            more = 0
            while more < 3:  # still transcribing the audio after the marker
                more += (await receive(ws))["type"] == "Step"
            assert not ws.closed
            return steps

    assert run(client()) == 2 + DELAY_STEPS


def test_ogg_opus_audio_is_transcribed(server):
    """OggOpus{data}: an Ogg-Opus stream, in pages as they come, transcribed frame by frame; a
    page as an array of byte values (as Kyutai's server reads it) or as bytes."""
    writer = sphn.OpusStreamWriter(RATE)
    pcm = speech(1.0, seed=5)
    pages = [writer.append_pcm(pcm[i:i + FRAME]) for i in range(0, len(pcm) - FRAME + 1, FRAME)]

    async def client():
        async with aiohttp.ClientSession() as session, await connect(session, server.url) as ws:
            assert (await receive(ws))["type"] == "Ready"
            for i, page in enumerate(pages):
                data = list(page) if i % 2 == 0 else page
                await ws.send_bytes(packb({"type": "OggOpus", "data": data}))
            steps = 0
            while steps < len(pages) - 2:  # Opus's own delay holds back a little
                steps += (await receive(ws))["type"] == "Step"
            return steps

    assert run(client()) == len(pages) - 2


def test_slots_auth_and_build_info(server):
    """Two slots: a third client gets Error 'no free channels' and a close; once one leaves
    its slot is free again. A wrong key is HTTP 401 before the websocket; ?auth_id works."""

    async def client():
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.http}/api/build_info") as response:
                assert response.status == 200
                info = await response.json()  # the keys of Kyutai's server's, all strings
                assert sorted(info) == sorted(BUILD_INFO_KEYS)
                assert all(isinstance(value, str) for value in info.values())
                assert __version__ in info["git_describe"]
            for bad in ({"headers": {"kyutai-api-key": "wrong"}}, {}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await session.ws_connect(server.url, **bad)
                assert e.value.status == 401
            # as Kyutai's server: the 401 has no body; a GET that is no upgrade is a 400
            async with session.get(server.url, headers=UPGRADE) as response:
                assert response.status == 401 and await response.read() == b""
            async with session.get(server.url) as response:
                assert response.status == 400
            await slots_in_use(session, server, 0)
            first = await connect(session, server.url)
            second = await session.ws_connect(f"{server.url}?auth_id=second_key")
            for ws in (first, second):
                assert (await receive(ws))["type"] == "Ready"
            assert await used_slots(session, server) == 2
            third = await connect(session, server.url)
            assert (await receive(third)) == {"type": "Error", "message": "no free channels"}
            assert (await receive_within(third, 10)).type == aiohttp.WSMsgType.CLOSE
            await first.close()
            await slots_in_use(session, server, 1)
            fourth = await connect(session, server.url)
            assert (await receive(fourth))["type"] == "Ready"
            await second.close()
            await fourth.close()

    run(client())


def test_a_vanished_client_frees_its_slot(server, monkeypatch):
    """A client that stops answering (its process frozen, its network gone) is dropped by the
    pings (here every 2 s, to be quick); its slot is free again."""
    monkeypatch.setattr(speech_web, "PING_SECONDS", 2.0)

    async def client():
        async with aiohttp.ClientSession() as session:
            await slots_in_use(session, server, 0)
            sock = silent_websocket(server.port, "/api/asr-streaming")
            await slots_in_use(session, server, 1)
            start = time.monotonic()
            while await used_slots(session, server) != 0:
                assert time.monotonic() - start < 15, "the silent client still holds its slot"
                await asyncio.sleep(0.2)
            sock.close()

    run(client())


BAD_INPUT_PCM = speech(1.5, seed=4)


async def words_of(session: aiohttp.ClientSession, server, pcm: np.ndarray) -> list[dict]:
    async with await connect(session, server.url) as ws:
        return [m for m in await transcribe(ws, pcm) if m["type"] == "Word"]


@pytest.fixture(scope="module")
def alone(server) -> list[dict]:
    """The Words of BAD_INPUT_PCM transcribed with no other client."""

    async def client():
        async with aiohttp.ClientSession() as session:
            return await words_of(session, server, BAD_INPUT_PCM)

    return run(client())


@pytest.mark.parametrize("bad, says", [
    (b"\x00\xff garbage", "not a MessagePack message"),
    (packb({"type": "Hello"}), "unknown message type 'Hello'"),
    (packb({"type": "Audio", "pcm": ["a", "b"]}), "'pcm' must be a list of numbers"),
    (packb({"type": "Audio", "pcm": 3}), "'pcm' must be a list of numbers"),
    (packb([1, 2]), "a MessagePack map with a string 'type'"),
    (packb({"type": "Marker", "id": "x"}), "'id' must be an integer"),
    (packb({"type": "Marker", "id": True}), "'id' must be an integer"),
    (packb({"type": "Marker", "id": 2**63}), "'id' must be an integer"),
    (packb({"type": "OggOpus", "data": b"not an Ogg stream" * 10}), "not an Ogg-Opus stream"),
    (packb({"type": "OggOpus", "data": "text"}), "'data' must be bytes"),
    (packb({"type": "OggOpus", "data": [79, 300]}), "a list of byte values"),
    (packb({"type": "Audio", "pcm": [0.0] * 6 * RATE}), "more than 5 s of audio waiting"),
    (packb({"type": "Audio", "pcm": [0.5, float("nan")]}), "not a finite number"),
    (b"\x00" * (5 * 1024 * 1024), None),
], ids=["not-msgpack", "unknown-type", "pcm-strings", "pcm-number", "not-a-map", "marker-id",
        "marker-bool", "marker-u64",
        "not-ogg", "opus-not-bytes", "opus-not-byte-values", "too-much-audio", "nan", "huge"])
def test_bad_input_is_one_clients_problem(server, alone, bad, says, monkeypatch):
    """Error to that client and a close; another client streaming at the same time gets the
    words it gets alone. A message over the size limit (4 MiB) is dropped with the connection
    (the server does not read it: no Error can follow it)."""
    monkeypatch.setattr(transcription, "MAX_BUFFERED_SECONDS", 5.0)
    pcm = BAD_INPUT_PCM

    async def evil(session):
        ws = await connect(session, server.url)
        assert (await receive(ws))["type"] == "Ready"
        await send_audio(ws, pcm[:5000])
        if says is None:
            with pytest.raises(ConnectionError):
                await ws.send_bytes(bad)
                while (await receive_within(ws, 10)).type == aiohttp.WSMsgType.BINARY:
                    pass
                raise ConnectionError
            return
        await ws.send_bytes(bad)
        while (message := await receive(ws))["type"] != "Error":
            pass
        assert says in message["message"]
        assert (await receive_within(ws, 10)).type == aiohttp.WSMsgType.CLOSE

    async def both():
        async with aiohttp.ClientSession() as session:
            await slots_in_use(session, server, 0)
            together, _ = await asyncio.wait_for(
                asyncio.gather(words_of(session, server, pcm), evil(session)), timeout=120)
            return together

    assert run(both()) == alone


def test_a_client_busy_for_seconds_stays(server):
    """Kyutai's file client (delayed-streams-modeling's stt_from_file_rust_server.py) reads and
    resamples its whole file after connecting, its event loop blocked meanwhile (about 3 s for
    an hour of audio): it answers no ping for that long, and is still served, as by Kyutai's
    server (a ping every 10 s, no pong due)."""

    async def client():
        async with aiohttp.ClientSession() as session, await connect(session, server.url) as ws:
            time.sleep(3.5)  # blocks this event loop, as the file client's read does
            return await transcribe(ws, speech(0.5, seed=4))

    assert [message for message in run(client()) if message["type"] == "Step"]


def test_a_codec_that_does_not_start_is_one_clients_error(server, mimi_fails_to_start_once):
    """The slot's Mimi cannot start: Error and close 1011 for that client, a log line, and the
    next client on the same slot gets its words."""

    async def served(ws):
        assert len(await transcribe(ws, BAD_INPUT_PCM)) > 0

    async def clients():
        async with aiohttp.ClientSession() as session:
            await codec_fails_then_next_client_served(session, server, connect, server.url,
                                                      served)

    run(clients())
    assert len(mimi_fails_to_start_once) == 1


def test_a_client_reconnecting_at_once_is_served(server, monkeypatch):
    """Both slots held; one client leaves and another connects at once, while the slot's Mimi
    is still being prepared (made to take 1 s): it waits for that slot and gets Ready, not "no
    free channels" (Kyutai's server frees a channel at once; its clients reconnect so)."""
    from moshi_mlx.audio.mimi import Mimi

    prepare = Mimi.prepare_next

    def slow_prepare(self):
        time.sleep(1.0)
        prepare(self)

    monkeypatch.setattr(Mimi, "prepare_next", slow_prepare)

    async def clients():
        async with aiohttp.ClientSession() as session:
            await slots_in_use(session, server, 0)
            first, second = await connect(session, server.url), await connect(session, server.url)
            for ws in (first, second):
                assert (await receive(ws))["type"] == "Ready"
            await first.close()
            async with await connect(session, server.url) as third:
                assert (await receive(third))["type"] == "Ready"
                assert await used_slots(session, server) == 2
            await second.close()

    run(clients())
