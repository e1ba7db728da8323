"""The browser app's aiohttp application: the chat websocket (`web.chat`) behind the origin
policy (`web.origin`), the page (`web/static/`, or another one), and a shutdown that closes every
connection. `local_web` is the command that runs it."""

import logging
from pathlib import Path

from aiohttp import web

from ..engine.worker import ModelWorker
from ..utils.sampling import SamplingSettings
from .chat import Chat
from .origin import OriginPolicy

log = logging.getLogger("moshi_mlx")

STATIC_DIR = Path(__file__).parent / "static"  # the page shipped with the package


class ChatServer:
    """The routes: `/api/chat` for pages that `origins` allows (and clients that are not
    browsers), `/api/sampling` (the query's defaults and ranges), the page's files at `/`. The
    other arguments are `Chat`'s."""

    def __init__(self, worker: ModelWorker, sampling: SamplingSettings, origins: OriginPolicy,
                 **chat_options):
        self.chat = Chat(worker, sampling, **chat_options)
        self.origins = origins

    def app(self, static_dir: Path | None) -> web.Application:
        """The aiohttp application: the websocket, and the page in `static_dir` (none if None)."""
        app = web.Application()
        app.router.add_get("/api/chat", self.handle_chat)
        app.router.add_get("/api/sampling", self.handle_sampling)
        if static_dir is not None:
            index = static_dir / "index.html"

            async def page(request: web.Request) -> web.FileResponse:
                return web.FileResponse(index)

            app.router.add_get("/", page)
            app.router.add_static("/", static_dir)
        app.on_shutdown.append(self._close_all)
        return app

    async def handle_sampling(self, request: web.Request) -> web.Response:
        """The sampling settings a client may send in /api/chat's query: defaults and ranges."""
        return web.json_response(self.chat.sampling.query_ranges(self.chat.vocab))

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        if not self.origins.allows(request):
            log.warning("refused a websocket from %s: origin %s is not this server's (see "
                        "--allow-origin)", request.remote, request.headers.get("Origin"))
            raise web.HTTPForbidden(text="This page's origin may not use this server.\n")
        return await self.chat.handle(request)

    async def _close_all(self, app: web.Application) -> None:
        await self.chat.close_all()
