"""Talk with Moshi in the browser.

    python -m moshi_mlx.local_web [--host localhost] [--port 8998] [--no-browser] [-q 4|8] ...

Serves the page shipped in this package (or another one, `--static DIR`) and Kyutai's websocket
protocol at `/api/chat`, so Kyutai's own clients (`python -m moshi.client`, `moshi-cli`, its web
client) work too. One conversation at a time; each connection starts a fresh one.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import webbrowser
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import cli, families, model_files
from .engine.worker import ModelWorker
from .web.chat import IDLE_TIMEOUT_SECONDS, PONG_TIMEOUT_SECONDS
from .web.origin import OriginPolicy, is_loopback
from .web.server import STATIC_DIR, ChatServer

log = logging.getLogger("moshi_mlx")


class OneLineHttpErrors(logging.Filter):
    """aiohttp's server logs each malformed request it answers with a 400 with a traceback:
    one warning line instead, naming the peer and what was wrong. Other errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
            reason = lines[0].rstrip(":") if lines else ""
            record.msg, record.args = "%s: %s: %.120s", (record.getMessage(),
                                                         type(error).__name__, reason)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


ONE_LINE_HTTP_ERRORS = OneLineHttpErrors()


class SetupError(Exception):
    """A server setting that cannot be used (TLS files, static directory, address)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_mlx.local_web",
        description="Talk with Moshi in the browser (Kyutai's websocket protocol at /api/chat).")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="localhost",
                        help="address to listen on (default: localhost; another one lets other "
                             "machines use the model)")
    server.add_argument("--port", type=int, default=8998, help="port (default: 8998; 0: any)")
    server.add_argument("--no-browser", action="store_true", help="do not open the browser")
    server.add_argument("--ssl", type=Path, metavar="DIR",
                        help="serve https: DIR holds cert.pem and key.pem")
    server.add_argument("--static", metavar="DIR|none",
                        help="serve another web UI from DIR (with an index.html), or none")
    server.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="also let pages from ORIGIN (e.g. http://localhost:5173) use the "
                             "websocket; repeatable (default: only this server's own pages)")
    server.add_argument("--max-lag", type=float, default=0.5, metavar="SECONDS",
                        help="input audio that may wait for the model; older frames are dropped "
                             "when generation falls behind (default: 0.5)")
    server.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_SECONDS,
                        metavar="SECONDS",
                        help="end a conversation whose client sends no audio for this long "
                             f"(default: {IDLE_TIMEOUT_SECONDS:g}); a client that stops "
                             f"answering the websocket's pings is dropped after "
                             f"{PONG_TIMEOUT_SECONDS:g} s whatever this is")
    args = cli.parse_app_args(parser, argv)
    for flag, value in (("--max-lag", args.max_lag), ("--idle-timeout", args.idle_timeout)):
        if not 0 < value < float("inf"):
            parser.error(f"{flag} must be a number of seconds > 0, got {value}")
    return args


def static_dir(value: str | None) -> Path | None:
    if value is None:
        return STATIC_DIR
    if value == "none":
        return None
    path = Path(value)
    if not (path / "index.html").is_file():
        raise SetupError(f"{path}: --static needs a directory with an index.html.")
    return path


def ssl_context(directory: Path | None) -> ssl.SSLContext | None:
    if directory is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    for path in (cert, key):
        if not path.is_file():
            raise SetupError(f"{path}: no such file (--ssl needs cert.pem and key.pem).")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as e:
        raise SetupError(f"{directory}: cannot use cert.pem and key.pem ({e.reason}).") from None
    return context


def page_url(host: str, port: int, tls: bool) -> str:
    """The address to open: a wildcard address is shown as localhost."""
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/"


def open_browser(url: str) -> None:
    """Opens the page, unless no graphical browser can be expected (Linux with no display: a
    text browser would take over the terminal)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        log.info("no display: open %s in a browser", url)
        return
    webbrowser.open(url)


async def serve(args: argparse.Namespace, files: model_files.ModelFiles, static: Path | None,
                context: ssl.SSLContext | None) -> None:
    """Listens, loads the model (clients wait for it), then serves until cancelled: Ctrl-C, or
    SIGTERM (how service managers stop a server), which takes the same way out, so that Mimi's
    processes are closed whatever their state."""
    main = asyncio.current_task()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows' loops
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    if not is_loopback(args.host):
        log.warning("warning: listening on %s: other machines can reach this server and use the "
                    "model; browsers there need https (--ssl) to use the microphone", args.host)
    logging.getLogger("aiohttp.server").addFilter(ONE_LINE_HTTP_ERRORS)
    cfg = files.lm_config
    sampling = cli.sampling_settings(args)
    worker = ModelWorker(families.live_loader(files, cli.make_samplers(args, cfg),
                                              args.cfg_coef, cli.memory_options(args)))
    server = ChatServer(worker, sampling, OriginPolicy(args.host, args.allow_origin),
                        max_lag=args.max_lag, seed=args.seed, vocab=(cfg.text_card, cfg.card),
                        idle_timeout=args.idle_timeout)
    runner = web.AppRunner(server.app(static), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port, ssl_context=context)
        try:
            await site.start()
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise SetupError(f"cannot listen on {args.host}:{args.port} ({reason}).") from None
        url = page_url(args.host, runner.addresses[0][1], context is not None)
        log.info("listening on %s; loading the model", url)
        await asyncio.wrap_future(worker.load())
        log.info("Moshi is ready: %s (Ctrl-C stops)", url)
        if not args.no_browser:
            open_browser(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        worker.close()


def run(args: argparse.Namespace) -> None:
    static, context = static_dir(args.static), ssl_context(args.ssl)
    files = model_files.resolve(args)
    cli.make_samplers(args, files.lm_config)  # the flags are the conversations' defaults
    try:
        asyncio.run(serve(args, files, static, context))
    except asyncio.CancelledError:  # SIGTERM
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C is how a server is stopped: exit code 0.
    return cli.run_main(lambda: run(args), "stopped", user_errors=(SetupError,),
                        interrupted_code=0)


def entry() -> None:
    """The command's entry point (`python -m moshi_mlx.local_web`, `moshi-local-web`)."""
    cli.exit_app(main())


if __name__ == "__main__":
    entry()
