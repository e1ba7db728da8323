"""The browser app's server (`python -m moshi_mlx.local_web --demo`) against hostile and unlucky
clients, from outside only (the websocket at /api/chat, its URL query, HTTP): a fuzz of malformed
messages and bad queries, abrupt disconnects, simultaneous clients, a client gone without a
close, a pause, many conversations, forged Origin headers and malformed HTTP. After each, the
server must still hold a conversation equal to one on a freshly started server (same seed, same
input).

Each test collects every problem it sees and reports them all at once. The probes themselves
are in `server_probes.py` (`python -m benchmarks.probe_server` prints their figures).
"""

import asyncio
import mmap
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from chat_client import ServerProcess, handshake_or_error, process_figures
from server_probes import (
    BAD_QUERIES,
    BROKEN_FRAMES,
    DISCONNECTS,
    EDGE_QUERIES,
    MALFORMED_HTTP,
    REFERENCE_VOICE_BYTES,
    Outcome,
    abrupt_disconnect,
    figures_table,
    fresh_server,
    fuzz_plans,
    gone_client,
    http_probe,
    live_pause,
    memory_probe,
    origin_probe,
    query_probe,
    reference_conversation,
    run_broken_frame,
    run_plan,
    same_conversation,
    simultaneous,
    waits_line,
)

pytestmark = pytest.mark.slow  # about eight servers; `make test-probes`

HANDSHAKE = b"\x00\x00\x00"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_process_figures_of_this_process():
    before = process_figures(os.getpid())
    with mmap.mmap(-1, 200 * 2**20) as ballast:  # fresh pages, resident once written
        np.frombuffer(ballast, np.uint8)[::4096] = 1
        with open(__file__):
            during = process_figures(os.getpid())
    assert during.rss_mb - before.rss_mb > 150
    assert during.fds == before.fds + 1
    started = threading.Event()
    thread = threading.Thread(target=started.wait)
    thread.start()
    assert process_figures(os.getpid()).threads == before.threads + 1
    started.set()
    thread.join()


@pytest.fixture(scope="module")
def env(demo_cache) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(demo_cache)}


@pytest.fixture(scope="module")
def reference(env):
    """The well-formed conversation on a freshly started server: the one every server must
    still hold after the probes."""
    with fresh_server(env) as server:
        reply = asyncio.run(reference_conversation(server.url))
    assert reply.first == HANDSHAKE and reply.errors == []
    assert reply.text and sum(map(len, reply.audio)) == REFERENCE_VOICE_BYTES, reply
    return reply


@pytest.fixture
def server(env):
    with fresh_server(env) as server:
        yield server
        assert server.proc.poll() is None, "the server died:\n" + "\n".join(server.lines[-30:])
    assert server.proc.returncode in (0, -signal.SIGTERM)


def conversation_problems(server: ServerProcess, reference) -> list[str]:
    """The well-formed conversation, now: what differs from the fresh server's."""
    after = asyncio.run(reference_conversation(server.url))
    if same_conversation(after, reference):
        return []
    return [f"the well-formed conversation differs from a fresh server's: first message "
            f"{after.first!r}, errors {after.errors}, {len(after.text)} text pieces (fresh: "
            f"{len(reference.text)}), {len(after.audio)} audio messages (fresh: "
            f"{len(reference.audio)}), same text: {after.text == reference.text}"]


def traceback_problems(server: ServerProcess) -> list[str]:
    lines = server.log_since(0)
    count = sum("Traceback" in line for line in lines)
    if not count:
        return []
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
    return [f"{count} tracebacks in the server's log, e.g. {errors[:3]}"]


def close_problems(outcome: Outcome) -> list[str]:
    """What is wrong in how a connection was ended: 'internal error', a close without reason."""
    reply, problems = outcome.reply, []
    if any(e.startswith("internal error") for e in reply.errors):
        problems.append(f"{outcome.what}: 'internal error' ({reply.errors})")
    if reply.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR:
        problems.append(f"{outcome.what}: closed with code 1011 (internal error)")
    if reply.close_code is not None and not reply.close_reason:
        problems.append(f"{outcome.what}: closed (code {reply.close_code}) with an empty reason")
    return problems


def refusal_problems(outcome: Outcome, parameter: str, bounds: list[str],
                     upper: int | None = None) -> list[str]:
    """A refused query must get a 0x05 message naming `parameter` and its range (the numbers
    `bounds` must appear in it, and with `upper` some number from 1 to `upper`), then a close
    with a reason."""
    reply = outcome.reply
    if not reply.first.startswith(b"\x05"):
        return [f"{outcome.what}: not refused (first message {reply.first[:40]!r}, errors "
                f"{reply.errors})"]
    text = reply.errors[0]
    problems = close_problems(outcome)
    numbers = re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", text)
    in_range = upper is None or any(1 <= float(n) <= upper for n in numbers)
    if parameter not in text or not all(b in numbers for b in bounds) or not in_range:
        problems.append(f"{outcome.what}: the error {text!r} does not name {parameter} and its "
                        f"range")
    if reply.close_code is None:
        problems.append(f"{outcome.what}: refused but not closed")
    return problems


def fuzz_problems(outcomes: list[Outcome], plans) -> list[str]:
    problems = []
    for outcome, plan in zip(outcomes, plans):
        reply = outcome.reply
        if reply.first != HANDSHAKE:
            problems.append(f"{plan.what}: no handshake (first message {reply.first[:40]!r}, "
                            f"then {reply.other[:2]}, close {reply.close_code})")
            continue
        problems += close_problems(outcome)
        if plan.then_speak and not outcome.answered:
            problems.append(f"{plan.what}: good audio after them was not answered "
                            f"(closed: {reply.close_code} {reply.close_reason!r}, errors "
                            f"{reply.errors})")
        if plan.fatal and reply.close_code is None:
            problems.append(f"{plan.what}: the conversation was not ended")
        if plan.error_message and not reply.errors:
            problems.append(f"{plan.what}: ended without a 0x05 message saying why")
    return problems


def test_fuzz_and_bad_queries_then_the_same_conversation(server, reference):
    plans = fuzz_plans()
    outcomes = [asyncio.run(run_plan(server.url, p)) for p in plans]
    problems = fuzz_problems(outcomes, plans)

    broken = [asyncio.run(run_broken_frame(server.host, server.port, what, data))
              for what, data in BROKEN_FRAMES]
    for outcome in broken:
        if outcome.reply.first != HANDSHAKE:  # the frame may be refused, or tolerated
            problems.append(f"{outcome.what}: no handshake ({outcome.reply.first[:40]!r})")
        problems += close_problems(outcome)

    queries = []
    for query, parameter, bounds in BAD_QUERIES:
        queries.append(asyncio.run(query_probe(server.url, query)))
        problems += refusal_problems(queries[-1], parameter, bounds)
    for query in EDGE_QUERIES:  # a valid value: a conversation, or refused with the range
        outcome = asyncio.run(query_probe(server.url, query))
        queries.append(outcome)
        parameter, bound = query[1:].split("=")
        if outcome.reply.first == HANDSHAKE:
            if not outcome.answered or outcome.reply.errors:
                problems.append(f"{query}: accepted, but the conversation failed (errors "
                                f"{outcome.reply.errors}, close {outcome.reply.close_code} "
                                f"{outcome.reply.close_reason!r})")
        else:
            problems += refusal_problems(outcome, parameter, ["0"], upper=int(bound))

    problems += traceback_problems(server)
    problems += conversation_problems(server, reference)
    sent = sum(o.sent for o in outcomes + broken)
    connections = len(outcomes) + len(broken) + len(queries)
    print(f"\nfuzz: {sent} malformed messages and {len(queries)} bad queries over {connections} "
          f"connections; {len(problems)} problems")
    print(waits_line("fuzz connections", [o.waited for o in outcomes + broken + queries]))
    assert sent >= 1000
    assert not problems, "\n".join(problems)


def test_abrupt_disconnects_then_the_same_conversation(server, reference):
    waits, problems = [], []
    for i in range(100):
        when = DISCONNECTS[i % len(DISCONNECTS)]
        waited = asyncio.run(abrupt_disconnect(server.host, server.port, when))
        if DISCONNECTS.index(when) >= DISCONNECTS.index("right after the handshake"):
            if waited is None:
                problems.append(f"disconnect {i} ({when}): no handshake within the busy timeout")
            else:
                waits.append(waited)
    problems += traceback_problems(server)
    problems += conversation_problems(server, reference)
    print("\n" + waits_line("after abrupt disconnects", waits))
    assert not problems, "\n".join(problems)


def test_simultaneous_clients_one_converses(server, reference):
    replies = asyncio.run(simultaneous(server.url, 5))
    talking = [r for r in replies if r.first == HANDSHAKE]
    refused = [r for r in replies if r.first != HANDSHAKE]
    assert len(talking) == 1, [r.first for r in replies]
    assert same_conversation(talking[0], reference)  # the others did not disturb it
    for reply in refused:
        assert reply.first.startswith(b"\x05busy"), reply.first
        assert reply.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER and reply.close_reason
    assert conversation_problems(server, reference) == []


def test_a_client_gone_without_a_close_frees_the_model_and_a_pause_does_not(server):
    """A client that stops reading and answering pings (its socket open) loses the model 2 s
    after its last pong; one that reads but sends no audio for 10 s keeps its conversation."""
    problems, figures = [], []
    for frames in (12, 0):  # gone after a second of audio; gone from the start
        gone = asyncio.run(gone_client(server.host, server.port, frames))
        what = f"a client gone after {frames} frames"
        freed = "never" if gone.freed_after is None else f"{gone.freed_after:.2f} s"
        figures.append(f"{what}: the model was free {freed} after its last pong")
        if gone.first != HANDSHAKE:
            problems.append(f"{what}: no handshake ({gone.first[:40]!r})")
        if not gone.busy_meanwhile.startswith(b"\x05busy"):
            problems.append(f"{what}: a client 0.5 s after it went got "
                            f"{gone.busy_meanwhile[:60]!r}, not busy")
        if gone.freed_after is None or not 2.0 <= gone.freed_after < 5.0:
            problems.append(f"{what}: the model was free {freed} after its last pong, not "
                            f"2 s (plus the clean-up)")
    server.wait_for(r"answered no ping for 2\.\d s \(gone\)")
    problems += traceback_problems(server)
    paused, answered_after = asyncio.run(live_pause(server.url, 10.0))
    if paused.close_code is not None or not answered_after:
        problems.append(f"a client silent for 10 s: closed {paused.close_code} "
                        f"{paused.close_reason!r}, answered after the pause: {answered_after}")
    print("\n" + "\n".join(figures))
    assert not problems, "\n".join(problems)


async def handshake_when_free(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (await handshake_or_error(url)).startswith(HANDSHAKE):
        assert time.monotonic() < deadline, "the model stays busy"
        await asyncio.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="reads the server's memory, threads and fds from Linux's /proc")
def test_memory_threads_and_fds_flat_over_100_conversations(server):
    run = memory_probe(server, 100)
    print("\n" + waits_line("100 short conversations", run.waits))
    print(figures_table([("ready, no conversation yet", run.start),
                         ("after the first conversation", run.first),
                         ("after 100", run.last)]))
    problems = []
    if run.last.rss_mb - run.first.rss_mb > 50:
        problems.append(f"RSS grew by {run.last.rss_mb - run.first.rss_mb:.0f} MB from the first "
                        f"conversation to the 100th ({run.first.rss_mb:.0f} -> "
                        f"{run.last.rss_mb:.0f} MB)")
    # The server's threads are the model's, the clean-up's and the loop's, made once, and each
    # conversation's stages, joined when it ends: once settled, never more than when idle before.
    if run.last.threads > run.idle.threads or run.last.fds > run.idle.fds:
        names = sorted(p.read_text().strip() for p in Path(f"/proc/{server.proc.pid}/task")
                       .glob("*/comm"))
        problems.append(f"threads {run.idle.threads} -> {run.last.threads} ({names}), open fds "
                        f"{run.idle.fds} -> {run.last.fds}")
    assert not problems, "\n".join(problems)


def test_forged_origins_are_refused(server):
    own, foreign = f"http://{server.url}", "http://evil.example"
    status, first = asyncio.run(origin_probe(server.host, server.port, [own]))
    assert (status, first) == (101, HANDSHAKE)
    asyncio.run(handshake_when_free(server.url))
    problems = []
    for origins in ([foreign], [own, foreign], [foreign, own], [own, own]):
        status, first = asyncio.run(origin_probe(server.host, server.port, origins))
        if not 400 <= status < 500:
            problems.append(f"Origin headers {origins}: answered {status} {first[:20]!r}")
        asyncio.run(handshake_when_free(server.url))
    assert not problems, "\n".join(problems)


def logged_until_marker(server: ServerProcess, start: int, marker: str) -> tuple[list[str], int]:
    """The server's log lines from line `start` up to the one that a websocket refused for its
    Origin `marker` makes (the server writes its lines in order, so every line it wrote before
    is in), and the index of the line after that one."""
    asyncio.run(origin_probe(server.host, server.port, [marker]))
    server.wait_for(re.escape(f"origin {marker} "), timeout=30, start=start)
    lines = server.log_since(start)
    end = next(k for k, line in enumerate(lines) if f"origin {marker} " in line)
    return lines[:end], start + end + 1


def test_malformed_http_is_one_log_line(server):
    """Each request's lines are counted once the server has logged something after it, and every
    line from the first request on is counted for one of them."""
    problems = []
    start = len(server.lines)
    for k, (what, data) in enumerate(MALFORMED_HTTP.items()):
        status = asyncio.run(http_probe(server.host, server.port, data))
        lines, start = logged_until_marker(server, start, f"http://marker-{k}.example")
        if not 400 <= status < 500:
            problems.append(f"{what}: answered {status}, not a 4xx")
        if len(lines) > 1 or any("Traceback" in line for line in lines):
            problems.append(f"{what}: {len(lines)} log lines: {lines[:3]}")
    late, _ = logged_until_marker(server, start, "http://marker-last.example")
    if late:
        problems.append(f"{len(late)} log lines after the last request: {late[:3]}")
    assert asyncio.run(handshake_or_error(server.url)) == HANDSHAKE
    assert not problems, "\n".join(problems)
