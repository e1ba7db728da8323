"""The chat server: Kyutai's websocket protocol at `/api/chat`, one conversation at a time, and the
page that talks to it.

Each connection is a fresh conversation (its own generation state, KV cache and Mimi stream).
While one runs, another client gets an error message ("busy") and a close. Moshi's text goes out
as soon as a step has produced it, before its voice is decoded. When generation falls behind
real time, the oldest waiting input frames are dropped, so the lag stays under `max_lag`.
"""

import asyncio
import json
import logging
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from aiohttp import WSCloseCode, WSMsgType, web

from . import utils
from .conversation import Conversation
from .mimi_stream import FRAME_RATE
from .model_worker import ModelWorker
from .protocol import AUDIO_CODECS, HANDSHAKE, AudioCodec, BadAudio, Kind, Reframer, message
from .web.origin import OriginPolicy
from .web.origin import is_loopback as is_loopback

log = logging.getLogger("moshi_mlx")

STATIC_DIR = Path(__file__).parent / "static"  # the page shipped with the package
MAX_MESSAGE_BYTES = 256 * 1024  # about a minute of Opus, or 5 s of 16-bit PCM
HEARTBEAT_SECONDS = 10.0  # a client that stops answering pings is dropped after this
STATUS_EVERY = 12  # frames between two status messages (about 1 s)
BUSY_MESSAGE = "busy: Moshi is in another conversation; try again when it ends"
INTERNAL_ERROR_MESSAGE = "internal error: the conversation failed (see the server's log)"
QUERY_SAMPLING = {  # the names Kyutai's web client uses in its URL query
    "text_temperature": ("text_temp", float),
    "text_topk": ("text_top_k", int),
    "audio_temperature": ("audio_temp", float),
    "audio_topk": ("audio_top_k", int),
}


async def refuse(ws: web.WebSocketResponse, text: str, code: int) -> None:
    """Sends an error message (its text up to the first colon is the close reason) and closes
    the connection with `code`."""
    try:
        await ws.send_bytes(message(Kind.ERROR, text.encode()))
        await ws.close(code=code, message=text.split(":")[0].encode())
    except ConnectionResetError:
        pass


@dataclass(frozen=True)
class Sampling:
    text_temp: float
    text_top_k: int
    audio_temp: float
    audio_top_k: int

    def with_query(self, query) -> "Sampling":
        """These settings, overridden by those in a URL query (Kyutai's names); ValueError for a
        value that is not a number or out of range."""
        changes = {}
        for name, (field, kind) in QUERY_SAMPLING.items():
            if name in query:
                try:
                    changes[field] = kind(query[name])
                except ValueError:
                    raise ValueError(f"{name}={query[name]!r} is not a number") from None
        updated = replace(self, **changes)
        updated.samplers()
        return updated

    def samplers(self) -> tuple[utils.Sampler, utils.Sampler]:
        """(text sampler, audio sampler); ValueError for an out-of-range value."""
        return (utils.Sampler(temp=self.text_temp, top_k=self.text_top_k),
                utils.Sampler(temp=self.audio_temp, top_k=self.audio_top_k))


class Session:
    """One conversation over one websocket: the client's audio in, Moshi's text and voice out.

    `take_audio` (on the event loop) decodes and frames the client's audio into a bounded queue;
    `generate` (a task) steps the conversation on each frame in the model's thread and sends
    the text, then the voice.
    """

    def __init__(self, ws: web.WebSocketResponse, worker: ModelWorker, conversation: Conversation,
                 codec: AudioCodec, max_queued: int, send_status: bool):
        self.ws = ws
        self.worker = worker
        self.conversation = conversation
        self.codec = codec
        self.reframer = Reframer()
        self.frames: asyncio.Queue = asyncio.Queue(max_queued)
        self.send_status = send_status
        self.received = 0  # input frames
        self.processed = 0
        self.dropped = 0
        self.step_seconds = 0.0  # recent average time of one step (listen, send, speak)
        self.ignored: Counter[str] = Counter()

    def take_audio(self, payload: bytes) -> None:
        """Decodes a chunk of the client's audio and queues its complete frames, dropping the
        oldest waiting ones when the queue is full. Raises BadAudio."""
        for frame in self.reframer.push(self.codec.decode(payload)):
            self.received += 1
            if self.frames.full():
                self.frames.get_nowait()
                self.dropped += 1
            self.frames.put_nowait(frame)

    def ignore(self, reason: str) -> None:
        """Logs an ignored message (each reason once per connection)."""
        if not self.ignored[reason]:
            log.warning("ignored: %s", reason)
        self.ignored[reason] += 1

    async def generate(self) -> None:
        try:
            while True:
                frame = await self.frames.get()
                start = time.perf_counter()
                _, text = await self.worker.run(self.conversation.listen, frame)
                self.processed += 1  # the model has stepped on it
                if text is not None:
                    await self.ws.send_bytes(message(Kind.TEXT, text.encode()))
                voice = await self.worker.run(self._speak)
                if voice:
                    await self.ws.send_bytes(message(Kind.AUDIO, voice))
                seconds = time.perf_counter() - start
                self.step_seconds += (seconds - self.step_seconds) / min(self.processed, 10)
                if self.send_status and self.processed % STATUS_EVERY == 0:
                    await self.send_json(self.status())
        except ConnectionResetError:
            pass  # the client is gone; the receiving side ends the session
        except Exception:
            log.exception("conversation failed")
            await refuse(self.ws, INTERNAL_ERROR_MESSAGE, WSCloseCode.INTERNAL_ERROR)

    def _speak(self) -> bytes:
        """In the model's thread: Moshi's voice for the last step, coded for the client."""
        pcm = self.conversation.speak()
        return b"" if pcm is None else self.codec.encode(pcm)

    def status(self) -> dict:
        return {"type": "status", "received": self.received, "processed": self.processed,
                "dropped": self.dropped, "queued": self.frames.qsize(),
                "step_ms": round(1000 * self.step_seconds, 1)}

    async def send_json(self, data: dict) -> None:
        await self.ws.send_bytes(message(Kind.METADATA, json.dumps(data).encode()))


class ChatServer:
    """Serves conversations with the worker's model, one at a time.

    `max_lag`: seconds of input audio that may wait for generation before the oldest is dropped.
    `seed`: every conversation starts from this seed (same input, same answer); None: a random
    seed per conversation, logged.
    """

    def __init__(self, worker: ModelWorker, sampling: Sampling, origins: OriginPolicy,
                 max_lag: float = 0.5, seed: int | None = None):
        self.worker = worker
        self.sampling = sampling
        self.origins = origins
        self.max_queued = max(1, round(max_lag * FRAME_RATE))
        self.seed = seed
        self.busy = False  # a conversation is running
        self.sockets: set[web.WebSocketResponse] = set()

    def app(self, static_dir: Path | None) -> web.Application:
        """The aiohttp application: the websocket, and the page in `static_dir` (none if None)."""
        app = web.Application()
        app.router.add_get("/api/chat", self.handle_chat)
        if static_dir is not None:
            index = static_dir / "index.html"

            async def page(request: web.Request) -> web.FileResponse:
                return web.FileResponse(index)

            app.router.add_get("/", page)
            app.router.add_static("/", static_dir)
        app.on_shutdown.append(self._close_all)
        return app

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote
        if not self.origins.allows(request):
            log.warning("refused a websocket from %s: origin %s is not this server's (see "
                        "--allow-origin)", peer, request.headers.get("Origin"))
            raise web.HTTPForbidden(text="This page's origin may not use this server.\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT_SECONDS)
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            if self.busy:
                log.info("refused %s: busy", peer)
                await refuse(ws, BUSY_MESSAGE, WSCloseCode.TRY_AGAIN_LATER)
                return ws
            await self._converse(ws, request)
        finally:
            self.sockets.discard(ws)
        return ws

    def _options(self, query) -> tuple[Sampling, AudioCodec, bool]:
        """(sampling, audio codec, whether to send status messages) asked for by a connection's
        URL query; ValueError for a bad value. Other parameters are ignored."""
        sampling = self.sampling.with_query(query)
        audio = query.get("audio", "opus")
        if audio not in AUDIO_CODECS:
            raise ValueError(f"audio={audio!r} is not one of {', '.join(AUDIO_CODECS)}")
        return sampling, AUDIO_CODECS[audio](), query.get("status") == "1"

    async def _converse(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        try:
            sampling, codec, send_status = self._options(request.query)
        except ValueError as e:
            await refuse(ws, f"bad request: {e}", WSCloseCode.POLICY_VIOLATION)
            return
        seed = secrets.randbits(32) if self.seed is None else self.seed
        self.busy = True  # before the first await: the next client is refused
        session = generation = None
        try:
            conversation = await self.worker.run(self.worker.new_conversation,
                                                 *sampling.samplers(), seed)
            session = Session(ws, self.worker, conversation, codec, self.max_queued, send_status)
            log.info("conversation with %s (seed %d, %s audio)", request.remote, seed, codec.name)
            await ws.send_bytes(HANDSHAKE)
            if send_status:
                await session.send_json({"type": "conversation", "seed": seed,
                                         "audio": codec.name,
                                         "max_lag_ms": round(1000 * self.max_queued / FRAME_RATE),
                                         **asdict(sampling)})
            generation = asyncio.create_task(session.generate())
            await self._receive(ws, session)
        except ConnectionResetError:
            pass
        except Exception:
            log.exception("conversation failed")
            await refuse(ws, INTERNAL_ERROR_MESSAGE, WSCloseCode.INTERNAL_ERROR)
        finally:
            try:
                if generation is not None:
                    generation.cancel()
                    await asyncio.gather(generation, return_exceptions=True)
            finally:  # even when the server stops during the await
                if session is not None:
                    self._log_end(session)
                self.busy = False

    async def _receive(self, ws: web.WebSocketResponse, session: Session) -> None:
        """Takes the client's messages until it closes or sends audio that cannot be decoded."""
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                session.ignore("a text message (the protocol's messages are binary)")
            elif msg.type == WSMsgType.ERROR:
                log.warning("connection error: %s", ws.exception())
            elif msg.type != WSMsgType.BINARY:
                session.ignore(f"a {msg.type.name} message")
            elif not msg.data:
                session.ignore("an empty message")
            elif msg.data[0] == Kind.AUDIO:
                try:
                    session.take_audio(msg.data[1:])
                except BadAudio as e:
                    log.warning("ended a conversation: bad audio: %s", e)
                    await refuse(ws, f"bad audio: {e}", WSCloseCode.UNSUPPORTED_DATA)
                    return
            elif msg.data[0] in (Kind.CONTROL, Kind.PING):
                session.ignore(f"a {Kind(msg.data[0]).name.lower()} message (not used)")
            else:
                session.ignore(f"a message of unknown kind {msg.data[0]}")

    @staticmethod
    def _log_end(session: Session) -> None:
        extra = f", {sum(session.ignored.values())} messages ignored" if session.ignored else ""
        log.info("conversation ended: %d frames received, %d processed, %d dropped%s",
                 session.received, session.processed, session.dropped, extra)

    async def _close_all(self, app: web.Application) -> None:
        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")
