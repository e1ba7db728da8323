"""Kyutai's speech services on this machine, in the protocol of Kyutai's server (`moshi-server`),
so that its clients (Unmute, Kyutai's scripts) work unchanged:

    python -m moshi_mlx.serve --stt kyutai/stt-1b-en_fr-mlx [--port 8080] [--batch-size 4]
    python -m moshi_mlx.serve --tts kyutai/tts-1.6b-en_fr [--voice-repo kyutai/tts-voices]

`--stt` serves streaming speech to text at `/api/asr-streaming` (`web.asr`), `--tts` text to
speech at `/api/tts_streaming` (`web.tts`); both may be served at once. REPO_OR_DIR is a
Hugging Face repository or a local directory holding a repository's files (its config.json
names them). `--batch-size` streams are served at once by each service: the STT streams in one
batched step of the model per 80 ms frame (`engine.batched`), the TTS streams one after the
other in each tick of its loop (`engine.speech_synthesis`: not batched); a client beyond them
gets "no free channels". Every websocket
needs an api key (`--api-key`, default public_token, as Kyutai's public configurations):
the `kyutai-api-key` header or `?auth_id=`. `GET /api/build_info` answers 200.
"""

import argparse
import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Coroutine

from aiohttp import WSCloseCode, web

from . import cli, model_files, speech_services
from .engine.tts import TtsOptions, tts_samplers
from .engine.worker import ModelThread
from .model_files.voices import DEFAULT_VOICE_REPO
from .web.asr import AsrService
from .web.origin import is_loopback
from .web.speech import DEFAULT_API_KEY, speech_app
from .web.tts import TtsService

log = logging.getLogger("moshi_mlx")

STOP_SECONDS = 10.0  # the model loop's last step, at the end
DEFAULT_VOICE = "unmute-prod-website/default_voice.wav"  # Kyutai's server configs' default_voice
TTS_CODEBOOKS = 24  # Kyutai's server configs' n_q (capped at the model's)
MAX_BREAK_SECONDS = 10.0  # Kyutai's server caps a <break> at this


class SetupError(Exception):
    """A server setting that cannot be used (the address, a service not available)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_mlx.serve",
        description="Serve Kyutai's speech-to-text and text-to-speech models over websockets, "
                    "in the protocol of Kyutai's server (moshi-server): /api/asr-streaming and "
                    "/api/tts_streaming, for Unmute and Kyutai's clients.")
    parser.add_argument("--stt", metavar="REPO_OR_DIR",
                        help="speech-to-text model: a Hugging Face repository (e.g. "
                             "kyutai/stt-1b-en_fr-mlx) or a local directory with its files")
    parser.add_argument("--tts", metavar="REPO_OR_DIR",
                        help="text-to-speech model (/api/tts_streaming): a Hugging Face "
                             "repository (e.g. kyutai/tts-1.6b-en_fr) or a local directory")
    parser.add_argument("--voice-repo", metavar="REPO_OR_DIR", default=DEFAULT_VOICE_REPO,
                        help="where the TTS voices are looked up by name: a Hugging Face "
                             f"repository or a local directory (default: {DEFAULT_VOICE_REPO})")
    parser.add_argument("--voice", default=DEFAULT_VOICE, metavar="NAME",
                        help=f"the voice of TTS clients that name none (default: {DEFAULT_VOICE})")
    parser.add_argument("--temp", type=float, default=0.6,
                        help="TTS sampling temperature (default: 0.6; 0: greedy)")
    parser.add_argument("--seed", type=int, default=299792458,
                        help="random seed of each TTS stream (default: %(default)s): the same "
                        "seed, text and voice give the same speech, alone or beside others")
    parser.add_argument("--host", default="localhost",
                        help="address to listen on (default: localhost; 0.0.0.0 lets other "
                             "machines use the models)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any)")
    parser.add_argument("--api-key", action="append", metavar="TOKEN",
                        help=f"a key clients must give (header kyutai-api-key or ?auth_id=); "
                             f"repeatable (default: {DEFAULT_API_KEY})")
    parser.add_argument("--batch-size", type=cli.positive_int, default=4, metavar="N",
                        help="streams served at once by each service, in one batched step "
                             "(default: 4); each takes a Mimi process (about 0.4 GB), and each "
                             "service one more, loaded for the next stream")
    parser.add_argument("--asr-delay-in-tokens", type=cli.positive_int, metavar="N",
                        help="the STT model's text delay in 80 ms steps, as Kyutai's server "
                             "config's asr_delay_in_tokens: word times are steps minus it, a "
                             "Marker comes back that many steps after the audio before it "
                             "(default: Kyutai's configs' value: 6 for stt-1b-en_fr, 32 for "
                             "stt-2.6b-en)")
    parser.add_argument("--ignore-memory", action="store_true",
                        help="load even when the model does not fit the memory available")
    args = parser.parse_args(argv)
    if args.stt is None and args.tts is None:
        parser.error("give --stt and/or --tts: the service(s) to serve")
    if not (math.isfinite(args.temp) and args.temp >= 0):
        parser.error("--temp must be a number >= 0")
    args.api_key = frozenset(args.api_key or [DEFAULT_API_KEY])
    return args


async def start_service(name: str, load, service_of):
    """Loads a service's engine on a model thread of its own and starts its loop ->
    (engine, its loop's future, the web service)."""
    model_thread = ModelThread(f"{name}-model")
    engine = await asyncio.wrap_future(model_thread.submit(load))
    running = asyncio.wrap_future(model_thread.submit(engine.run))
    return engine, running, service_of(engine)


async def serve(args: argparse.Namespace, stt: model_files.ModelFiles | None,
                tts: model_files.ModelFiles | None) -> None:
    """Loads the models, then serves until cancelled (Ctrl-C, SIGTERM: `cli.run_server`): the
    streams are closed, the model loops stopped, Mimi's processes ended."""
    if not is_loopback(args.host):
        log.warning("warning: listening on %s: other machines can use the models (with an api "
                    "key)", args.host)
    memory = model_files.MemoryOptions(ignore_memory=args.ignore_memory, streams=args.batch_size,
                                       spare_mimis=1)
    started = []
    try:
        if stt is not None:
            log.info("loading the speech-to-text model (%d streams)", args.batch_size)
            started.append(await start_service(
                "stt", speech_services.transcriber_loader(stt, args.batch_size, memory,
                                                          args.asr_delay_in_tokens),
                lambda t: AsrService(t, args.api_key)))
        if tts is not None:
            log.info("loading the text-to-speech model (%d streams)", args.batch_size)
            started.append(await start_service(
                "tts", speech_services.synthesizer_loader(
                    tts, args.batch_size, args.voice_repo, args.voice, tts_samplers(args.temp),
                    TtsOptions(n_q=TTS_CODEBOOKS, max_break_seconds=MAX_BREAK_SECONDS),
                    args.seed, memory),
                lambda s: TtsService(s, args.api_key)))
        await run_site(args, [service for _, _, service in started])
    finally:
        for engine, running, _ in started:
            engine.stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(running, STOP_SECONDS)
            engine.close_all()


async def run_site(args: argparse.Namespace, services: list) -> None:
    """Serves the services' routes until cancelled; their websockets are closed at the end."""
    runner = web.AppRunner(speech_app([s.service() for s in services]), access_log=None,
                           handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
        try:
            await site.start()
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise SetupError(f"cannot listen on {args.host}:{args.port} ({reason}).") from None
        host, port = runner.addresses[0][:2]
        for service in services:
            log.info("serving ws://%s:%d%s (Ctrl-C stops)",
                     "localhost" if is_loopback(args.host) else host, port,
                     service.service().path)
        await asyncio.Event().wait()
    finally:
        for service in services:
            for ws in list(service.sockets):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")
        await runner.cleanup()


def prepare(args: argparse.Namespace) -> Coroutine:
    """The checks and files before loading: the server's coroutine."""
    stt = tts = None
    if args.stt is not None:
        stt = model_files.resolve_repo(args.stt)
        # the family, checked before loading
        speech_services.transcriber_loader(stt, args.batch_size)
    if args.tts is not None:
        tts = model_files.resolve_repo(args.tts)
        speech_services.check_tts(tts, args.voice_repo, args.voice)
    return serve(args, stt, tts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_server(lambda: prepare(args), user_errors=(SetupError,))


def entry() -> None:
    """The command's entry point (`python -m moshi_mlx.serve`)."""
    cli.exit_app(main())


if __name__ == "__main__":
    entry()
