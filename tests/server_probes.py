"""Probes of what hostile or unlucky clients do to the browser app's server, and what it costs
the server: each drives a `python -m moshi_mlx.local_web --demo --seed 1234` server from outside
(the websocket at /api/chat, its URL query, HTTP) and returns what the clients saw: a fuzz of
malformed messages and bad queries, abrupt disconnects, simultaneous clients, a client gone
without a close, a pause, many short conversations, the server process's memory, threads and open
files (Linux /proc).

`tests/test_server_probes.py` asserts on what they return; `python -m benchmarks.probe_server`
prints their figures.
"""

import asyncio
import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources

import aiohttp
import numpy as np
import sphn
from chat_client import (
    BUSY_PREFIX,
    FRAME,
    RATE,
    ProcessFigures,
    RawSocket,
    Reply,
    ServerProcess,
    connect_when_free,
    first_message,
    pcm_bytes,
    probe_signal,
    process_figures,
    receive_all,
    receive_within,
    send_speech,
)

SERVER_ARGS = ("--seed", "1234", "--max-lag", "30")  # long lag: no input dropped, repeatable
BUSY_TIMEOUT = 10.0  # seconds a probe waits for a busy server to take a new conversation
MAX_MESSAGE_BYTES = 256 * 1024  # the server's documented limit on one message
DEMO_CONFIG = json.loads(resources.files("moshi_mlx.weights").joinpath("data", "demo_config.json")
                         .read_text(encoding="utf-8"))  # the served model's (make_demo builds it)
TEXT_VOCABULARY, AUDIO_VOCABULARY = DEMO_CONFIG["text_card"], DEMO_CONFIG["card"]
REFERENCE_FRAMES = 12
REFERENCE = probe_signal(REFERENCE_FRAMES * FRAME / RATE)  # the well-formed conversation's input
# Moshi's voice lags the input by the largest codebook delay: one 16-bit PCM frame out for each
# frame in after that.
REFERENCE_VOICE_BYTES = (REFERENCE_FRAMES - max(DEMO_CONFIG["delays"])) * FRAME * 2


async def reference_conversation(url: str) -> Reply:
    """The well-formed conversation, in 16-bit PCM both ways (no codec: the same bytes each
    time), waiting while the server is busy; see `speak_reference`."""
    async with aiohttp.ClientSession() as http:
        ws, reply, _ = await connect_when_free(http, url, "?audio=pcm", BUSY_TIMEOUT)
        async with ws:
            return await speak_reference(ws, reply)


async def speak_reference(ws: aiohttp.ClientWebSocketResponse, reply: Reply) -> Reply:
    """After the handshake: sends REFERENCE at real-time pace and collects the answer. It is
    over when Moshi's voice for the last frame has come (and nothing more within 0.5 s), when
    the server closes, or when nothing comes for 30 s."""
    if reply.first[:1] != b"\x00":
        return await receive_all(ws, reply)
    sending = asyncio.create_task(send_speech(ws, REFERENCE, "pcm"))
    while sum(map(len, reply.audio)) < REFERENCE_VOICE_BYTES:
        if not await answered(ws, reply, timeout=30.0):
            break
    if reply.close_code is None and not ws.closed:
        await receive_all(ws, reply, idle=0.5)
    await sending
    return reply


def pcm_message(seconds: float = 0.08, seed: int = 0) -> bytes:
    """An audio message of `seconds` of the probe signal in 16-bit PCM."""
    return b"\x01" + pcm_bytes(probe_signal(seconds, seed))


# The fuzz: connections that each send a plan of malformed messages.

@dataclass
class Plan:
    """What one fuzz connection sends after the handshake."""

    what: str
    query: str = "?audio=pcm"
    messages: list[bytes | str] = field(default_factory=list)  # str: a websocket text frame
    fatal: bool = False  # the server must end the conversation (a close with a reason)
    error_message: bool = False  # ... after a 0x05 message saying why
    then_speak: bool = False  # then good audio, which the server must still answer
    linger: bool = True  # then wait for the server's answers (False: close at once)


def ignorable(rng: random.Random, count: int) -> list[bytes | str]:
    """Messages a server of this protocol ignores: empty, text frames, kinds a client does not
    send, unknown kinds, pings."""
    choices = [
        lambda: b"",
        lambda: "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(40))),
        lambda: bytes([rng.choice([0, 2, 4, 5])]) + rng.randbytes(rng.randrange(64)),
        lambda: bytes([rng.randrange(7, 256)]) + rng.randbytes(rng.randrange(200)),
        lambda: b"\x06",
    ]
    return [rng.choice(choices)() for _ in range(count)]


def opus_stream(frames: int, seed: int) -> list[bytes]:
    """A well-formed Ogg-Opus stream of the probe signal, chunk by chunk (headers first)."""
    writer = sphn.OpusStreamWriter(RATE)
    pcm = probe_signal(frames * FRAME / RATE, seed)
    chunks = (writer.append_pcm(pcm[i * FRAME:(i + 1) * FRAME]) for i in range(frames))
    return [c for c in chunks if c]


def corrupt_ogg(rng: random.Random) -> list[bytes]:
    """Ogg-Opus audio messages broken one way or another."""
    chunks = opus_stream(8, rng.randrange(100))
    way = rng.randrange(5)
    if way == 0:  # a flipped byte inside a page (its checksum no longer matches)
        i = rng.randrange(1, len(chunks))
        page = bytearray(chunks[i])
        page[rng.randrange(27, len(page))] ^= 0xFF
        chunks[i] = bytes(page)
    elif way == 1:  # a page cut short
        i = rng.randrange(1, len(chunks))
        chunks[i] = chunks[i][: rng.randrange(5, len(chunks[i]))]
    elif way == 2:  # the header pages missing: the stream starts in the middle
        chunks = chunks[2:]
    elif way == 3:  # a capture pattern followed by garbage
        chunks.insert(rng.randrange(1, len(chunks)), b"OggS" + rng.randbytes(rng.randrange(200)))
    else:  # a second stream's headers in the middle of the first
        chunks[len(chunks) // 2:len(chunks) // 2] = opus_stream(2, 7)
    return [b"\x01" + c for c in chunks]


def fuzz_plans(seed: int = 11) -> list[Plan]:
    """The fuzz, the same for the same seed: ~1,300 malformed messages over 35 connections."""
    rng = random.Random(seed)
    plans = [Plan("ignored messages", messages=ignorable(rng, rng.randrange(15, 30)),
                  then_speak=True) for _ in range(10)]
    plans += [Plan("a flood of ignored messages", messages=ignorable(rng, 300), then_speak=True)
              for _ in range(2)]
    plans += [Plan("random bytes", query=rng.choice(["", "?audio=pcm"]),
                   messages=[rng.randbytes(rng.randrange(2000))
                             for _ in range(rng.randrange(5, 20))])
              for _ in range(8)]
    plans += [Plan("corrupt Ogg pages", query="", messages=corrupt_ogg(rng)) for _ in range(6)]
    plans += [Plan("odd-length PCM", messages=[pcm_message(), b"\x01" + rng.randbytes(2 * n + 1)],
                   fatal=True, error_message=True) for n in (0, 1, 1000)]
    plans += [Plan("a message over 256 KiB", query=query,
                   messages=[kind + bytes(MAX_MESSAGE_BYTES + 1000)], fatal=True)
              for kind, query in ((b"\x01", "?audio=pcm"), (b"\x01", ""), (b"\x09", ""))]
    plans += [Plan("a flood of audio, then gone",
                   messages=[pcm_message(seed=i) for i in range(150)], linger=False)
              for _ in range(2)]
    plans += [Plan("control messages", messages=[b"\x03" + bytes([rng.randrange(256)])
                                                 for _ in range(5)] + [b"\x03", b"\x03\x00\x01"])]
    return plans


# Broken websocket frames, written by hand: (what, bytes after the upgrade).
BROKEN_FRAMES = [
    ("an unmasked frame", RawSocket.frame(b"\x06", masked=False)),
    ("a reserved opcode", RawSocket.frame(b"\x06", opcode=3)),
    ("reserved bits set", RawSocket.frame(b"\x06", rsv=0b111)),
    ("a fragmented ping", RawSocket.frame(b"", opcode=9, fin=False)),
    ("a text frame that is not UTF-8", RawSocket.frame(b"\xff\xfe\xfd", opcode=1)),
    ("a close frame with an invalid code", RawSocket.frame(b"\x03\xe7", opcode=8)),
    ("a frame announcing 2**62 bytes", bytes([0x82, 0xFF]) + (1 << 62).to_bytes(8, "big")
     + os.urandom(4)),
]


@dataclass
class Outcome:
    """What happened on one probe connection."""

    what: str
    reply: Reply
    sent: int = 0  # messages sent before the server closed
    waited: float = 0.0  # seconds from the first try to the server's first message
    answered: bool = False  # the server answered good audio sent after the messages


async def run_plan(url: str, plan: Plan) -> Outcome:
    async with aiohttp.ClientSession() as http:
        ws, reply, waited = await connect_when_free(http, url, plan.query, BUSY_TIMEOUT,
                                                    max_msg_size=0)
        outcome = Outcome(plan.what, reply, waited=waited)
        async with ws:
            if reply.first[:1] != b"\x00":
                await receive_all(ws, reply, idle=1.0)
                return outcome
            try:
                for m in plan.messages:
                    await (ws.send_str(m) if isinstance(m, str) else ws.send_bytes(m))
                    outcome.sent += 1
                if plan.then_speak:
                    for i in range(3):
                        await ws.send_bytes(pcm_message(seed=i))
            except ConnectionResetError:
                pass
            if plan.then_speak:
                outcome.answered = await answered(ws, reply)
            elif plan.linger:
                await receive_all(ws, reply, idle=1.0)
        return outcome


async def answered(ws: aiohttp.ClientWebSocketResponse, reply: Reply, voice: bool = True,
                   timeout: float = 20.0) -> bool:
    """Collects messages until Moshi's voice comes (or, with `voice=False`, its voice or text):
    True; False on a close or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    heard = len(reply.audio) + (0 if voice else len(reply.text))
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await receive_within(ws, left)
        except asyncio.TimeoutError:
            return False
        if msg.type != aiohttp.WSMsgType.BINARY:
            if msg.type == aiohttp.WSMsgType.CLOSE:
                reply.close_code, reply.close_reason = msg.data, msg.extra
            return False
        reply.take(msg.data)
        if len(reply.audio) + (0 if voice else len(reply.text)) > heard:
            return True
    return False


async def run_broken_frame(host: str, port: int, what: str, data: bytes) -> Outcome:
    """Opens a websocket by hand, waits for the handshake, sends `data`, then records the
    server's close (code and reason) if one comes within 3 s (answering its pings meanwhile)."""
    start = time.monotonic()
    while True:
        raw = await RawSocket.connect(host, port)
        status = await raw.open_websocket(host, port)
        opcode, payload = await raw.read_frame() if status == 101 else (-1, b"")
        if not payload.startswith(BUSY_PREFIX) or time.monotonic() - start > BUSY_TIMEOUT:
            break
        await raw.close()
        await asyncio.sleep(0.05)
    outcome = Outcome(what, Reply(payload), waited=time.monotonic() - start)
    if payload[:1] == b"\x00":
        await raw.send(data)
        outcome.sent = 1
        deadline = time.monotonic() + 3.0
        while (left := deadline - time.monotonic()) > 0:
            opcode, payload = await raw.read_frame(timeout=left)
            if opcode == 8:  # close: a 2-byte code, then the reason
                outcome.reply.close_code = int.from_bytes(payload[:2], "big") if payload else 0
                outcome.reply.close_reason = payload[2:].decode(errors="replace")
                break
            if opcode == -1:
                break
            if opcode == 9:
                await raw.send(RawSocket.frame(payload, opcode=10))
            elif opcode == 2:
                outcome.reply.take(payload)
    await raw.close()
    return outcome


# Bad URL queries: (query, the parameter it names, the numbers its range must show).
BAD_QUERIES = [
    ("?text_topk=99999", "text_topk", ["0", str(TEXT_VOCABULARY)]),
    ("?text_topk=99999999999999999999999", "text_topk", ["0", str(TEXT_VOCABULARY)]),
    ("?text_topk=-1", "text_topk", ["0", str(TEXT_VOCABULARY)]),
    ("?text_topk=abc", "text_topk", ["0", str(TEXT_VOCABULARY)]),
    ("?audio_topk=99999", "audio_topk", ["0", str(AUDIO_VOCABULARY)]),
    ("?audio_topk=-5", "audio_topk", ["0", str(AUDIO_VOCABULARY)]),
] + [(f"?{name}={value}", name, ["0"])
     for name in ("text_temperature", "audio_temperature")
     for value in ("nan", "inf", "-1", "1e309", "abc")]
# A top-k equal to the vocabulary keeps every token: a valid value at the edge of the range.
EDGE_QUERIES = [f"?text_topk={TEXT_VOCABULARY}", f"?audio_topk={AUDIO_VOCABULARY}"]


async def query_probe(url: str, query: str) -> Outcome:
    """Connects with `query` (and `audio=pcm`); if the server takes the conversation, sends
    a few good frames and waits for Moshi's voice."""
    plan = Plan(query, query=f"{query}&audio=pcm", then_speak=True)
    return await run_plan(url, plan)


# Abrupt disconnects: a client that vanishes (a TCP reset) at some point of the conversation.
DISCONNECTS = ["before the request", "in the middle of the request", "before the handshake",
               "right after the handshake", "after some audio", "in a flood of audio"]


async def abrupt_disconnect(host: str, port: int, when: str) -> float | None:
    """Vanishes at `when` (one of DISCONNECTS). For the moments after the handshake, returns
    the seconds the server took to hand out the model (its handshake, after busy refusals), or
    None when it did not within BUSY_TIMEOUT; None for the moments before."""
    start = time.monotonic()
    while True:
        raw = await RawSocket.connect(host, port)
        request = RawSocket.upgrade_request(host, port, "/api/chat?audio=pcm")
        if when == "before the request":
            raw.reset()
            return None
        if when == "in the middle of the request":
            await raw.send(request[: len(request) // 2])
            raw.reset()
            return None
        await raw.send(request)
        if when == "before the handshake":
            raw.reset()
            return None
        status = await raw.response_status()
        opcode, payload = await raw.read_frame() if status == 101 else (-1, b"")
        if payload.startswith(BUSY_PREFIX) and time.monotonic() - start < BUSY_TIMEOUT:
            await raw.close()
            await asyncio.sleep(0.05)
            continue
        break
    waited = time.monotonic() - start
    if payload[:1] == b"\x00":
        frames = {"right after the handshake": 0, "after some audio": 4,
                  "in a flood of audio": 60}[when]
        await raw.send(b"".join(RawSocket.frame(pcm_message(seed=i)) for i in range(frames)))
    raw.reset()
    return waited if payload[:1] == b"\x00" else None


async def simultaneous(url: str, clients: int) -> list[Reply]:
    """`clients` connections opened at once (with `?audio=pcm`); each that gets the handshake
    speaks REFERENCE; the replies, in the order the connections were opened."""

    async def client(http: aiohttp.ClientSession) -> Reply:
        async with http.ws_connect(f"ws://{url}/api/chat?audio=pcm") as ws:
            reply = await first_message(ws)
            if reply.first[:1] != b"\x00":
                return await receive_all(ws, reply, idle=5.0)
            return await speak_reference(ws, reply)

    async with aiohttp.ClientSession() as http:
        return await asyncio.gather(*(client(http) for _ in range(clients)))


@dataclass
class Gone:
    """A client that stopped reading and answering pings, its socket open, and the next one."""

    first: bytes  # the gone client's first message
    pongs: int  # pings it answered while it was there
    busy_meanwhile: bytes  # a client's first message 0.5 s after it went
    freed_after: float | None  # seconds from its last pong to the next client's handshake


async def gone_client(host: str, port: int, frames: int) -> Gone:
    """A client sends `frames` frames of audio at real-time pace and answers the server's pings,
    then reads nothing more (no pong) with its socket open; other clients then connect every
    50 ms until one gets the handshake (for up to BUSY_TIMEOUT seconds)."""
    raw = await RawSocket.connect(host, port)
    await raw.send(RawSocket.upgrade_request(host, port, "/api/chat?audio=pcm"))
    status = await raw.response_status()
    first = (await raw.read_frame())[1] if status == 101 else b""
    pongs: list[float] = []

    async def answer_pings() -> None:
        while (frame := await raw.read_frame())[0] != -1:
            if frame[0] == 9:
                await raw.send(RawSocket.frame(frame[1], opcode=10))
                pongs.append(time.monotonic())

    reading = asyncio.create_task(answer_pings())
    for i in range(frames):
        await raw.send(RawSocket.frame(pcm_message(seed=i)))
        await asyncio.sleep(FRAME / RATE)
    await asyncio.sleep(0.6)  # a ping or more after the audio
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    went = time.monotonic()
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://{host}:{port}/api/chat") as ws:
            busy = (await first_message(ws)).first
        ws, reply, _ = await connect_when_free(http, f"{host}:{port}", "",
                                               BUSY_TIMEOUT - (time.monotonic() - went))
        await ws.close()
    freed = time.monotonic() if reply.first[:1] == b"\x00" else None
    await raw.close()
    last = pongs[-1] if pongs else went
    return Gone(first, len(pongs), busy, None if freed is None else freed - last)


async def live_pause(url: str, seconds: float) -> tuple[Reply, bool]:
    """A client speaks REFERENCE's first frames, then sends nothing for `seconds` while it
    reads (and so answers pings), then speaks again: (what it received, whether Moshi answered
    the audio after the pause)."""
    async with aiohttp.ClientSession() as http:
        ws, reply, _ = await connect_when_free(http, url, "?audio=pcm", BUSY_TIMEOUT)
        async with ws:
            if reply.first[:1] != b"\x00":
                return reply, False
            await send_speech(ws, REFERENCE[: 4 * FRAME], "pcm")
            try:
                await asyncio.wait_for(receive_all(ws, reply, idle=seconds + 60), seconds)
            except asyncio.TimeoutError:  # still open after the pause, as it should
                pass
            if reply.close_code is not None:
                return reply, False
            await send_speech(ws, REFERENCE[: 4 * FRAME], "pcm")
            return reply, await answered(ws, reply)


async def short_conversation(http: aiohttp.ClientSession, url: str, frames: int = 2) -> float:
    """Handshake, `frames` frames of audio at once, Moshi's first answer (text or voice), then a
    close; returns the seconds waited for the handshake."""
    ws, reply, waited = await connect_when_free(http, url, "?audio=pcm", BUSY_TIMEOUT)
    async with ws:
        if reply.first[:1] == b"\x00":
            for i in range(frames):
                await ws.send_bytes(pcm_message(seed=i))
            await answered(ws, reply, voice=False)
    return waited


def settled_figures(pid: int, before: ProcessFigures | None, timeout: float = 15.0,
                    steady: float = 1.0) -> ProcessFigures | None:
    """The process's figures once they have not changed for `steady` seconds and it holds no more
    open files and threads than `before` (the sockets of ended connections take a moment to close,
    the threads of ended conversations to finish, the next conversation's Mimi to start with its
    pipes: seconds on a loaded machine; a reading in the middle of that is not the idle server's),
    or after `timeout` seconds (a leak never settles)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        now = process_figures(pid)
        if now is None or time.monotonic() > deadline:
            return now
        if last is None or (now.fds, now.threads) != (last.fds, last.threads):
            last, since = now, time.monotonic()
        elif (time.monotonic() - since >= steady
              and (before is None or (now.fds <= before.fds and now.threads <= before.threads))):
            return now
        time.sleep(0.1)


@dataclass
class MemoryRun:
    start: ProcessFigures | None  # the server ready, before any conversation
    first: ProcessFigures | None  # after the first conversation
    last: ProcessFigures | None  # after all of them
    idle: ProcessFigures | None  # the most threads and fds the idle server held: start or first
    conversations: int
    waits: list[float]  # seconds each conversation waited for its handshake


def memory_probe(server: ServerProcess, conversations: int) -> MemoryRun:
    """`conversations` short conversations one after another; the server's figures before, after
    the first and after the last."""

    async def talk(count: int) -> list[float]:
        async with aiohttp.ClientSession() as http:
            return [await short_conversation(http, server.url) for _ in range(count)]

    start = settled_figures(server.proc.pid, None)
    waits = asyncio.run(talk(1))
    first = settled_figures(server.proc.pid, start)
    # Between two conversations the server swaps the ended one's Mimi process for a fresh one, so
    # an idle reading may catch it with or without that process's pipes: the larger one counts.
    idle = first and start and ProcessFigures(first.rss_mb, max(start.threads, first.threads),
                                              max(start.fds, first.fds))
    waits += asyncio.run(talk(conversations - 1))
    last = settled_figures(server.proc.pid, idle)
    return MemoryRun(start, first, last, idle, conversations, waits)


# Malformed HTTP requests, as raw bytes.
MALFORMED_HTTP = {
    "not HTTP": b"GARBAGE\r\n\r\n",
    "a header without a colon": b"GET / HTTP/1.1\r\nHost\r\n\r\n",
    "HTTP/9.9": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "a 10 kB request line": b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n",
    "a 10 kB header": b"GET / HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n",
    "a negative Content-Length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "a bad chunk": (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"ZZ\r\n\r\n"),
    "two Content-Lengths": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                            b"Content-Length: 6\r\n\r\nhello"),
    "a TLS hello on plain HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
    "binary junk": b"\x00\xff\xfe junk\r\n\r\n",
    "a websocket upgrade without a key": (b"GET /api/chat HTTP/1.1\r\nHost: x\r\n"
                                          b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                          b"Sec-WebSocket-Version: 13\r\n\r\n"),
    "200 headers": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200))
                    + b"\r\n"),
    "bare LF line ends": b"GET / HTTP/1.1\nHost: x\n\n",
    "a control byte in the method": b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
}


async def http_probe(host: str, port: int, data: bytes) -> int:
    """Sends `data` on a new connection; the status of the response (0: none)."""
    raw = await RawSocket.connect(host, port)
    await raw.send(data)
    status = await raw.response_status(timeout=10)
    await raw.close()
    return status


async def origin_probe(host: str, port: int, origins: list[str]) -> tuple[int, bytes]:
    """Opens the websocket with these Origin headers (in order): (status, first message)."""
    raw = await RawSocket.connect(host, port)
    status = await raw.open_websocket(host, port, [("Origin", o) for o in origins])
    first = (await raw.read_frame())[1] if status == 101 else b""
    await raw.close()
    return status, first


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def figures_table(rows: list[tuple[str, ProcessFigures | None]]) -> str:
    """Markdown: RSS, threads and open fds at each named moment."""
    lines = ["| server process | RSS MB | threads | open fds |", "|---|---|---|---|"]
    for name, f in rows:
        lines.append(f"| {name} | n/a (no /proc) | | |" if f is None else
                     f"| {name} | {f.rss_mb:.0f} | {f.threads} | {f.fds} |")
    return "\n".join(lines)


def waits_line(what: str, waits: list[float]) -> str:
    return (f"{what}: {len(waits)} handshakes, wait p50 {percentile(waits, 50):.2f} s, "
            f"p90 {percentile(waits, 90):.2f} s, max {max(waits, default=float('nan')):.2f} s")


def same_conversation(a: Reply, b: Reply) -> bool:
    return a.text == b.text and b"".join(a.audio) == b"".join(b.audio)


@contextmanager
def fresh_server(env: dict | None = None) -> Iterator[ServerProcess]:
    """A newly started server (SERVER_ARGS), stopped at the end."""
    server = ServerProcess(*SERVER_ARGS, env=env)
    try:
        yield server
    finally:
        server.stop()
