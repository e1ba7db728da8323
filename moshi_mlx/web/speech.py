"""What the speech services (`web.asr`, speech to text) share, in the protocol of Kyutai's
server (`moshi-server`): MessagePack framing, the api-key check, the slots of a service, the
HTTP routes every such server answers, and the liveness of a websocket. Only bytes move here:
no MLX.

- Every websocket message, both ways, is one binary frame holding a MessagePack map with a
  "type" key. Float32 arrays go out as MessagePack float32 (as Kyutai's server writes its f32
  vectors), other numbers as Python's msgpack writes them.
- The api key comes from the `kyutai-api-key` header, else the `auth_id` query parameter; a
  key not allowed is HTTP 401 before the websocket opens.
- A service has a fixed number of slots (`--batch-size`); a client beyond them gets
  Error "no free channels" and a close.
- The server pings each client every PING_SECONDS, as Kyutai's server does; one that answers
  no ping within half of that (gone, frozen) is dropped, its slot freed. A client busy for a
  few seconds stays (Kyutai's file client reads and resamples the whole file after connecting:
  about 3 s for an hour of audio).
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TypeVar

import msgpack
import numpy as np
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from .. import __version__
from ..audio.mimi_process import MimiError
from ..engine.slots import SlotLoop

log = logging.getLogger("moshi_mlx")

API_KEY_HEADER = "kyutai-api-key"
API_KEY_QUERY = "auth_id"
DEFAULT_API_KEY = "public_token"  # the key of Kyutai's public configurations
PING_SECONDS = 10.0  # aiohttp's heartbeat: a ping this often (Kyutai's SEND_PING_EVERY), its pong
# due within half of it
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # about 35 s of float32 audio in one message
NO_FREE_CHANNELS = "no free channels"  # Kyutai's server's words, which Unmute expects
SLOT_WAIT_SECONDS = 10.0  # a client may wait this long for a slot whose client just left
HELD_WAIT_SECONDS = 0.2  # and this long for a client to leave, when every slot is held: Unmute
# waits 0.5 s from connecting for Ready or Error, and only an Error in time reads "at capacity"
CODEC_DID_NOT_START = "internal error: the audio codec did not start (see the server's log)"

T = TypeVar("T")


class BadMessage(ValueError):
    """A client's message that the protocol does not allow; the message says why."""


def _float32_array(packer: msgpack.Packer, values: np.ndarray) -> bytes:
    """A MessagePack array of float32 values (0xca, then the big-endian float), without a
    Python float per sample."""
    items = np.empty(len(values), dtype=[("tag", "u1"), ("value", ">f4")])
    items["tag"], items["value"] = 0xCA, values
    return packer.pack_array_header(len(values)) + items.tobytes()


def pack(message: dict) -> bytes:
    """A message (with its "type") -> a MessagePack map; float32 NumPy arrays as float32."""
    packer = msgpack.Packer()
    parts = [packer.pack_map_header(len(message))]
    for key, value in message.items():
        parts.append(packer.pack(key))
        if isinstance(value, np.ndarray) and value.dtype == np.float32:
            parts.append(_float32_array(packer, value.reshape(-1)))
        else:
            parts.append(packer.pack(value))
    return b"".join(parts)


def unpack(data: bytes) -> dict:
    """A client's binary message -> its map, which has a string "type". BadMessage otherwise."""
    try:
        message = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several kinds (ExtraData, ValueError, ...)
        raise BadMessage(f"not a MessagePack message ({type(e).__name__})") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise BadMessage("a message must be a MessagePack map with a string 'type'")
    return message


def pcm_of(message: dict, key: str = "pcm") -> np.ndarray:
    """A message's audio: a list of numbers -> float32 [samples]. BadMessage otherwise."""
    values = message.get(key)
    if not isinstance(values, list):
        raise BadMessage(f"'{key}' must be a list of numbers")
    pcm = np.array(values) if values else np.zeros(0)
    if pcm.ndim != 1 or pcm.dtype.kind not in "fiu":
        raise BadMessage(f"'{key}' must be a list of numbers")
    if not np.isfinite(pcm).all():
        raise BadMessage(f"'{key}' holds a value that is not a finite number")
    return pcm.astype(np.float32)


def api_key_allowed(request: web.Request, keys: frozenset[str]) -> bool:
    """The request's key (header, else query) is one of `keys`."""
    key = request.headers.get(API_KEY_HEADER)
    if key is None:
        key = request.query.get(API_KEY_QUERY)
    return key in keys


class Slots:
    """A service's `count` slots: a client holds one while its stream runs. A slot whose client
    left is not free until its Mimi is ready for the next stream (`give_back`); a client that
    comes meanwhile waits for it (Kyutai's server frees a channel at once: its clients may
    reconnect straight away), and only gets "no free channels" while every slot is held."""

    def __init__(self, count: int):
        self.count = count
        self._free = list(range(count))
        self._held: set[int] = set()  # slots of clients still connected
        self._changed: asyncio.Event | None = None  # set by each leaving and give_back

    @property
    def used(self) -> int:
        return self.count - len(self._free)

    async def take(self, wait_seconds: float = SLOT_WAIT_SECONDS,
                   held_seconds: float = HELD_WAIT_SECONDS) -> int | None:
        """The lowest free slot. While none is free but one is being given back, waits for it
        (at most `wait_seconds`); while every slot is held, waits `held_seconds` for a client
        to leave (one whose close is still on its way). None when that wait ends."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not self._free:
            limit = wait_seconds if len(self._held) < self.count else held_seconds
            left = start + limit - loop.time()
            if left <= 0:
                return None
            self._changed = self._changed or asyncio.Event()
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        self._free.sort()
        slot = self._free.pop(0)
        self._held.add(slot)
        return slot

    def leaving(self, slot: int) -> None:
        """The slot's client is gone; `give_back` follows once the slot is ready again."""
        self._held.discard(slot)
        if self._changed is not None:
            self._changed.set()

    def give_back(self, slot: int) -> None:
        self._held.discard(slot)
        self._free.append(slot)
        if self._changed is not None:
            self._changed.set()


@dataclass
class Service:
    """One websocket service of the server, as `/api/modules_info` lists it."""

    kind: str  # Kyutai's module type, as /api/modules_info names it, e.g. "batched_asr"
    path: str
    slots: Slots
    handler: object  # the websocket's request handler


class SlotService:
    """A websocket service whose clients each hold a slot of one engine loop (`engine.slots`):
    a subclass sets `kind` and `path` (as `/api/modules_info` lists them) and `handle`s a
    client."""

    kind = ""
    path = ""

    def __init__(self, engine: SlotLoop, api_keys: frozenset[str]):
        self.engine = engine
        self.api_keys = api_keys
        self.slots = Slots(len(engine.mimis))
        self.sockets: set[web.WebSocketResponse] = set()  # the clients', closed at the end

    def service(self) -> Service:
        return Service(self.kind, self.path, self.slots, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def release(self, slot: int, stream: object | None) -> None:
        """`slot`'s client is gone: its stream (if it had one) ends, and the slot is given back
        once ready for the next stream (a client coming meanwhile waits for it)."""
        self.slots.leaving(slot)
        try:
            if stream is not None:
                await asyncio.wrap_future(self.engine.close(stream))
        finally:
            self.slots.give_back(slot)

    async def open_stream(self, ws: web.WebSocketResponse, slot: int,
                          open_: Callable[[], T]) -> T | None:
        """`open_()` (it resets the slot's Mimi: it blocks) off the event loop -> the slot's
        stream; None once the client got Error and a close because its Mimi did not start."""
        try:
            return await asyncio.to_thread(open_)
        except MimiError as e:
            log.warning("%s: slot %d: %s", self.path, slot, e)
            await send_error(ws, CODEC_DID_NOT_START, WSCloseCode.INTERNAL_ERROR)
            return None


def outbox() -> tuple[asyncio.Queue, Callable[[object], None]]:
    """A queue of a stream's events on the event loop, and the `emit(event)` that the model's
    thread calls to hand one over."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    return queue, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)


async def converse(ws: web.WebSocketResponse, send: Coroutine, receive: Coroutine) -> None:
    """A client's two directions: `send` (the stream's events, as a task) while `receive`
    (the client's messages) runs; once the client is done, an Error on its way still goes out
    (1 s) unless the connection is closed. The sender is cancelled at the end, whatever
    happened."""
    sender = asyncio.create_task(send)
    try:
        await receive
        if not ws.closed:
            await asyncio.wait([sender], timeout=1.0)
    finally:
        sender.cancel()


async def open_socket(request: web.Request, keys: frozenset[str]) -> web.WebSocketResponse:
    """Opens the websocket, pinged as the module's docstring says. As Kyutai's server: a
    request that is no websocket upgrade is HTTP 400 whatever its key, then a key not allowed
    is HTTP 401 with no body."""
    ws = web.WebSocketResponse(heartbeat=PING_SECONDS, max_msg_size=MAX_MESSAGE_BYTES)
    if ws.can_prepare(request).ok and not api_key_allowed(request, keys):
        log.info("refused %s on %s: no valid api key", request.remote, request.path)
        raise web.HTTPUnauthorized(text="")
    await ws.prepare(request)  # HTTPBadRequest for a request that is no upgrade
    return ws


async def send_error(ws: web.WebSocketResponse, message: str,
                     code: int = WSCloseCode.OK) -> None:
    """Error{message}, then a close; a client already gone is no error."""
    try:
        await ws.send_bytes(pack({"type": "Error", "message": message}))
        await ws.close(code=code, message=message[:120].encode())
    except ConnectionError:
        pass


async def next_message(ws: web.WebSocketResponse, idle_seconds: float | None,
                       service: str) -> WSMessage | None:
    """The client's next message, or None once the connection is over: closed, silent for
    `idle_seconds` (then closed), or a frame that cannot be read (then Error and a close).
    `service` names the service in the log."""
    try:
        msg = await ws.receive(timeout=idle_seconds)
    except asyncio.TimeoutError:
        log.info("%s: closing a client silent for %g s", service, idle_seconds)
        await ws.close(code=WSCloseCode.OK, message=b"no message for a long time")
        return None
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
        return None
    if msg.type == WSMsgType.ERROR:
        error = ws.exception()
        log.warning("%s: dropped a client: %s", service, error)
        await send_error(ws, f"bad message: {error}", WSCloseCode.MESSAGE_TOO_BIG
                         if "too big" in str(error).lower() else WSCloseCode.PROTOCOL_ERROR)
        return None
    return msg


async def take_slot(request: web.Request, ws: web.WebSocketResponse, slots: Slots
                    ) -> int | None:
    """A free slot (see `Slots.take`), or None after Error "no free channels" and a close."""
    slot = await slots.take()
    if slot is None:
        log.info("refused %s: %s", request.remote, NO_FREE_CHANNELS)
        await send_error(ws, NO_FREE_CHANNELS)
    return slot


BUILD_INFO_KEYS = ("build_timestamp", "build_date", "git_branch", "git_timestamp", "git_date",
                   "git_hash", "git_describe", "rustc_host_triple", "rustc_version",
                   "cargo_target_triple")  # Kyutai's server's BuildInfo, all strings


def build_info() -> dict:
    """What `GET /api/build_info` answers (Unmute's health check only needs the 200): the keys
    of Kyutai's server's, this package's version as the `git_describe`, the others empty."""
    return {key: f"moshi_mlx {__version__}" if key == "git_describe" else ""
            for key in BUILD_INFO_KEYS}


def speech_app(services: list[Service]) -> web.Application:
    """The server's routes: each service's websocket, `/api/build_info` and
    `/api/modules_info` (the slots of each)."""
    app = web.Application()

    async def info(request: web.Request) -> web.Response:
        return web.json_response(build_info())

    async def modules(request: web.Request) -> web.Response:
        # Kyutai's server writes every value as a string
        return web.json_response([{"type": s.kind, "path": s.path,
                                   "used_slots": str(s.slots.used),
                                   "total_slots": str(s.slots.count)} for s in services])

    app.router.add_get("/api/build_info", info)
    app.router.add_get("/api/modules_info", modules)
    for service in services:
        app.router.add_get(service.path, service.handler)
    return app
