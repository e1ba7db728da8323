"""`/api/asr-streaming`: streaming speech to text in the protocol of Kyutai's server.

In: `Audio{pcm}` (24 kHz float32, any length), `OggOpus{data}` (an Ogg-Opus stream: byte
values, as Kyutai's server takes them, or bytes), `Marker{id}`.
Out: `Ready` first, then `Word{text, start_time}`, `EndWord{stop_time}`, `Step{step_idx, prs,
buffered_pcm}` (one per 80 ms frame transcribed, for a model with voice-activity heads),
`Marker{id}` once the audio before it and the model's delay are transcribed, `Error{message}`.
Audio after a marker is taken as before; the server never closes first, except on bad input
(Error, then a close: that client only), after IDLE_SECONDS without a message, or when the
model failed. Text frames are ignored, as Kyutai's server ignores them.

The transcription runs in the engine (`engine.transcription.Transcriber`, handed to this
service by `serve`): this module only moves messages, and imports no MLX.
"""

import asyncio
import logging
from dataclasses import asdict

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from ..engine.transcription import Error, Event, Stream, Transcriber
from .protocol import BadAudio, OpusAudio
from .speech import (
    BadMessage,
    SlotService,
    converse,
    next_message,
    open_socket,
    outbox,
    pack,
    pcm_of,
    send_error,
    take_slot,
    unpack,
)

log = logging.getLogger("moshi_mlx")

PATH = "/api/asr-streaming"
IDLE_SECONDS = 120.0  # a client that sends nothing for this long is closed (as Kyutai's server)


def message_of(event: Event) -> bytes:
    """An engine event -> its message: the event's class names the type, its fields the
    message's; the voice-activity probabilities go out as float32."""
    fields = asdict(event)
    if "prs" in fields:
        fields["prs"] = np.asarray(fields["prs"], np.float32)
    return pack({"type": type(event).__name__, **fields})


def bytes_of(message: dict) -> bytes:
    """An OggOpus message's data: bytes, or a list of byte values (as Kyutai's server reads and
    writes it: MessagePack's bin is also taken here). BadMessage otherwise."""
    data = message.get("data")
    if isinstance(data, list):
        try:
            return bytes(data)
        except (TypeError, ValueError):
            pass
    elif isinstance(data, bytes):
        return data
    raise BadMessage("'data' must be bytes or a list of byte values (an Ogg-Opus stream)")


class AsrService(SlotService):
    """The service over one `Transcriber` (its rows are the slots)."""

    kind = "batched_asr"  # as Kyutai's server names the module in /api/modules_info
    path = PATH

    def __init__(self, transcriber: Transcriber, api_keys: frozenset[str]):
        super().__init__(transcriber, api_keys)
        self.transcriber = transcriber

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = await open_socket(request, self.api_keys)
        row = await take_slot(request, ws, self.slots)
        if row is None:
            return ws
        self.sockets.add(ws)
        stream = None
        events, emit = outbox()
        try:
            stream = await self.open_stream(ws, row, lambda: self.transcriber.open(row, emit))
            if stream is None:
                return ws
            log.info("asr: %s on slot %d", request.remote, row)
            await converse(ws, self._send(ws, events), self._receive(ws, stream, events))
        except ConnectionError:
            pass
        finally:
            self.sockets.discard(ws)
            await self.release(row, stream)
            log.info("asr: %s left slot %d (%d frames transcribed)", request.remote, row,
                     stream.steps if stream is not None else 0)
        return ws

    async def _send(self, ws: web.WebSocketResponse, events: asyncio.Queue) -> None:
        """The stream's events to the client, in order; an Error closes the connection."""
        while True:
            event = await events.get()
            if isinstance(event, Error):
                await send_error(ws, event.message, WSCloseCode.INTERNAL_ERROR)
                return
            await ws.send_bytes(message_of(event))

    async def _receive(self, ws: web.WebSocketResponse, stream: Stream,
                       events: asyncio.Queue) -> None:
        """The client's messages into the stream, until it closes or sends what the protocol
        does not allow (then Error and a close, through `events` after the events before it)."""
        opus = None
        while True:
            msg = await next_message(ws, IDLE_SECONDS, "asr")
            if msg is None:
                return
            if msg.type != WSMsgType.BINARY:
                continue
            try:
                message = unpack(msg.data)
                kind = message["type"]
                if kind == "Audio":
                    stream.add_audio(pcm_of(message))
                elif kind == "OggOpus":
                    opus = opus or OpusAudio()
                    stream.add_audio(opus.decode(bytes_of(message)))
                elif kind == "Marker":
                    marker_id = message.get("id")  # Kyutai's server's i64
                    if type(marker_id) is not int or not -2**63 <= marker_id < 2**63:
                        raise BadMessage("a Marker's 'id' must be an integer (64 bits)")
                    stream.add_marker(marker_id)
                else:
                    raise BadMessage(f"unknown message type {kind!r}")
                self.transcriber.wake()
            except (BadMessage, BadAudio, ValueError) as e:  # TooMuchAudio is a ValueError
                log.warning("asr: bad message from a client: %s", e)
                await events.put(Error(f"bad message: {e}"))
                return

