"""Kyutai's speech services on this machine, in the protocol of Kyutai's server (`moshi-server`),
so that its clients (Unmute, Kyutai's scripts) work unchanged:

    python -m moshi_mlx.serve --stt kyutai/stt-1b-en_fr-mlx [--port 8080] [--batch-size 4]

`--stt` serves streaming speech to text at `/api/asr-streaming` (`web.asr`). REPO_OR_DIR is a
Hugging Face repository or a local directory holding a repository's files (its config.json
names them). `--batch-size` streams are served at once, in one batched step of the model per
80 ms frame (`engine.batched`); a client beyond them gets "no free channels". Every websocket
needs an api key (`--api-key`, default public_token, as Kyutai's public configurations):
the `kyutai-api-key` header or `?auth_id=`. `GET /api/build_info` answers 200.
"""

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine

from aiohttp import WSCloseCode, web

from . import cli, families, model_files
from .engine.worker import ModelThread
from .web.asr import AsrService
from .web.origin import is_loopback
from .web.speech import DEFAULT_API_KEY, speech_app

log = logging.getLogger("moshi_mlx")

STOP_SECONDS = 10.0  # the model loop's last step, at the end


class SetupError(Exception):
    """A server setting that cannot be used (the address, a service not available)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_mlx.serve",
        description="Serve Kyutai's speech-to-text models over websockets, in the protocol of "
                    "Kyutai's server (moshi-server): /api/asr-streaming, for Unmute and "
                    "Kyutai's clients.")
    parser.add_argument("--stt", metavar="REPO_OR_DIR",
                        help="speech-to-text model: a Hugging Face repository (e.g. "
                             "kyutai/stt-1b-en_fr-mlx) or a local directory with its files")
    parser.add_argument("--tts", metavar="REPO_OR_DIR",
                        help="text-to-speech model (/api/tts_streaming): not served yet")
    parser.add_argument("--voice-repo", metavar="REPO_OR_DIR", default="kyutai/tts-voices",
                        help="where the TTS voices are looked up (default: kyutai/tts-voices)")
    parser.add_argument("--host", default="localhost",
                        help="address to listen on (default: localhost; 0.0.0.0 lets other "
                             "machines use the models)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any)")
    parser.add_argument("--api-key", action="append", metavar="TOKEN",
                        help=f"a key clients must give (header kyutai-api-key or ?auth_id=); "
                             f"repeatable (default: {DEFAULT_API_KEY})")
    parser.add_argument("--batch-size", type=cli.positive_int, default=4, metavar="N",
                        help="streams served at once by each service, in one batched step "
                             "(default: 4); each takes a Mimi process (about 0.4 GB)")
    parser.add_argument("--ignore-memory", action="store_true",
                        help="load even when the model does not fit the memory available")
    args = parser.parse_args(argv)
    if args.stt is None and args.tts is None:
        parser.error("give --stt (and/or --tts): the service(s) to serve")
    args.api_key = frozenset(args.api_key or [DEFAULT_API_KEY])
    return args


async def serve(args: argparse.Namespace, stt: model_files.ModelFiles) -> None:
    """Loads the model, then serves until cancelled (Ctrl-C, SIGTERM: `cli.run_server`): the
    streams are closed, the model loop stopped, Mimi's processes ended."""
    if not is_loopback(args.host):
        log.warning("warning: listening on %s: other machines can use the models (with an api "
                    "key)", args.host)
    model_thread = ModelThread("stt-model")
    memory = model_files.MemoryOptions(ignore_memory=args.ignore_memory, streams=args.batch_size)
    log.info("loading the speech-to-text model (%d streams)", args.batch_size)
    transcriber = await asyncio.wrap_future(model_thread.submit(
        families.transcriber_loader(stt, args.batch_size, memory)))
    running = asyncio.wrap_future(model_thread.submit(transcriber.run))
    asr = AsrService(transcriber, args.api_key)
    runner = web.AppRunner(speech_app([asr.service()]), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
        try:
            await site.start()
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise SetupError(f"cannot listen on {args.host}:{args.port} ({reason}).") from None
        host, port = runner.addresses[0][:2]
        log.info("serving ws://%s:%d/api/asr-streaming (Ctrl-C stops)",
                 "localhost" if is_loopback(args.host) else host, port)
        await asyncio.Event().wait()
    finally:
        for ws in list(asr.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")
        await runner.cleanup()
        transcriber.stop()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(running, STOP_SECONDS)
        transcriber.close_all()


def prepare(args: argparse.Namespace) -> Coroutine:
    """The checks and files before loading: the server's coroutine."""
    if args.tts is not None:
        raise SetupError("--tts: /api/tts_streaming is not served yet (Kyutai's TTS runs in "
                         "run_tts); serve --stt alone.")
    stt = model_files.resolve_repo(args.stt)
    families.transcriber_loader(stt, args.batch_size)  # the family, checked before loading
    return serve(args, stt)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_server(lambda: prepare(args), user_errors=(SetupError,))


def entry() -> None:
    """The command's entry point (`python -m moshi_mlx.serve`)."""
    cli.exit_app(main())


if __name__ == "__main__":
    entry()
