"""What hostile or unlucky clients do to the browser app's server, and what it costs the server:

    python -m benchmarks.probe_server [--conversations 100] [--disconnects 100]

Starts `python -m moshi_mlx.local_web --demo --seed 1234` servers (the demo model is built once
in the cache directory), runs the probes of `tests/server_probes.py` on them and prints what the
clients saw and the server process's memory, threads and open files (Linux /proc) as Markdown.
`tests/test_server_probes.py` runs the same probes and asserts on what they return.
"""

import argparse
import asyncio

from chat_client import Reply, process_figures
from server_probes import (
    BAD_QUERIES,
    BROKEN_FRAMES,
    DISCONNECTS,
    EDGE_QUERIES,
    REFERENCE_FRAMES,
    abrupt_disconnect,
    figures_table,
    fresh_server,
    fuzz_plans,
    gone_client,
    live_pause,
    memory_probe,
    query_probe,
    reference_conversation,
    run_broken_frame,
    run_plan,
    same_conversation,
    settled_figures,
    waits_line,
)


def fuzz_report(reference: Reply) -> list[str]:
    with fresh_server() as server:
        start = process_figures(server.proc.pid)
        outcomes = [asyncio.run(run_plan(server.url, p)) for p in fuzz_plans()]
        outcomes += [asyncio.run(run_broken_frame(server.host, server.port, w, d))
                     for w, d in BROKEN_FRAMES]
        queries = [q for q, *_ in BAD_QUERIES] + EDGE_QUERIES
        outcomes += [asyncio.run(query_probe(server.url, q)) for q in queries]
        after = asyncio.run(reference_conversation(server.url))
        end = settled_figures(server.proc.pid, start)
        internal = sum(any(e.startswith("internal error") for e in o.reply.errors)
                       for o in outcomes)
        tracebacks = sum("Traceback" in line for line in server.lines)
    return [f"fuzz: {sum(o.sent for o in outcomes)} malformed messages and {len(queries)} bad "
            f"queries over {len(outcomes)} connections; {internal} ended in 'internal error'; "
            f"{tracebacks} tracebacks in the log; the next conversation equals a fresh "
            f"server's: {same_conversation(after, reference)}",
            waits_line("fuzz connections", [o.waited for o in outcomes]),
            figures_table([("before the fuzz", start), ("after it", end)])]


def disconnects_report(reference: Reply, count: int) -> list[str]:
    with fresh_server() as server:
        start = process_figures(server.proc.pid)
        waits = [asyncio.run(abrupt_disconnect(server.host, server.port,
                                               DISCONNECTS[i % len(DISCONNECTS)]))
                 for i in range(count)]
        after = asyncio.run(reference_conversation(server.url))
        end = settled_figures(server.proc.pid, start)
        tracebacks = sum("Traceback" in line for line in server.lines)
    return [waits_line(f"after {count} abrupt disconnects", [w for w in waits if w is not None])
            + f"; {tracebacks} tracebacks in the log; the next conversation equals a fresh "
            f"server's: {same_conversation(after, reference)}",
            figures_table([("before the disconnects", start), ("after them", end)])]


def silence_report() -> list[str]:
    with fresh_server() as server:
        gone = asyncio.run(gone_client(server.host, server.port, frames=12))
        paused, answered_after = asyncio.run(live_pause(server.url, 10.0))
    freed = ("not within the busy timeout" if gone.freed_after is None else
             f"{gone.freed_after:.2f} s after its last pong")
    return [f"a client gone after 1 s of audio (no reading, no pong, socket open): the model "
            f"was free {freed}; a client 0.5 s after it went got {gone.busy_meanwhile[:24]!r}",
            f"a live client silent for 10 s mid-conversation: closed: "
            f"{paused.close_code is not None}; answered after the pause: {answered_after}"]


def memory_report(conversations: int) -> list[str]:
    with fresh_server() as server:
        run = memory_probe(server, conversations)
    return [waits_line(f"{conversations} short conversations", run.waits),
            figures_table([("ready, no conversation yet", run.start),
                           ("after the first conversation", run.first),
                           (f"after {conversations}", run.last)])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe_server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=100,
                        help="short conversations of the memory probe (default: 100)")
    parser.add_argument("--disconnects", type=int, default=100,
                        help="abrupt disconnects (default: 100)")
    args = parser.parse_args(argv)
    with fresh_server() as server:
        reference = asyncio.run(reference_conversation(server.url))
    print(f"reference conversation: {REFERENCE_FRAMES} frames in, {len(reference.text)} "
          f"text pieces and {len(reference.audio)} audio messages out", flush=True)
    for report in (lambda: fuzz_report(reference),
                   lambda: disconnects_report(reference, args.disconnects),
                   silence_report, lambda: memory_report(args.conversations)):
        print("\n" + "\n\n".join(report()), flush=True)


if __name__ == "__main__":
    main()
