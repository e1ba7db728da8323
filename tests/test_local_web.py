"""`python -m moshi_mlx.local_web --demo` as Kyutai's clients see it: a server process on
127.0.0.1, and clients that speak what `python -m moshi.client` speaks (binary messages whose
first byte is their kind, Ogg-Opus audio from sphn sent at real-time pace, text printed)."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
from chat_client import (
    RATE,
    Reply,
    ServerProcess,
    converse,
    handshake_or_error,
    receive_all,
    send_speech,
)
from conftest import require_tool

from moshi_mlx import local_web
from moshi_mlx.audio.wav import read_wav

pytestmark = pytest.mark.slow  # the app's server in subprocesses


@pytest.fixture(scope="module")
def server(demo_cache):
    env = {**os.environ, "XDG_CACHE_HOME": str(demo_cache)}
    # A long --max-lag: no input is dropped even on a loaded machine, so answers are repeatable.
    server = ServerProcess("--seed", "1234", "--max-lag", "30", env=env)
    yield server
    server.stop()
    assert server.proc.returncode in (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def speech(speech_24k) -> np.ndarray:
    return read_wav(speech_24k, RATE)


def test_each_connection_is_a_fresh_conversation(server, speech):
    first = asyncio.run(converse(server.url, speech))
    assert first.first == b"\x00\x00\x00"  # handshake: protocol version 0, model 0
    assert first.errors == []
    assert first.text, "no text from Moshi"
    voice = first.voice
    assert len(voice) > RATE, "less than a second of Moshi's voice"
    assert np.isfinite(voice).all() and np.abs(voice).max() > 0
    second = asyncio.run(converse(server.url, speech))
    assert second.text == first.text
    np.testing.assert_array_equal(second.voice, voice)
    server.wait_for(r"conversation ended: \d+ frames received, \d+ processed, 0 dropped; "
                    r"latency text \d+/\d+ ms")


CHILD_CLIENT = """
import asyncio, sys
import aiohttp, numpy as np, sphn

async def talk(ws):
    writer = sphn.OpusStreamWriter(24000)
    tone = (0.1 * np.sin(2 * np.pi * 220 * np.arange(1920) / 24000)).astype(np.float32)
    while True:
        data = writer.append_pcm(tone)
        if data:
            await ws.send_bytes(b"\\x01" + data)
        await asyncio.sleep(0.08)

async def main(url):
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        assert (await ws.receive()).data[:1] == b"\\x00"
        talking = asyncio.create_task(talk(ws))
        async for msg in ws:
            if msg.data[:1] == b"\\x02":
                print("heard", flush=True)

asyncio.run(main(sys.argv[1]))
"""


def test_a_killed_client_does_not_block_the_next(server):
    child = subprocess.Popen([sys.executable, "-c", CHILD_CLIENT, f"ws://{server.url}/api/chat"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "heard\n"  # mid-conversation: Moshi answers it
        assert asyncio.run(handshake_or_error(server.url)).startswith(b"\x05busy")
    finally:
        child.kill()
        child.wait()
    killed = time.monotonic()
    while True:
        first = asyncio.run(handshake_or_error(server.url))
        if not first.startswith(b"\x05busy"):
            break
        assert time.monotonic() - killed < 30, "the killed client still holds the model"
        time.sleep(0.05)
    print(f"model free {time.monotonic() - killed:.2f} s after the client was killed")
    assert first == b"\x00\x00\x00"


# Kyutai's `python -m moshi.client` as is, but its microphone opens 3 s after the stream starts
# (as when a person grants it late): the input stream's first blocks are withheld for 3 s.
LATE_MICROPHONE_CLIENT = """
import sys, time
import sounddevice
from moshi import client

class LateMicrophone(sounddevice.InputStream):
    def __init__(self, *args, callback, **kwargs):
        self.opens = float("inf")

        def late(*block):
            if time.monotonic() >= self.opens:
                callback(*block)

        super().__init__(*args, callback=late, **kwargs)

    def start(self):
        self.opens = time.monotonic() + 3.0
        super().start()

client.sd.InputStream = LateMicrophone
sys.argv = ["moshi.client", "--host", sys.argv[1], "--port", sys.argv[2]]
client.main()
"""


def test_kyutais_client_whose_microphone_opens_3_s_late_has_a_whole_conversation(
        server, pulse, speech_24k, tmp_path):
    """`python -m moshi.client` (moshi 0.2.13) on virtual devices: its first audio comes more
    than 3 s after the handshake; the conversation goes on, Moshi's text is printed and its
    voice played."""
    paplay = require_tool("paplay", "pulseaudio-utils")
    parecord = require_tool("parecord", "pulseaudio-utils")
    pulse_env = dict(os.environ, **pulse)
    client_env = dict(pulse_env, PULSE_SOURCE="mic.monitor", PULSE_SINK="spk")
    start = len(server.lines)
    heard = subprocess.Popen([parecord, "--raw", "--device=spk.monitor", "--rate=24000",
                              "--channels=1", "--format=s16le", tmp_path / "heard.raw"],
                             env=pulse_env)
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        client = subprocess.Popen([sys.executable, "-c", LATE_MICROPHONE_CLIENT, server.host,
                                   str(server.port)], env=client_env, stdout=out, stderr=err)
        try:
            time.sleep(4)  # the microphone is open by now
            for _ in range(2):  # about 6 s of speech, then Moshi may answer
                subprocess.run([paplay, "--device=mic", speech_24k], env=pulse_env, check=True,
                               timeout=60)
            time.sleep(3)
            still_running = client.poll() is None
            log = (tmp_path / "err.txt").read_text()  # before Ctrl-C, which it reports too
        finally:
            client.send_signal(signal.SIGINT)
            client.wait(timeout=30)
            heard.send_signal(signal.SIGINT)
            heard.wait(timeout=30)
    text = (tmp_path / "out.txt").read_text()
    assert still_running and "Lost connection" not in log and "Connection closed" not in log, log
    assert text.strip(), "no text from Moshi"
    ended = server.wait_for(r"conversation ended: (\d+) frames received, (\d+) processed",
                            start=start)
    # Seconds of its audio came and were answered (how many Moshi heard before Ctrl-C depends on
    # how fast this machine is).
    assert int(ended.group(1)) >= 24 and int(ended.group(2)) >= 12, ended.group(0)
    assert not any("answered no ping" in line for line in server.log_since(start))
    played = np.fromfile(tmp_path / "heard.raw", "<i2") / 32768
    assert np.sqrt(np.mean(np.square(played))) > 1e-3, "Moshi's voice was not played"


async def busy_while_talking(url: str, pcm: np.ndarray) -> tuple[Reply, Reply]:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://{url}/api/chat") as talking:
            assert (await talking.receive(timeout=60)).data == b"\x00\x00\x00"
            async with http.ws_connect(f"ws://{url}/api/chat") as other:
                refused = await receive_all(other, Reply((await other.receive(timeout=60)).data))
            sending = asyncio.create_task(send_speech(talking, pcm))
            answer = await receive_all(talking, Reply(b""), sending)
            return refused, answer


def test_a_second_client_is_told_busy(server, speech):
    refused, answer = asyncio.run(busy_while_talking(server.url, speech[: RATE]))
    assert refused.first.startswith(b"\x05busy: ")
    assert refused.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER
    assert answer.text and answer.audio and answer.errors == []


async def send_then_receive(url: str, messages: list, pcm: np.ndarray | None = None) -> Reply:
    """Sends `messages` (bytes: binary, str: text) after the handshake, then speech."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://{url}/api/chat", max_msg_size=0) as ws:
            reply = Reply((await ws.receive(timeout=60)).data)
            for m in messages:
                await (ws.send_str(m) if isinstance(m, str) else ws.send_bytes(m))
            sending = None if pcm is None else asyncio.create_task(send_speech(ws, pcm))
            await receive_all(ws, reply, sending)
            return reply


def test_malformed_messages_are_survived(server, speech):
    junk = ["hello", b"", b"\x09what", b"\x03\x00", b"\x06", b"\x02text from a client"]
    reply = asyncio.run(send_then_receive(server.url, junk, speech[: RATE]))
    assert reply.first == b"\x00\x00\x00"
    assert reply.text and reply.audio and reply.errors == []  # ignored, the conversation goes on
    for what in ("a text message", "an empty message", "unknown kind 9", "a control message",
                 "a ping message", "unknown kind 2"):
        server.wait_for(f"ignored: .*{what}")

    garbage = asyncio.run(send_then_receive(server.url, [b"\x01" + b"garbage" * 100]))
    assert garbage.errors and garbage.errors[0].startswith("bad audio: not an Ogg-Opus stream")
    assert garbage.close_code == aiohttp.WSCloseCode.UNSUPPORTED_DATA

    oversized = asyncio.run(send_then_receive(server.url, [b"\x01" + bytes(300_000)]))
    assert oversized.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

    bad_query = asyncio.run(converse(server.url, speech, "?text_temperature=hot"))
    assert bad_query.first.startswith(b"\x05bad request: text_temperature='hot'")

    after = asyncio.run(converse(server.url, speech[: RATE]))
    assert after.first == b"\x00\x00\x00" and after.text and after.audio
    assert server.proc.poll() is None


def self_signed_certificate(directory) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("this test needs openssl: apt-get install openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", directory / "key.pem",
                    "-out", directory / "cert.pem"], check=True, capture_output=True)


def test_https_with_ssl(demo_cache, speech, tmp_path):
    self_signed_certificate(tmp_path)
    server = ServerProcess("--ssl", str(tmp_path),
                           env={**os.environ, "XDG_CACHE_HOME": str(demo_cache)})
    try:
        reply = asyncio.run(converse(server.url, speech[:RATE], scheme="wss"))
        assert reply.first == b"\x00\x00\x00" and reply.text and reply.audio
        with pytest.raises(aiohttp.ClientError):
            asyncio.run(converse(server.url, speech[:RATE]))  # plain ws: refused
    finally:
        server.stop()


def test_bad_server_settings_are_one_error_line(tmp_path, demo_env, capsys):
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, message in [
            (["--static", str(tmp_path)], f"{tmp_path}: --static needs a directory with an "
                                          "index.html."),
            (["--ssl", str(tmp_path / "nowhere")], "cert.pem: no such file (--ssl needs"),
            (["--ssl", str(tmp_path)], "cannot use cert.pem and key.pem"),
            (["--port", str(port)], f"cannot listen on 127.0.0.1:{port} (Address already in use)"),
        ]:
            code = local_web.main(["--demo", "--host", "127.0.0.1", "--no-browser", *flags])
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert code == 1 and len(errors) == 1 and message in errors[0], err


def test_server_setting_helpers():
    assert local_web.static_dir(None) == local_web.STATIC_DIR
    assert (local_web.STATIC_DIR / "index.html").is_file()
    assert local_web.static_dir("none") is None
    assert local_web.ssl_context(None) is None
    assert local_web.page_url("0.0.0.0", 8998, False) == "http://localhost:8998/"
    assert local_web.page_url("::1", 8998, True) == "https://[::1]:8998/"
    assert local_web.page_url("localhost", 1234, False) == "http://localhost:1234/"
    assert local_web.parse_args(["--idle-timeout", "90"]).idle_timeout == 90
    for flags in (["--max-lag", "0"], ["--idle-timeout", "-1"], ["--idle-timeout", "inf"]):
        with pytest.raises(SystemExit):
            local_web.parse_args(flags)
    with pytest.raises(SystemExit):
        local_web.parse_args(["--text-top-k", "-3"])


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nNoColonHere\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET http://[::1 HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # TLS to the http port
]


def test_malformed_http_is_one_log_line(demo_cache):
    """The browser app's server: each malformed request gets a 400 and at most one log line."""
    server = ServerProcess(env={**os.environ, "XDG_CACHE_HOME": str(demo_cache)})
    try:
        host, port = server.url.rsplit(":", 1)
        before = len(server.lines)
        for raw in MALFORMED:
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(raw)
                assert s.recv(100).startswith(b"HTTP/1.0 400 Bad Request"), raw[:40]
        time.sleep(0.5)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 404")  # still serving
    finally:
        server.stop()
    log = server.lines[before:]
    assert "Traceback" not in "\n".join(log), "\n".join(log)
    errors = [line for line in log if line.startswith("Error handling request from")]
    assert len(errors) == len(MALFORMED) - 2, "\n".join(log)  # aiohttp skips bad methods
    assert all(len(line) < 250 for line in errors)
    assert any("Invalid character in Content-Length" in line for line in errors), errors
