"""`serve --tts`: Kyutai's /api/tts_streaming, spoken by clients written here (MessagePack maps
over a websocket, as Kyutai's `tts_rust_server.py` and Unmute speak it), on the small random
TTS demo model (speaker conditioning, lookahead 2 words, 8 codebooks), sampling at a
temperature with the service's seed (each stream draws with a key of its own), two slots; the
voices in a local voice directory.

What a client can tell is checked: the message sequence (Ready, Audio and Text, a normal close
after Eos), the audio and word times against `TtsStream` run offline on the same words and
voice, words arriving one at a time (the same audio: no gap), two clients at once (batched
steps: each its offline audio, drawn as alone), the four formats, the Voice message, slots,
the api key, bad input (one client's problem only)."""

import asyncio
import time
from types import SimpleNamespace

import aiohttp
import mlx.core as mx
import msgpack
import numpy as np
import pytest
import sphn
from chat_client import receive_within
from conftest import (
    codec_fails_then_next_client_served,
    serving_in_thread,
    silent_websocket,
    slots_in_use,
)

from moshi_mlx import model_files, speech_services, utils
from moshi_mlx.audio.constants import FRAME_RATE, FRAME_SIZE
from moshi_mlx.engine.speech_synthesis import Synthesizer
from moshi_mlx.engine.tts import TtsOptions, TtsStream
from moshi_mlx.engine.worker import ModelThread
from moshi_mlx.model_files.demo import demo_repo
from moshi_mlx.web import speech as speech_web
from moshi_mlx.web.speech import speech_app
from moshi_mlx.web.tts import TtsService

pytestmark = pytest.mark.slow  # a server with its model and Mimi processes

SLOTS = 2
KEY = "public_token"
SUFFIX = ".demo@0.safetensors"  # the demo config's model_id
WORDS = ["Hello", "there,", "how", "are", "you?"]
SAMPLERS = (utils.Sampler(temp=0.8, top_k=25), utils.Sampler(temp=0.8, top_k=250))
SEED = 1  # the service's: every stream's, as no client gives one


def voice_file(path, seed: int):
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((1, 512, 10)).astype(np.float32)
    mx.save_safetensors(str(path), {"speaker_wavs": mx.array(embedding)})
    return embedding


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The TTS service on 127.0.0.1 (any port), its event loop on a thread of its own; voices
    'alice' (the default) and 'bob' in a local voice directory."""
    root = tmp_path_factory.mktemp("tts-serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        repo = demo_repo(kind="tts")
    voices = root / "voices"
    (voices / "people").mkdir(parents=True)
    embeddings = {name: voice_file(voices / "people" / f"{name}.wav{SUFFIX}", seed)
                  for seed, name in enumerate(("alice", "bob"))}
    files = model_files.resolve_repo(str(repo))
    model_thread = ModelThread("test-tts")
    synthesizer = model_thread.submit(speech_services.synthesizer_loader(
        files, SLOTS, str(voices), "people/alice.wav", SAMPLERS, TtsOptions(n_q=24),
        seed=SEED)).result()
    running = model_thread.submit(synthesizer.run)
    tts = TtsService(synthesizer, frozenset({KEY}))
    with serving_in_thread(speech_app([tts.service()])) as port:
        yield SimpleNamespace(url=f"ws://127.0.0.1:{port}/api/tts_streaming",
                              http=f"http://127.0.0.1:{port}", files=files, port=port,
                              embeddings=embeddings,
                              module=("py", "/api/tts_streaming", str(SLOTS)))
    synthesizer.stop()
    running.result(timeout=10)
    synthesizer.close_all()


def served_options(cfg) -> TtsOptions:
    """The options of the server's streams: 8 codebooks (the demo's), and Kyutai's server's
    end: the model's acoustic delay after the offline one."""
    return TtsOptions(n_q=8, final_padding=TtsOptions.final_padding + cfg.max_delay)


def offline(server, words: list[str], voice: str) -> tuple[np.ndarray, list[dict]]:
    """`TtsStream` alone on the same text, voice and seed, as Kyutai's server runs it: (audio
    float32 [frames, 1920], clamped to +-0.99; the Text messages: each word from the steps run
    when it was taken, that step included, to the steps run when the next was)."""
    model, tokenizer, cfg = model_files.load_model(server.files, warmup=False)
    stream = TtsStream(model, tokenizer, server.files.mimi_weight,
                       [mx.array(server.embeddings[voice])], SAMPLERS, served_options(cfg),
                       seed=SEED)
    try:
        stream.push_text(" ".join(words))
        stream.end()
        frames, starts, steps = [], [], 0
        while not stream.done:
            s = stream.step()
            steps += 1
            starts += [(word, steps / FRAME_RATE) for word, _ in s.words]
            if s.pcm is not None:
                frames.append(np.clip(s.pcm, -0.99, 0.99))
    finally:
        stream.close()
    stops = [t for _, t in starts[1:]] + [steps / FRAME_RATE]
    texts = [{"type": "Text", "text": w, "start_s": t, "stop_s": stop}
             for (w, t), stop in zip(starts, stops, strict=True)]
    return np.stack(frames), texts


@pytest.fixture(scope="module")
def alice(server):
    return offline(server, WORDS, "alice")


def packb(message: dict) -> bytes:
    return msgpack.packb(message, use_single_float=True)


def url(server, **query) -> str:
    query = {"format": "PcmMessagePack", **query}
    return f"{server.url}?" + "&".join(f"{k}={v}" for k, v in query.items())


async def connect(session, address: str):
    return await session.ws_connect(address, headers={"kyutai-api-key": KEY})


async def until_closed(ws) -> tuple[list, int]:
    """Every message until the server closes -> (the messages, unpacked for binary MessagePack
    ones, the close code)."""
    messages = []
    while True:
        msg = await receive_within(ws, 60)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return messages, msg.data
        assert msg.type == aiohttp.WSMsgType.BINARY, f"{msg.type}: {msg.data}"
        messages.append(msg.data)


async def speak(session, address: str, texts: list[str], pause: float = 0.0,
                before: list[bytes] = ()) -> tuple[list, int]:
    """Kyutai's client's way: each text as a Text message (`pause` seconds apart), then Eos;
    the raw messages until the server closes, and the close code."""
    ws = await connect(session, address)
    for data in before:
        await ws.send_bytes(data)
    for text in texts:
        await ws.send_bytes(packb({"type": "Text", "text": text}))
        await asyncio.sleep(pause)
    await ws.send_bytes(packb({"type": "Eos"}))
    return await until_closed(ws)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=180))


def split(messages: list[bytes]) -> tuple[list[dict], np.ndarray, list[dict]]:
    """MessagePack messages -> (all, unpacked; the Audio frames [frames, 1920]; the Texts)."""
    unpacked = [msgpack.unpackb(m) for m in messages]
    audio = [np.array(m["pcm"], np.float32) for m in unpacked if m["type"] == "Audio"]
    return (unpacked, np.stack(audio) if audio else np.zeros((0, FRAME_SIZE)),
            [m for m in unpacked if m["type"] == "Text"])


@pytest.mark.parametrize("texts, pause", [
    ([" ".join(WORDS)], 0.0), (WORDS, 0.0), (WORDS, 0.4)],
    ids=["one-text", "word-by-word", "words-slowly"])
def test_audio_and_words_are_the_offline_ones(server, alice, texts, pause):
    """Ready, then Audio (1920 float32 samples each) and Text, then a close 1000 after Eos;
    the audio is `TtsStream`'s offline, frame for frame, whether the words come at once or one
    at a time with pauses (the stream waits for its words: no gap, no extra frame)."""
    messages, code = run(speak_session(url(server), texts, pause))
    unpacked, audio, texts_out = split(messages)
    assert code == 1000
    assert unpacked[0] == {"type": "Ready"}
    assert {m["type"] for m in unpacked[1:]} == {"Audio", "Text"}
    assert all(m.startswith(b"\x82\xa4type\xa5Audio\xa3pcm\xdc\x07\x80\xca")
               for m in messages if b"Audio" in m[:12])  # 1920 float32s, as Kyutai's server
    expected_audio, expected_texts = alice
    assert audio.shape == expected_audio.shape
    np.testing.assert_array_equal(audio, expected_audio)
    assert [t["text"] for t in texts_out] == WORDS
    assert texts_out == expected_texts


async def speak_session(address: str, texts: list[str], pause: float = 0.0,
                        before: list[bytes] = ()):
    async with aiohttp.ClientSession() as session:
        return await speak(session, address, texts, pause, before)


def test_voice_from_the_query_or_a_voice_message(server, alice):
    """`voice=people/bob.wav` and a Voice message holding bob's embedding give bob's offline
    audio, not alice's. Bob by name speaks while alice (the default voice, longer) does: the
    two streams share the batched steps, and each gets its offline audio and word times."""
    bob, bob_texts = offline(server, WORDS[:3], "bob")
    embedding = server.embeddings["bob"]
    voice = packb({"type": "Voice", "embeddings": embedding.reshape(-1).tolist(),
                   "shape": list(embedding.shape)})

    async def together():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(
                speak(session, url(server, voice="people%2Fbob.wav"), WORDS[:3]),
                speak(session, url(server), WORDS))

    (by_name, _), (with_bob, _) = run(together())
    by_message = split(run(speak_session(url(server), WORDS[:3], before=[voice]))[0])[1]
    np.testing.assert_array_equal(split(by_name)[1], bob)
    assert split(by_name)[2] == bob_texts
    np.testing.assert_array_equal(split(with_bob)[1], alice[0])
    assert split(with_bob)[2] == alice[1]
    np.testing.assert_array_equal(by_message, bob)


@pytest.mark.parametrize("fmt", ["Pcm", "OggOpus", "OggOpusMessagePack"])
def test_other_formats(server, alice, fmt):
    """`Pcm`: only the audio, float32 little-endian bytes; `OggOpus`: only Ogg pages;
    `OggOpusMessagePack`: Ready, OggOpus{data} pages (arrays of byte values) and Text. The
    header pages come first, on their own. The Opus audio decodes to about the offline audio's
    length (Opus keeps a few ms back until the next page)."""
    messages, code = run(speak_session(url(server, format=fmt), WORDS))
    assert code == 1000
    expected_audio, expected_texts = alice
    if fmt == "Pcm":
        pcm = np.frombuffer(b"".join(messages), "<f4")
        np.testing.assert_array_equal(pcm, expected_audio.reshape(-1))
        return
    if fmt == "OggOpus":
        pages = messages
    else:
        unpacked = [msgpack.unpackb(m) for m in messages]
        assert unpacked[0] == {"type": "Ready"}
        assert [m for m in unpacked if m["type"] == "Text"] == expected_texts
        pages = [m["data"] for m in unpacked if m["type"] == "OggOpus"]
        assert unpacked[1]["type"] == "OggOpus"
        assert all(isinstance(page, list) for page in pages)  # as Kyutai's server writes them
        pages = [bytes(page) for page in pages]
    # the header pages first, on their own (as Kyutai's server sends them)
    assert b"OpusHead" in pages[0] and b"OpusTags" in pages[0]
    assert pages[0].count(b"OggS") == 2 and b"OpusHead" not in pages[1]
    ogg = b"".join(pages)
    assert ogg.startswith(b"OggS")
    decoded = sphn.OpusStreamReader(24000).append_bytes(ogg)
    assert 0.8 * expected_audio.size <= decoded.size <= expected_audio.size


def test_eos_before_any_text_closes_without_audio(server):
    messages, code = run(speak_session(url(server), []))
    assert code == 1000 and [msgpack.unpackb(m) for m in messages] == [{"type": "Ready"}]


def test_slots_and_auth(server, monkeypatch):
    """Two slots: a third client gets Error 'no free channels' and a close; a client that leaves
    (before Eos) frees its slot; a slot is free by the time its client sees the close after
    Eos (a client may speak again at once, even while a slow Mimi gets ready for the next
    stream). A wrong key is HTTP 401; a bad format HTTP 400."""
    prepare_next = Synthesizer._prepare_next

    def slowly(self, slot, done):
        time.sleep(0.5)
        prepare_next(self, slot, done)

    monkeypatch.setattr(Synthesizer, "_prepare_next", slowly)

    async def client():
        async with aiohttp.ClientSession() as session:
            for bad in ({"headers": {"kyutai-api-key": "wrong"}}, {}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await session.ws_connect(url(server), **bad)
                assert e.value.status == 401
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await connect(session, url(server, format="Wav"))
            assert e.value.status == 400
            await slots_in_use(session, server, 0)
            first = await connect(session, url(server))
            second = await session.ws_connect(url(server, auth_id=KEY))
            for ws in (first, second):
                assert msgpack.unpackb((await receive_within(ws, 30)).data) == {"type": "Ready"}
                await ws.send_bytes(packb({"type": "Text", "text": "Hello"}))
            third = await connect(session, url(server))
            assert msgpack.unpackb((await receive_within(third, 30)).data) == {
                "type": "Error", "message": "no free channels"}
            assert (await receive_within(third, 10)).type == aiohttp.WSMsgType.CLOSE
            await first.close()
            await slots_in_use(session, server, 1)
            spoken = [await speak(session, url(server), WORDS[:3]) for _ in range(2)]
            await second.close()
            await slots_in_use(session, server, 0)
            return spoken

    for messages, code in run(client()):  # the slot is free when the close comes
        assert code == 1000 and split(messages)[1].shape[0] > 0


@pytest.mark.parametrize("query, bad, says", [
    ({}, b"\x00\xff garbage", "not a MessagePack message"),
    ({}, packb({"type": "Hello"}), "unknown message type 'Hello'"),
    ({}, packb({"type": "Text", "text": 3}), "'text' must be a string"),
    ({}, packb({"type": "Voice", "embeddings": [0.0] * 20, "shape": [1, 2, 10]}),
     "a Voice's shape is [1, 512, frames]"),
    ({}, packb({"type": "Voice", "embeddings": [0.0] * 20, "shape": [1, 512, 10]}),
     "must be 5120 finite numbers"),
], ids=["not-msgpack", "unknown-type", "text-number", "voice-shape", "voice-size"])
def test_bad_input_is_one_clients_problem(server, alice, query, bad, says):
    """Error to that client and a close; another client speaking at the same time gets the
    audio it gets alone."""

    async def evil(session):
        ws = await connect(session, url(server, **query))
        if bad is not None:
            assert msgpack.unpackb((await receive_within(ws, 30)).data) == {"type": "Ready"}
            await ws.send_bytes(bad)
        messages, code = await until_closed(ws)
        message = msgpack.unpackb(messages[-1])
        assert message["type"] == "Error" and says in message["message"], message
        assert code in (1000, 1002)

    async def both():
        async with aiohttp.ClientSession() as session:
            await slots_in_use(session, server, 0)
            good, _ = await asyncio.gather(speak(session, url(server), WORDS), evil(session))
            return good

    messages, code = run(both())
    assert code == 1000
    np.testing.assert_array_equal(split(messages)[1], alice[0])


@pytest.mark.parametrize("voice", ["nobody.wav", "..%2Fvoices%2Fpeople%2Falice.wav"],
                         ids=["unknown", "outside"])
def test_an_unknown_voice_is_the_default_one(server, alice, voice):
    """As Kyutai's server (whose clients, Unmute's and tts_rust_server.py, take no Error
    there): a voice not in the voice repository, or a path out of it, speaks with the default
    voice."""

    async def client():
        async with aiohttp.ClientSession() as session:
            return await speak(session, url(server, voice=voice), WORDS)

    messages, code = run(client())
    assert code == 1000
    np.testing.assert_array_equal(split(messages)[1], alice[0])


def test_a_vanished_client_frees_its_slot(server, monkeypatch):
    """A client that stops answering (no pong) is dropped by the pings (here every 2 s, to be
    quick); its slot is free again."""
    monkeypatch.setattr(speech_web, "PING_SECONDS", 2.0)

    async def client():
        async with aiohttp.ClientSession() as session:
            await slots_in_use(session, server, 0)
            sock = silent_websocket(server.port, "/api/tts_streaming?format=Pcm")
            await slots_in_use(session, server, 1)
            await slots_in_use(session, server, 0)
            sock.close()

    run(client())


def test_a_codec_that_does_not_start_is_one_clients_error(server, alice,
                                                          mimi_fails_to_start_once):
    """The slot's Mimi cannot start: Error and close 1011 for that client, and the next client
    on the same slot gets the audio it gets alone."""

    async def served(ws):
        for word in WORDS:
            await ws.send_bytes(packb({"type": "Text", "text": word}))
        await ws.send_bytes(packb({"type": "Eos"}))
        messages, code = await until_closed(ws)
        assert code == 1000
        np.testing.assert_array_equal(split(messages)[1], alice[0])

    async def clients():
        async with aiohttp.ClientSession() as session:
            await codec_fails_then_next_client_served(session, server, connect,
                                                      url(server), served)

    run(clients())
    assert len(mimi_fails_to_start_once) == 1


def test_text_is_read_as_kyutais_server_reads_it(server):
    """A tag that is not a whole break is spoken as words, a break has a Text of its own (timed
    like a word), an en dash is dropped; a normal close."""
    messages, code = run(speak_session(url(server), [
        'Hello <break time="soon"/> there', '– <break time="0.5s"/> you']))
    texts = split(messages)[2]
    assert code == 1000
    assert [t["text"] for t in texts] == [
        "Hello", "<break", 'time="soon"/>', "there", '<break time="0.50s">', "you"]
    assert all(a["stop_s"] == b["start_s"] for a, b in zip(texts, texts[1:]))


def test_pipelined_steps_equal_the_serial_ones(server, alice):
    """`TtsStream.spoken_steps` (Mimi decodes a frame while the model makes the next: what
    run_tts runs) gives the serial loop's audio, frame for frame, and its word times."""
    model, tokenizer, cfg = model_files.load_model(server.files, warmup=False)
    stream = TtsStream(model, tokenizer, server.files.mimi_weight,
                       [mx.array(server.embeddings["alice"])], SAMPLERS, served_options(cfg),
                       seed=SEED)
    try:
        stream.push_text(" ".join(WORDS))
        stream.end()
        spoken = list(stream.spoken_steps())
    finally:
        stream.close()
    np.testing.assert_array_equal(
        np.clip(np.stack([s.pcm for s in spoken if s.pcm is not None]), -0.99, 0.99), alice[0])
    # a word's step (from 0); the server's Text counts the steps run, that one included
    assert [(w, round(t * FRAME_RATE) + 1) for s in spoken for w, t in s.words] == [
        (t["text"], round(t["start_s"] * FRAME_RATE)) for t in alice[1]]
