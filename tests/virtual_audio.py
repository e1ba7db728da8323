"""Real audio devices on a machine without a sound card, for the terminal app's device tests: a
private PulseAudio daemon whose null sinks (24 kHz mono) are the virtual devices, reached through
ALSA's pulse plugin (see shared/notes/headless-audio.md); and the app run in a subprocess while
the test plays the user's part. Needs the Debian packages libportaudio2 alsa-utils
libasound2-plugins pulseaudio pulseaudio-utils: where a tool is missing the tests are skipped
with the reason, and fail when CI=true."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import require_tool

# mic: the test speaks into it; spk: the app plays into it; room: both, the app hearing itself.
VIRTUAL_DEVICES = """\
load-module module-native-protocol-unix
load-module module-null-sink sink_name=mic rate=24000 channels=1 \
sink_properties=device.description=VirtualMic
load-module module-null-sink sink_name=spk rate=24000 channels=1 \
sink_properties=device.description=VirtualSpeaker
load-module module-null-sink sink_name=room rate=24000 channels=1 \
sink_properties=device.description=Room
set-default-sink spk
set-default-source mic.monitor
"""


def start_pulse(d: Path) -> dict:
    """Starts a PulseAudio daemon with VIRTUAL_DEVICES, its files in `d`; -> the environment
    variables of its clients."""
    for name in ("pulseaudio", "pactl"):
        require_tool(name, "pulseaudio pulseaudio-utils")
    env = {"HOME": str(d / "home"), "XDG_RUNTIME_DIR": str(d / "run"),
           "PULSE_SERVER": f"unix:{d}/run/pulse/native"}
    (d / "home").mkdir()
    (d / "run").mkdir(mode=0o700)
    (d / "virtual.pa").write_text(VIRTUAL_DEVICES)
    full_env = dict(os.environ, **env)
    subprocess.run(["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "-n", "-F",
                    d / "virtual.pa", f"--log-target=file:{d}/pulse.log"],
                   env=full_env, check=True, timeout=30, capture_output=True)
    deadline = time.monotonic() + 10
    while subprocess.run(["pactl", "info"], env=full_env, capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, (d / "pulse.log").read_text()
        time.sleep(0.05)
    return env


def stop_pulse(env: dict) -> None:
    subprocess.run(["pulseaudio", "-k"], env=dict(os.environ, **env), timeout=30)


def local(*args, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moshi_mlx.local", *map(str, args)],
                            env=env, text=True, **kwargs)


def lines_of(stream) -> queue.Queue:
    """Reads a text stream on a thread; its lines come through the queue, then None."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def talk_to_app(args: list, env: dict, user: Callable[[], None], stdout) -> tuple[int, str]:
    """Runs `python -m moshi_mlx.local *args`; once it listens, `user()` plays the user's part,
    then Ctrl-C ends the conversation. -> (exit code, what the app wrote on stderr)."""
    app = local(*args, env=env, stdout=stdout, stderr=subprocess.PIPE)
    stderr = lines_of(app.stderr)
    log = []
    try:
        while not any("listening" in line for line in log):  # model loaded, streams open
            line = stderr.get(timeout=120)
            assert line is not None, "".join(log)
            log.append(line)
        user()
        app.send_signal(signal.SIGINT)
        returncode = app.wait(timeout=60)
    finally:
        app.kill()
    while (line := stderr.get(timeout=30)) is not None:
        log.append(line)
    return returncode, "".join(log)
