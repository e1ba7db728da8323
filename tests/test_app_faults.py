"""Both apps as a user runs them, with real Mimi processes that hang (SIGSTOP) or die (SIGKILL)
mid-conversation, and Ctrl-C in each state: one clear message within Mimi's deadline, no
traceback from any process, no Mimi process left behind, and the next conversation works."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from chat_client import RATE, Reply, ServerProcess, converse, send_speech
from conftest import require_tool
from virtual_audio import lines_of, local

from moshi_mlx.audio.mimi_process import LIVE_REPLY_SECONDS
from moshi_mlx.audio.wav import read_wav

pytestmark = pytest.mark.slow  # the apps in subprocesses, with real Mimi processes

ROUTE_APP = {"PULSE_SOURCE": "mic.monitor", "PULSE_SINK": "spk"}
MESSAGE_SECONDS = LIVE_REPLY_SECONDS + 0.5  # the deadline, and a frame's worth of slack


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def mimi_pids(pid: int) -> list[int]:
    """The Mimi processes under process `pid`."""
    pids = []
    for child in descendants(pid):
        try:
            if b"mimi_process" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(child)
        except OSError:
            pass
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(autouse=True)
def linux_proc():
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux's /proc to find the Mimi processes")


@pytest.fixture(scope="module")
def speech(speech_24k) -> np.ndarray:
    return read_wav(speech_24k, RATE)


@pytest.fixture
def server(demo_cache):
    server = ServerProcess("--seed", "1234", env={**os.environ,
                                                  "XDG_CACHE_HOME": str(demo_cache)})
    yield server
    server.stop()


async def talk_until_error(url: str, pcm: np.ndarray, server_pid: int, sig: int) -> tuple:
    """A conversation (read all along, as a client does: pings are answered) whose Mimi process
    gets `sig` after 2 s: -> (what the server sent, seconds from the signal to the error message,
    the Mimi process's pid)."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://{url}/api/chat") as ws:
            reply = Reply((await ws.receive_bytes(timeout=60)))
            error_at = []

            async def read():
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        reply.take(msg.data)
                        if reply.errors and not error_at:
                            error_at.append(time.monotonic())
                reply.close_code = ws.close_code

            reading = asyncio.create_task(read())
            sending = asyncio.create_task(send_speech(ws, pcm))
            await asyncio.sleep(2.0)
            (pid,) = mimi_pids(server_pid)
            os.kill(pid, sig)
            signalled = time.monotonic()
            await asyncio.wait_for(reading, 30)
            sending.cancel()
            return reply, error_at[0] - signalled if error_at else None, pid


@pytest.mark.parametrize("sig, what", [(signal.SIGSTOP, "stopped answering"),
                                       (signal.SIGKILL, "killed by signal 9")])
def test_browser_a_mimi_that_hangs_or_dies_is_named_and_the_next_conversation_works(
        server, speech, sig, what):
    start = len(server.lines)
    reply, waited, pid = asyncio.run(talk_until_error(server.url, speech, server.proc.pid, sig))
    assert reply.text and reply.audio, "the conversation had started"
    assert len(reply.errors) == 1 and reply.errors[0].startswith("audio codec failed: ")
    assert what in reply.errors[0] and "new conversation" in reply.errors[0]
    assert reply.close_code == 1011
    assert waited is not None and waited < MESSAGE_SECONDS
    server.wait_for(rf"ended a conversation: .*{what}", start=start)
    time.sleep(0.2)  # the kill takes effect
    assert not alive(pid), "the hung Mimi process was left behind"
    again = asyncio.run(converse(server.url, speech[: 3 * RATE], busy_timeout=10))
    assert again.first[:1] == b"\x00" and again.text and again.audio and not again.errors
    log = "\n".join(server.log_since(start))
    assert "Traceback" not in log, log


def wait_lines(lines, log: list[str], pattern: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(re.search(pattern, line) for line in log):
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "".join(log)
        log.append(line)


def finish(app: subprocess.Popen, lines, log: list[str]) -> str:
    while (line := lines.get(timeout=30)) is not None:
        log.append(line)
    return "".join(log)


@pytest.mark.parametrize("sig, what", [(signal.SIGSTOP, "stopped answering"),
                                       (signal.SIGKILL, "killed by signal 9")])
def test_terminal_a_mimi_that_hangs_or_dies_ends_with_one_error_line(pulse, demo_env, sig, what):
    require_tool("paplay", "pulseaudio-utils")
    app = local("--demo", "--seed", 1, env=dict(demo_env, **pulse, **ROUTE_APP),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, log = lines_of(app.stderr), []
    try:
        wait_lines(lines, log, "listening")
        time.sleep(1.5)
        (pid,) = mimi_pids(app.pid)
        os.kill(pid, sig)
        signalled = time.monotonic()
        code = app.wait(timeout=30)
        waited = time.monotonic() - signalled
    finally:
        app.kill()
    out = finish(app, lines, log)
    assert code == 1, out
    assert len(re.findall(r"^error: ", out, re.M)) == 1 and what in out, out
    assert re.search(r"^conversation: .* \d+ frames received, \d+ processed", out, re.M), out
    assert "Traceback" not in out, out
    assert waited < MESSAGE_SECONDS + 1.0, out  # and the app's own stop
    assert not alive(pid)


CTRL_C_SECONDS = 2.0


def interrupt_and_check(app: subprocess.Popen, lines, log: list[str], code: int,
                        sig: int = signal.SIGINT, within: float = CTRL_C_SECONDS) -> None:
    """Ctrl-C (or `sig`): the app exits with `code` within `within` seconds, with no traceback
    from any of its processes and no Mimi process left behind."""
    mimis = mimi_pids(app.pid)
    try:
        app.send_signal(sig)
        start = time.monotonic()
        app.wait(timeout=30)
        seconds = time.monotonic() - start
    finally:
        app.kill()
    out = finish(app, lines, log)
    assert "Traceback" not in out and "Error" not in out, out
    assert app.returncode == code, out
    assert seconds < within, out
    time.sleep(0.5)  # a kill takes effect
    assert not any(alive(p) for p in mimis), "a Mimi process outlived the app"


def browser_app(demo_cache: Path, ready: str = "Moshi is ready") -> tuple:
    """`python -m moshi_mlx.local_web --demo` once its log says `ready`: (process, its log's
    lines as they come, the lines read so far)."""
    app = subprocess.Popen(
        [sys.executable, "-m", "moshi_mlx.local_web", "--demo", "--host", "127.0.0.1", "--port",
         "0", "--no-browser", "--static", "none"],
        env={**os.environ, "XDG_CACHE_HOME": str(demo_cache)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    lines, log = lines_of(app.stderr), []
    try:
        wait_lines(lines, log, ready)
    except BaseException:
        app.kill()
        raise
    return app, lines, log


@pytest.mark.parametrize("when", ["loading", "talking"])
def test_terminal_ctrl_c_in_each_state(pulse, demo_env, when):
    require_tool("paplay", "pulseaudio-utils")
    app = local("--demo", "--seed", 1, env=dict(demo_env, **pulse, **ROUTE_APP),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, log = lines_of(app.stderr), []
    try:
        wait_lines(lines, log, "seed|loading" if when == "loading" else "listening")
    except BaseException:
        app.kill()
        raise
    if when == "talking":
        time.sleep(2)
    interrupt_and_check(app, lines, log, 0 if when == "talking" else 130)


@pytest.mark.parametrize("when", ["loading", "talking", "after a conversation"])
def test_browser_ctrl_c_in_each_state(demo_cache, speech, when):
    app, lines, log = browser_app(demo_cache,
                                  "loading the model" if when == "loading" else "Moshi is ready")
    if when != "loading":
        url = re.search(r"Moshi is ready: https?://(\S+)/", "".join(log)).group(1)
        replies = []
        client = threading.Thread(
            target=lambda: replies.append(asyncio.run(converse(url, speech[: 4 * RATE]))),
            daemon=True)
        client.start()
        if when == "talking":
            time.sleep(2)
        else:
            client.join(60)
            assert not client.is_alive(), "the conversation did not end within 60 s"
            (reply,) = replies
            assert reply.first == b"\x00\x00\x00" and reply.errors == [], reply
            assert reply.audio, "Moshi said nothing"
    interrupt_and_check(app, lines, log, 0)


def test_browser_sigterm_ends_the_server_and_a_hung_mimi(demo_cache):
    """SIGTERM (a service manager's stop) takes Ctrl-C's way out: Mimi's processes are closed,
    also one that hangs (a stopped process would never read the end of its pipe)."""
    app, lines, log = browser_app(demo_cache)
    (mimi,) = mimi_pids(app.pid)
    os.kill(mimi, signal.SIGSTOP)
    # the hung process gets its second to exit, then is killed
    interrupt_and_check(app, lines, log, 0, signal.SIGTERM, CTRL_C_SECONDS + 1.0)
