"""The browser app's server (`python -m moshi_mlx.local_web --demo`) seen from outside: the server
as a subprocess, clients that speak Kyutai's websocket protocol as `python -m moshi.client` does
(binary messages whose first byte is their kind; Ogg-Opus or, with `?audio=pcm`, 16-bit PCM audio
at real-time pace), and a websocket written by hand for what a well-behaved client never does
(broken frames, a reset instead of a close, raw HTTP). Used by the tests, the server probes
(`server_probes.py`) and the benchmarks; it touches nothing but the server's public surface."""

import asyncio
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import sphn

RATE = 24000
FRAME = 1920  # samples in one 80 ms frame
FRAME_SECONDS = FRAME / RATE
IDLE_SECONDS = 2.0  # a conversation is over when the server has sent nothing for this long
BUSY_PREFIX = b"\x05busy"


class ServerProcess:
    """`python -m moshi_mlx.local_web --demo` on 127.0.0.1 and a free port, as a subprocess; its
    log lines (stderr) are collected as they come. `url` is host:port."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moshi_mlx.local_web", "--demo", "--host", "127.0.0.1",
             "--port", "0", "--no-browser", "--static", "none", *args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()
        self.url = self.wait_for(r"Moshi is ready: https?://(\S+)/").group(1)
        self.host, port = self.url.rsplit(":", 1)
        self.port = int(port)

    def _collect(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120, start: int = 0) -> re.Match:
        """The first log line from line `start` on that matches `pattern`, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if match := re.search(pattern, line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {pattern!r} in the server's log:\n"
                                         + "\n".join(self.lines))
                self._changed.wait(min(left, 0.5))

    def log_since(self, start: int) -> list[str]:
        with self._changed:
            return self.lines[start:]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class ProcessFigures:
    """What a process holds, from Linux's /proc."""

    rss_mb: float  # resident memory (VmRSS)
    threads: int
    fds: int  # open file descriptors


def process_figures(pid: int) -> ProcessFigures | None:
    """The figures of process `pid`; None where there is no Linux /proc."""
    proc = Path(f"/proc/{pid}")
    if not (proc / "status").is_file():
        return None
    rss_kb = int(re.search(r"^VmRSS:\s+(\d+) kB", (proc / "status").read_text(), re.M).group(1))
    return ProcessFigures(rss_kb / 1024, len(os.listdir(proc / "task")),
                          len(os.listdir(proc / "fd")))


def probe_signal(seconds: float, seed: int = 0) -> np.ndarray:
    """A fixed stand-in for speech, float32 [samples] at 24 kHz: a voiced tone whose pitch glides
    around 150 Hz, at syllable rate (4 Hz), with a little seeded noise. Same arguments, same
    samples."""
    t = np.arange(round(seconds * RATE)) / RATE
    pitch = 150 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(h * phase) / h for h in (1, 2, 3, 4))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    noise = np.random.default_rng(seed).normal(0, 0.01, len(t))
    return (0.2 * envelope * voiced + noise).astype(np.float32)


def pcm_bytes(pcm: np.ndarray) -> bytes:
    """float32 samples -> the 16-bit little-endian PCM of `?audio=pcm` (as the README specifies
    it; written here rather than taken from moshi_mlx.web.protocol, so the client is not the
    server's own code)."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


@dataclass
class Reply:
    """What the server sent on one connection."""

    first: bytes  # the server's first message
    text: list[str] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)  # Moshi's voice as received
    errors: list[str] = field(default_factory=list)  # 0x05 messages
    other: list[bytes] = field(default_factory=list)  # any other message
    close_code: int | None = None  # None: the server did not close the connection
    close_reason: str | None = None

    @property
    def voice(self) -> np.ndarray:
        """Moshi's voice, decoded from Ogg-Opus, float32 [samples]."""
        return sphn.OpusStreamReader(RATE).append_bytes(b"".join(self.audio))

    def take(self, data: bytes) -> None:
        """Files one binary message from the server by its kind."""
        kind, payload = data[:1], data[1:]
        if kind == b"\x01":
            self.audio.append(payload)
        elif kind == b"\x02":
            self.text.append(payload.decode())
        elif kind == b"\x05":
            self.errors.append(payload.decode(errors="replace"))
        else:
            self.other.append(data)


def with_audio(query: str, audio: str) -> str:
    """`query` ("" or "?a=b&...") asking for `audio` ("opus", the default, or "pcm")."""
    if audio == "opus":
        return query
    return f"{query}{'&' if query else '?'}audio={audio}"


async def send_speech(ws: aiohttp.ClientWebSocketResponse, pcm: np.ndarray,
                      audio: str = "opus") -> None:
    """Sends pcm (float32 [samples] at 24 kHz) as Kyutai's client does: 80 ms frames at real-time
    pace, through sphn's Opus writer (each non-empty chunk as soon as it is ready) or, for
    `audio="pcm"`, one 16-bit PCM message per frame. Stops when the connection closes."""
    writer = sphn.OpusStreamWriter(RATE) if audio == "opus" else None
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(len(pcm) // FRAME):
        frame = pcm[i * FRAME:(i + 1) * FRAME]
        data = writer.append_pcm(frame) if writer else pcm_bytes(frame)
        if data:
            try:
                await ws.send_bytes(b"\x01" + data)
            except ConnectionResetError:
                return
        await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_SECONDS - loop.time()))


async def receive_within(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> aiohttp.WSMessage:
    """The server's next message, or asyncio.TimeoutError after `seconds`. (aiohttp's own
    receive timeout restarts at each ping the server sends, so it never sees a quiet server.)"""
    return await asyncio.wait_for(ws.receive(), seconds)


async def receive_all(ws: aiohttp.ClientWebSocketResponse, reply: Reply,
                      sending: asyncio.Task | None = None, idle: float = IDLE_SECONDS) -> Reply:
    """Collects the server's messages until it closes, or has sent nothing for `idle` seconds
    after the sending is done."""
    while True:
        try:
            msg = await receive_within(ws, idle)
        except asyncio.TimeoutError:
            if sending is None or sending.done():
                return reply
            continue
        if msg.type == aiohttp.WSMsgType.CLOSE:
            reply.close_code, reply.close_reason = msg.data, msg.extra
            return reply
        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.ERROR):
            reply.close_code = ws.close_code
            return reply
        if msg.type == aiohttp.WSMsgType.BINARY:
            reply.take(msg.data)
        else:
            reply.other.append(repr(msg).encode())


async def first_message(ws: aiohttp.ClientWebSocketResponse, timeout: float = 60) -> Reply:
    """The server's first message on a new connection (a close counts as one)."""
    reply = Reply(b"")
    msg = await receive_within(ws, timeout)
    if msg.type == aiohttp.WSMsgType.BINARY:
        reply.first = msg.data
        if msg.data[:1] == b"\x05":
            reply.errors.append(msg.data[1:].decode(errors="replace"))
    elif msg.type == aiohttp.WSMsgType.CLOSE:
        reply.close_code, reply.close_reason = msg.data, msg.extra
    else:  # the connection ended without a close frame, or failed
        reply.close_code = ws.close_code
        reply.other.append(f"{msg.type.name}: {msg.data!r}".encode())
    return reply


async def connect_when_free(http: aiohttp.ClientSession, url: str, query: str = "",
                            busy_timeout: float = 0.0, **options
                            ) -> tuple[aiohttp.ClientWebSocketResponse, Reply, float]:
    """Connects to /api/chat; while the server answers busy, connects again (every 50 ms, for up
    to `busy_timeout` seconds). Returns the open websocket, the server's first message and the
    seconds from the first try to that message."""
    start = time.monotonic()
    while True:
        ws = await http.ws_connect(f"ws://{url}/api/chat{query}", **options)
        reply = await first_message(ws)
        waited = time.monotonic() - start
        if not reply.first.startswith(BUSY_PREFIX) or waited >= busy_timeout:
            return ws, reply, waited
        await ws.close()
        await asyncio.sleep(0.05)


async def converse(url: str, pcm: np.ndarray, query: str = "", scheme: str = "ws",
                   audio: str = "opus", busy_timeout: float = 0.0) -> Reply:
    """One conversation: handshake, speech at real-time pace, everything Moshi says. With
    `busy_timeout`, a busy server is asked again for up to that many seconds."""
    query = with_audio(query, audio)
    async with aiohttp.ClientSession() as http:
        if scheme == "ws":
            ws, reply, _ = await connect_when_free(http, url, query, busy_timeout)
        else:  # like Kyutai's moshi-cli, accept the self-signed certificate of a local server
            ws = await http.ws_connect(f"{scheme}://{url}/api/chat{query}", ssl=False)
            reply = await first_message(ws)
        async with ws:
            if reply.first[:1] != b"\x00":
                return await receive_all(ws, reply)
            sending = asyncio.create_task(send_speech(ws, pcm, audio))
            await receive_all(ws, reply, sending)
            await sending
            return reply


async def handshake_or_error(url: str) -> bytes:
    """The server's first message to a new connection."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://{url}/api/chat") as ws:
            return (await receive_within(ws, 60)).data


class RawSocket:
    """A websocket client written by hand on a TCP connection, for what a well-behaved client
    library never does: raw HTTP, broken frames, vanishing with a reset instead of a close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> "RawSocket":
        return cls(*await asyncio.open_connection(host, port))

    @staticmethod
    def upgrade_request(host: str, port: int, path: str = "/api/chat",
                        headers: list[tuple[str, str]] = ()) -> bytes:
        """The HTTP request that opens a websocket (RFC 6455), with `headers` added."""
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {b64encode(os.urandom(16)).decode()}",
                 "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response_status(self, timeout: float = 30) -> int:
        """Reads an HTTP response's head; returns its status code (0 when the server closed
        without one)."""
        try:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return 0
        return int(head.split(b" ", 2)[1])

    async def open_websocket(self, host: str, port: int,
                             headers: list[tuple[str, str]] = ()) -> int:
        """Sends the upgrade request; returns the response's status (101: a websocket)."""
        await self.send(self.upgrade_request(host, port, headers=headers))
        return await self.response_status()

    @staticmethod
    def frame(payload: bytes, opcode: int = 2, fin: bool = True, masked: bool = True,
              rsv: int = 0) -> bytes:
        """One websocket frame (opcode 2: binary) as a client sends it (masked)."""
        head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
        size = len(payload)
        mask_bit = 0x80 if masked else 0
        if size < 126:
            head += bytes([mask_bit | size])
        elif size < 1 << 16:
            head += bytes([mask_bit | 126]) + struct.pack(">H", size)
        else:
            head += bytes([mask_bit | 127]) + struct.pack(">Q", size)
        if not masked:
            return head + payload
        key = os.urandom(4)
        body = (np.frombuffer(payload, np.uint8)
                ^ np.resize(np.frombuffer(key, np.uint8), size)).tobytes()
        return head + key + body

    async def read_frame(self, timeout: float = 30) -> tuple[int, bytes]:
        """The server's next frame: (opcode, payload); (-1, b"") when the connection ends or
        nothing comes within `timeout` seconds."""
        try:
            b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            size = b1 & 0x7F
            if size == 126:
                size = struct.unpack(">H", await self.reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack(">Q", await self.reader.readexactly(8))[0]
            return b0 & 0x0F, await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            return -1, b""

    def reset(self) -> None:
        """Vanishes: closes the connection with a TCP reset, no websocket close, no FIN."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
