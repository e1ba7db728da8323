"""The chat websocket, `/api/chat`: who holds the model (one conversation at a time; others are
told "busy") and one connection's session (the client's messages dispatched into the live engine,
Moshi's text and voice out, the ping watchdog). README.md's "Talk in the browser" describes the
behaviour; `web.server` puts this behind the origin policy."""

import asyncio
import json
import logging
import secrets
from collections import Counter
from dataclasses import asdict

from aiohttp import WSCloseCode, WSMsgType, web

from ..audio.constants import FRAME_RATE
from ..audio.mimi_process import MimiError
from ..engine.conversation import Conversation
from ..engine.live_engine import LiveEngine
from ..engine.stages import WAIT_SECONDS
from ..engine.worker import ModelThread, ModelWorker
from ..utils.sampling import SamplingSettings
from .protocol import AUDIO_CODECS, HANDSHAKE, AudioCodec, BadAudio, Kind, Reframer, message

log = logging.getLogger("moshi_mlx")

MAX_MESSAGE_BYTES = 256 * 1024  # about a minute of Opus, or 5 s of 16-bit PCM
PING_SECONDS = 0.5  # a ping to the client this often
PONG_TIMEOUT_SECONDS = 2.0  # a client that answers no ping for this long is gone
IDLE_TIMEOUT_SECONDS = 60.0  # by default, a conversation with no audio for this long ends
STATUS_EVERY = 12  # frames between two status messages (about 1 s)
MAX_WAITING_CHUNKS = 64  # audio messages waiting to be decoded: a client far ahead of real time
MIMI_FAILED = "audio codec failed"  # the start of the 0x05 message, and the close reason
BUSY_MESSAGE = "busy: Moshi is in another conversation; try again when it ends"
INTERNAL_ERROR_MESSAGE = "internal error: the conversation failed (see the server's log)"


async def quiet(coroutine) -> None:
    """Awaits a send to the client; a client already gone is no error."""
    try:
        await coroutine
    except ConnectionError:
        pass


async def refuse(ws: web.WebSocketResponse, text: str, code: int) -> None:
    """Sends an error message (its text up to the first colon is the close reason) and closes
    the connection with `code`."""
    try:
        await ws.send_bytes(message(Kind.ERROR, text.encode()))
        await ws.close(code=code, message=text.split(":")[0].encode())
    except ConnectionResetError:
        pass


CLOSE_REASONS = {  # for the closes aiohttp makes itself, with no reason
    WSCloseCode.MESSAGE_TOO_BIG: f"message too big: at most {MAX_MESSAGE_BYTES // 1024} KiB",
    WSCloseCode.PROTOCOL_ERROR: "websocket protocol error",
    WSCloseCode.INVALID_TEXT: "invalid websocket data",
    WSCloseCode.UNSUPPORTED_DATA: "unsupported data",
    WSCloseCode.ABNORMAL_CLOSURE: "connection lost",
    WSCloseCode.GOING_AWAY: "going away",
}


class ChatSocket(web.WebSocketResponse):
    """A websocket whose closes always carry a reason, also those aiohttp makes itself (a
    message too big, a broken frame)."""

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"",
                    drain: bool = True) -> bool:
        if not message:
            message = CLOSE_REASONS.get(code, "closed").encode()
        return await super().close(code=code, message=message, drain=drain)


class Session:
    """One conversation over one websocket: the client's messages into the live engine (`receive`),
    Moshi's text and voice out (`send`), and the client's liveness (`watch`).

    The engine's callbacks (on its threads) only hand messages to the event loop's outbox;
    `send` (a task) writes them to the websocket in order: a step's text before its voice.
    """

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, worker: ModelWorker,
                 conversation: Conversation, codec: AudioCodec, max_waiting: int,
                 send_status: bool, idle_timeout: float):
        self.ws = ws
        self.request = request
        self.codec = codec
        self.reframer = Reframer()
        self.send_status = send_status
        self.idle_timeout = idle_timeout
        self.ignored: Counter[str] = Counter()
        self.failure: tuple[str, BaseException] | None = None
        self.last_pong = 0.0  # the event loop's time of the client's last pong
        self._loop = asyncio.get_running_loop()
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the engine failed
        self.engine = LiveEngine(
            conversation, worker.executor, on_text=self._on_text, on_output=self._on_output,
            on_error=self._on_error, decode_input=self._decode, encode_output=codec.encode,
            max_waiting=max_waiting)

    def _decode(self, payload: bytes) -> list:
        """On the engine's input thread: a chunk of the client's audio -> its complete frames.
        Raises BadAudio."""
        return self.reframer.push(self.codec.decode(payload))

    def take_audio(self, payload: bytes) -> None:
        """Hands a chunk of the client's audio to the engine. Raises BadAudio when the client
        sends much faster than real time."""
        if self.engine.pipeline.waiting(0) >= MAX_WAITING_CHUNKS:
            raise BadAudio("audio comes much faster than real time")
        self.engine.put(payload)

    def ignore(self, reason: str) -> None:
        """Logs an ignored message (each reason once per connection)."""
        if not self.ignored[reason]:
            log.warning("ignored: %s", reason)
        self.ignored[reason] += 1

    # --- engine callbacks (its threads) ---

    def _send_soon(self, data: bytes | None) -> None:
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, data)

    def _on_text(self, frame) -> None:
        if frame.text is not None:
            self._send_soon(message(Kind.TEXT, frame.text.encode()))

    def _on_output(self, frame) -> None:
        if frame.payload:
            self._send_soon(message(Kind.AUDIO, frame.payload))
        if self.send_status and (frame.index + 1) % STATUS_EVERY == 0:
            self._send_soon(message(Kind.METADATA, json.dumps(self.status()).encode()))

    def _on_error(self, stage: str, error: BaseException) -> None:
        self.failure = (stage, error)
        self._send_soon(None)

    # --- the event loop ---

    async def send(self) -> None:
        """Writes the engine's messages until it fails; then ends the conversation with an
        error message."""
        while (data := await self._outbox.get()) is not None:
            await self.ws.send_bytes(data)
            self._outbox.task_done()
        stage, error = self.failure
        if isinstance(error, BadAudio):
            log.warning("ended a conversation: bad audio: %s", error)
            await refuse(self.ws, f"bad audio: {error}", WSCloseCode.UNSUPPORTED_DATA)
        elif isinstance(error, MimiError):  # designed for: a hung or dead Mimi process
            log.error("ended a conversation: %s", error)
            await refuse(self.ws, f"{MIMI_FAILED}: {error}. Start a new conversation.",
                         WSCloseCode.INTERNAL_ERROR)
        else:
            log.error("conversation failed in its %s stage", stage, exc_info=error)
            await refuse(self.ws, INTERNAL_ERROR_MESSAGE, WSCloseCode.INTERNAL_ERROR)

    async def flush(self) -> None:
        """Waits until the messages handed to the event loop are written (1 s at most)."""
        try:
            await asyncio.wait_for(self._outbox.join(), timeout=1.0)
        except asyncio.TimeoutError:
            pass

    def status(self) -> dict:
        return {"type": "status", **self.engine.counters.status(),
                "queued": self.engine.waiting(),
                "stages_ms": {name: t.summary_ms() for name, t in self.engine.times.items()}}

    async def send_json(self, data: dict) -> None:
        await self.ws.send_bytes(message(Kind.METADATA, json.dumps(data).encode()))

    async def watch(self) -> None:
        """Pings the client every PING_SECONDS; returns once it has answered none for
        PONG_TIMEOUT_SECONDS (counted from its last pong, or from the handshake), having cut
        the connection."""
        loop = asyncio.get_running_loop()
        self.last_pong = loop.time()
        ping = None
        try:
            while (silent := loop.time() - self.last_pong) < PONG_TIMEOUT_SECONDS:
                if ping is None or ping.done():  # a ping can wait on a client that reads nothing
                    ping = asyncio.create_task(quiet(self.ws.ping()))
                await asyncio.sleep(min(PING_SECONDS, PONG_TIMEOUT_SECONDS - silent))
        finally:
            if ping is not None:
                ping.cancel()
        log.warning("ended a conversation: %s answered no ping for %.1f s (gone)",
                    self.request.remote, silent)
        if self.request.transport is not None:  # no close handshake with a client that is gone
            self.request.transport.abort()

    async def receive(self) -> None:
        """Takes the client's messages (answers its pings, notes its pongs) until it closes,
        sends audio that cannot be decoded, or sends no audio for `idle_timeout` seconds once
        Moshi has answered all it heard."""
        ws, loop = self.ws, asyncio.get_running_loop()
        last_audio = loop.time()
        while True:
            left = last_audio + self.idle_timeout - loop.time()
            if left <= 0:
                if self.engine.pipeline.idle:
                    await self.flush()
                    reason = f"no audio for {self.idle_timeout:g} s"
                    log.info("ended a conversation: %s", reason)
                    await ws.close(code=WSCloseCode.OK, message=reason.encode())
                    return
                left = WAIT_SECONDS  # the frames already received are answered first
            try:
                msg = await ws.receive(timeout=left)
            except asyncio.TimeoutError:
                continue
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.PONG:
                self.last_pong = loop.time()
            elif msg.type == WSMsgType.PING:
                await quiet(ws.pong(msg.data))
            elif msg.type == WSMsgType.TEXT:
                self.ignore("a text message (the protocol's messages are binary)")
            elif msg.type == WSMsgType.ERROR:
                log.warning("connection error: %s", ws.exception())
            elif msg.type != WSMsgType.BINARY:
                self.ignore(f"a {msg.type.name} message")
            elif not msg.data:
                self.ignore("an empty message")
            elif msg.data[0] == Kind.AUDIO:
                last_audio = loop.time()
                try:
                    self.take_audio(msg.data[1:])
                except BadAudio as e:
                    log.warning("ended a conversation: bad audio: %s", e)
                    await refuse(ws, f"bad audio: {e}", WSCloseCode.UNSUPPORTED_DATA)
                    return
            elif msg.data[0] in (Kind.CONTROL, Kind.PING):
                self.ignore(f"a {Kind(msg.data[0]).name.lower()} message (not used)")
            else:
                self.ignore(f"a message of unknown kind {msg.data[0]}")

    def log_end(self) -> None:
        extra = f", {sum(self.ignored.values())} messages ignored" if self.ignored else ""
        log.info("conversation ended: %s%s", self.engine.counters.summary(), extra)


class Chat:
    """Serves conversations with the worker's model, one at a time: the connection that holds the
    model (talking, or waiting for the previous one's clean-up) keeps it until its conversation
    ends; any other is told "busy".

    `max_lag`: seconds of input audio that may wait for generation before the oldest is dropped.
    `seed`: every conversation starts from this seed (same input, same answer); None: a random
    seed per conversation, logged. `idle_timeout`: seconds a live client may send no audio
    before its conversation ends.
    """

    def __init__(self, worker: ModelWorker, sampling: SamplingSettings, max_lag: float = 0.5,
                 seed: int | None = None, vocab: tuple[int | None, int | None] = (None, None),
                 idle_timeout: float = IDLE_TIMEOUT_SECONDS):
        self.worker = worker
        self.sampling = sampling
        self.vocab = vocab  # (text, audio) vocabulary sizes: top-k's upper bounds
        self.max_queued = max(1, round(max_lag * FRAME_RATE))
        self.seed = seed
        self.idle_timeout = idle_timeout
        # The connection that has the model: any other is refused. Only its own conversation
        # lets it go.
        self._holder: web.WebSocketResponse | None = None
        self._turn = asyncio.Lock()  # held by a conversation until its clean-up is done
        self._cleaner = ModelThread("chat-cleanup")  # one thread for every clean-up
        self.sockets: set[web.WebSocketResponse] = set()

    @property
    def busy(self) -> bool:
        return self._holder is not None

    def _let_go(self, ws: web.WebSocketResponse) -> None:
        """`ws`'s client no longer needs the model: the next client may take it."""
        if self._holder is ws:
            self._holder = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """A websocket request (its origin already checked): a conversation, or "busy"."""
        # Pings are answered and pongs watched by the session (autoping off): aiohttp's heartbeat
        # measures from the last message of any kind, not from the last pong.
        ws = ChatSocket(max_msg_size=MAX_MESSAGE_BYTES, autoping=False,
                        timeout=PONG_TIMEOUT_SECONDS)
        try:
            await ws.prepare(request)
        except ConnectionResetError:  # the client left before the upgrade was answered: the
            return web.Response()  # reply aiohttp then tries to write fails quietly
        self.sockets.add(ws)
        try:
            if self.busy:
                log.info("refused %s: busy", request.remote)
                await refuse(ws, BUSY_MESSAGE, WSCloseCode.TRY_AGAIN_LATER)
                return ws
            await self._converse(ws, request)
        finally:
            self.sockets.discard(ws)
        return ws

    def _options(self, query) -> tuple[SamplingSettings, AudioCodec, bool]:
        """(sampling, audio codec, whether to send status messages) asked for by a connection's
        URL query; ValueError for a bad value. Other parameters are ignored."""
        sampling = self.sampling.with_query(query, self.vocab)
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
        self._holder = ws  # before the first await: the next client is refused
        try:
            async with self._turn:  # the previous conversation's clean-up first
                await self._talk(ws, request, sampling, codec, send_status, seed)
        finally:
            self._let_go(ws)

    async def _talk(self, ws: web.WebSocketResponse, request: web.Request,
                    sampling: SamplingSettings, codec: AudioCodec, send_status: bool,
                    seed: int) -> None:
        session = None
        tasks: list[asyncio.Task] = []
        try:
            conversation = await self.worker.run(self.worker.new_conversation,
                                                 *sampling.samplers(self.vocab), seed)
            session = Session(ws, request, self.worker, conversation, codec, self.max_queued,
                              send_status, self.idle_timeout)
            log.info("conversation with %s (seed %d, %s audio)", request.remote, seed, codec.name)
            await ws.send_bytes(HANDSHAKE)
            if send_status:
                await session.send_json({"type": "conversation", "seed": seed,
                                         "audio": codec.name,
                                         "max_lag_ms": round(1000 * self.max_queued / FRAME_RATE),
                                         **asdict(sampling)})
            session.engine.start()
            tasks = [asyncio.create_task(session.send()),
                     asyncio.create_task(session.receive()),
                     asyncio.create_task(session.watch())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except ConnectionResetError:
            pass
        except Exception:
            log.exception("conversation failed")
            await refuse(ws, INTERNAL_ERROR_MESSAGE, WSCloseCode.INTERNAL_ERROR)
        finally:
            self._let_go(ws)  # the client is gone: the next one waits for the clean-up
            try:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if session is not None:  # off the event loop: stopping the stages waits for
                    await asyncio.wrap_future(  # their frames; Mimi's next streams start
                        self._cleaner.submit(self._clean_up, session))
            finally:  # even when the server stops during the awaits
                if session is not None:
                    session.log_end()

    @staticmethod
    def _clean_up(session: Session) -> None:
        session.engine.stop()
        session.engine.conversation.prepare_next()

    async def close_all(self) -> None:
        """Closes every open connection (the server is stopping)."""
        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")
