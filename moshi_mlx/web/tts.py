"""`/api/tts_streaming`: streaming text to speech in the protocol of Kyutai's server.

Query: `format` (`PcmMessagePack`, `OggOpusMessagePack`, `Pcm`, `OggOpus`; Kyutai's default is
`OggOpus`, its clients ask for `PcmMessagePack`), `voice` (a name in the voice repository; the
server's default voice without one), `auth_id` (the api key, if not in the header).
In: `Text{text}` (one or more words; a websocket text frame is taken as one), `Eos` (or a binary
frame `\\0`), `Voice{embeddings, shape}` (a speaker embedding [1, 512, frames], before the first
Text). Out, in the MessagePack formats: `Ready` at once, then `Audio{pcm}` (1920 float32 samples,
80 ms at 24 kHz, clamped to +-0.99; `OggOpus{data}`, the pages of one Ogg-Opus stream as an
array of byte values, in `OggOpusMessagePack`: the header pages first, on their own),
`Text{text, start_s, stop_s}` (a word and when the model took it, in seconds of the stream's
steps: ahead of the audio by the model's delay), `Error{message}`. The raw formats send only the
audio: float32 little-endian bytes (`Pcm`) or Ogg pages (`OggOpus`). After `Eos` the rest is
spoken, then the server closes (1000). Bad input (not MessagePack, an unknown type, an unknown
voice, a voice of the wrong shape) gets an Error (MessagePack, whatever the format) and a close:
that client only.

The synthesis runs in the engine (`engine.speech_synthesis.Synthesizer`, handed to this service
by `serve`): this module only moves messages, and imports no MLX.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np
import sphn
from aiohttp import WSCloseCode, WSMsgType, web

from ..audio.constants import SAMPLE_RATE
from ..engine.speech_synthesis import (
    EMBEDDING_CHANNELS,
    Audio,
    End,
    Error,
    Stream,
    Synthesizer,
    Text,
    UnknownVoice,
)
from .speech import (
    BadMessage,
    SlotService,
    converse,
    next_message,
    open_socket,
    outbox,
    pack,
    send_error,
    take_slot,
    unpack,
)

log = logging.getLogger("moshi_mlx")

PATH = "/api/tts_streaming"
FORMATS = ("PcmMessagePack", "OggOpusMessagePack", "Pcm", "OggOpus")
DEFAULT_FORMAT = "OggOpus"  # Kyutai's server's default
IDLE_SECONDS = 30.0  # before Eos, a client that sends nothing this long is closed (as Kyutai's)
EOS_FRAME = b"\0"  # a binary frame that says Eos, as Kyutai's server takes it


def voice_of(message: dict) -> np.ndarray:
    """A Voice message -> its speaker embedding, float32 [1, 512, frames]. BadMessage
    otherwise."""
    values, shape = message.get("embeddings"), message.get("shape")
    if not (isinstance(values, list) and isinstance(shape, list)
            and all(isinstance(n, int) and n > 0 for n in shape)):
        raise BadMessage("a Voice needs 'embeddings' (numbers) and 'shape' (positive integers)")
    if len(shape) == 2:
        shape = [1, *shape]
    if len(shape) != 3 or shape[:2] != [1, EMBEDDING_CHANNELS]:
        raise BadMessage(f"a Voice's shape is [1, {EMBEDDING_CHANNELS}, frames], got "
                         f"{message['shape']}")
    try:
        embedding = np.array(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadMessage("a Voice's 'embeddings' must be numbers") from None
    if embedding.shape != (int(np.prod(shape)),) or not np.isfinite(embedding).all():
        raise BadMessage(f"a Voice's 'embeddings' must be {int(np.prod(shape))} finite numbers "
                         f"(its shape {message['shape']})")
    return embedding.reshape(shape)


class AudioOut:
    """A stream's audio events -> what the format sends (None: nothing yet)."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.messages = fmt.endswith("MessagePack")
        self.opus = None
        if fmt.startswith("OggOpus"):
            self.opus = sphn.OpusStreamWriter(SAMPLE_RATE)

    def header(self) -> bytes | None:
        """The Ogg-Opus stream's header pages, on their own before any audio as Kyutai's server
        sends them (None for PCM)."""
        return self._pages(self.opus.append_pcm(np.zeros(0, np.float32))) if self.opus else None

    def _pages(self, data: bytes) -> bytes | None:
        if not data:
            return None
        # Kyutai's server writes the bytes as an array of byte values
        return pack({"type": "OggOpus", "data": list(data)}) if self.messages else data

    def audio(self, pcm: np.ndarray) -> bytes | None:
        if self.opus is not None:
            return self._pages(self.opus.append_pcm(pcm))
        if self.messages:
            return pack({"type": "Audio", "pcm": pcm})
        return pcm.astype("<f4").tobytes()

    def text(self, event: Text) -> bytes | None:
        if not self.messages:
            return None
        return pack({"type": "Text", "text": event.text, "start_s": event.start_s,
                     "stop_s": event.stop_s})


class TtsService(SlotService):
    """The service over one `Synthesizer` (its slots)."""

    kind = "py"  # Kyutai's server serves its TTS from a Python module (its tts.py)
    path = PATH

    def __init__(self, synthesizer: Synthesizer, api_keys: frozenset[str]):
        super().__init__(synthesizer, api_keys)
        self.synthesizer = synthesizer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        fmt = request.query.get("format", DEFAULT_FORMAT)
        if fmt not in FORMATS:
            raise web.HTTPBadRequest(text=f"format must be one of {', '.join(FORMATS)}\n")
        ws = await open_socket(request, self.api_keys)
        slot = await take_slot(request, ws, self.slots)
        if slot is None:
            return ws
        self.sockets.add(ws)
        stream = released = None
        events, emit = outbox()

        def release() -> asyncio.Future:
            """Ends the stream and frees the slot, once (before the close at the end, so that
            a client that connects again at once finds it free)."""
            nonlocal released
            if released is None:
                released = asyncio.ensure_future(self._release(request, slot, stream))
            return asyncio.shield(released)

        try:
            name = request.query.get("voice") or self.synthesizer.default_voice
            try:
                voice = await asyncio.to_thread(self.synthesizer.voice, name)
            except UnknownVoice as e:  # as Kyutai's server: its clients take no Error here
                log.warning("tts: %s: %s: the default voice speaks", request.remote, e)
                name = self.synthesizer.default_voice
                voice = await asyncio.to_thread(self.synthesizer.voice, name)
            stream = await self.open_stream(
                ws, slot, lambda: self.synthesizer.open(slot, voice, emit))
            if stream is None:
                return ws
            log.info("tts: %s on slot %d (voice %s, %s)", request.remote, slot, name, fmt)
            out = AudioOut(fmt)
            if out.messages:
                await ws.send_bytes(pack({"type": "Ready"}))
            if (header := out.header()) is not None:
                await ws.send_bytes(header)
            await converse(ws, self._send(ws, events, out, release),
                           self._receive(ws, stream, events))
        except ConnectionError:
            pass
        finally:
            self.sockets.discard(ws)
            await release()
        return ws

    async def _release(self, request: web.Request, slot: int, stream: Stream | None) -> None:
        await self.release(slot, stream)
        log.info("tts: %s left slot %d (%d frames spoken)", request.remote, slot,
                 stream.frames if stream is not None else 0)

    async def _send(self, ws: web.WebSocketResponse, events: asyncio.Queue, out: AudioOut,
                    release: Callable[[], Awaitable]) -> None:
        """The stream's events to the client, in order; End and Error close the connection."""
        while True:
            event = await events.get()
            if isinstance(event, Error):
                await send_error(ws, event.message, WSCloseCode.PROTOCOL_ERROR
                                 if event.message.startswith("bad message")
                                 else WSCloseCode.INTERNAL_ERROR)
                return
            if isinstance(event, End):
                await release()
                await ws.close(code=WSCloseCode.OK)
                return
            data = out.audio(event.pcm) if isinstance(event, Audio) else out.text(event)
            if data is not None:
                await ws.send_bytes(data)

    async def _receive(self, ws: web.WebSocketResponse, stream: Stream,
                       events: asyncio.Queue) -> None:
        """The client's messages into the stream, until the connection closes (the client, or
        the sender after the end) or the client sends what the protocol does not allow (then
        Error and a close, through `events` after the events before it)."""
        while True:
            msg = await next_message(ws, None if stream.ended else IDLE_SECONDS, "tts")
            if msg is None:
                return
            try:
                if msg.type == WSMsgType.TEXT:
                    stream.add_text(msg.data)
                elif msg.type != WSMsgType.BINARY:
                    continue
                elif msg.data == EOS_FRAME:
                    stream.end()
                else:
                    self._take(stream, unpack(msg.data))
                self.synthesizer.wake()
            except (BadMessage, ValueError) as e:
                log.warning("tts: bad message from a client: %s", e)
                await events.put(Error(f"bad message: {e}"))
                return

    def _take(self, stream: Stream, message: dict) -> None:
        kind = message["type"]
        if kind == "Text":
            if not isinstance(message.get("text"), str):
                raise BadMessage("a Text's 'text' must be a string")
            stream.add_text(message["text"])
        elif kind == "Eos":
            stream.end()
        elif kind == "Voice":
            if not self.synthesizer.takes_voice:
                raise BadMessage("this model takes no voice")
            stream.set_voice(voice_of(message))
        else:
            raise BadMessage(f"unknown message type {kind!r}")
