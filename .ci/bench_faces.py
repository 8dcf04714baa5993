#!/usr/bin/env python3
"""First-token latency of the three APIs through llmhost, against one paced upstream.

Starts `.ci/bench_tools.py paced-server` (a chat-completions upstream whose 20 stream events
come PACE ms apart) and `llmhost.py serve` in front of it, then runs CONCURRENCY streaming
clients per API for DURATION seconds each: /v1/chat/completions, /v1/responses and
/v1/messages (the latter two translated onto the upstream's chat stream by llmhost). For each
stream it takes the time from sending the request to the first text delta (a chat chunk's
delta.content, response.output_text.delta, a content_block_delta with a text_delta), and
prints p50/p90/p99 per API, their difference from chat's, and errors. Standard library only.

The APIs take turns, in --rounds slots each (DURATION/ROUNDS s a slot, the percentiles over
all of an API's slots), so that each API meets the machine as the others do: on a shared VM a
10 s window of one API alone can meet a burst of other work the others do not.

--pin runs llmhost alone on CPU 1, and this client and the upstream on CPU 0 (Linux): then a
Responses stream's bigger events cost the client its own CPU, not llmhost's, as when clients
run elsewhere; without it, all three share the machine's cores.

Usage: python3 .ci/bench_faces.py [--concurrency 50] [--duration 10] [--rounds 5] [--pace-ms 10]
                                  [--pin]
Exit: 0 when every stream succeeded and both faces' p99 is within --budget-ms (2) of chat's.
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=15.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


BODIES = {
    "chat": ("/v1/chat/completions", {"model": "bench-paced", "stream": True, "max_tokens": 20,
                                      "messages": [{"role": "user", "content": "Say hello"}]}),
    "responses": ("/v1/responses", {"model": "bench-paced", "stream": True,
                                    "max_output_tokens": 20, "input": "Say hello"}),
    "messages": ("/v1/messages", {"model": "bench-paced", "stream": True, "max_tokens": 20,
                                  "messages": [{"role": "user", "content": "Say hello"}]}),
}


# A mark each API's text delta has in its bytes: an event without it is not parsed (the client
# runs on the same cores as llmhost; a Responses stream's first two events are whole Responses)
TEXT_MARK = {"chat": b'"content"', "responses": b'"response.output_text.delta"',
             "messages": b'"text_delta"'}


def first_text(api, data):
    """Whether this SSE data (one event's JSON) is the API's first text delta."""
    if TEXT_MARK[api] not in data:
        return False
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    if api == "chat":
        return any((c.get("delta") or {}).get("content") for c in doc.get("choices") or ())
    if api == "responses":
        return doc.get("type") == "response.output_text.delta"
    return doc.get("type") == "content_block_delta" and \
        (doc.get("delta") or {}).get("type") == "text_delta"


# The event that ends each API's stream, found in the bytes: once the first text is seen, the
# client reads no more JSON (its CPU is taken from the same cores llmhost runs on).
FINAL = {"chat": (b"data: [DONE]",), "responses": (b'"type":"response.completed"',
                                                  b'"type":"response.incomplete"'),
         "messages": (b'"type":"message_stop"',)}


def final(api, event):
    return any(mark in event for mark in FINAL[api])


async def one_stream(port, api, req):
    """-> (time to first text delta in s, None) or (None, what went wrong)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        t0 = time.perf_counter()
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None, head.split(b"\r\n", 1)[0].decode()
        buf, ttft, done = b"", None, False
        while not done:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size + 2))[:-2]
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if ttft is None:
                    for line in event.split(b"\n"):
                        if line.startswith(b"data:") and first_text(api, line[5:].strip()):
                            ttft = time.perf_counter() - t0
                done = done or final(api, event)
        if ttft is None:
            return None, "no text delta"
        return ttft, None if done else "no end event"
    finally:
        writer.close()


async def run_api(port, api, concurrency, duration):
    path, body = BODIES[api]
    payload = json.dumps(body).encode()
    req = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"Authorization: Bearer bench\r\nanthropic-version: 2023-06-01\r\n"
           f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    ttfts, errors = [], {}
    deadline = time.perf_counter() + duration

    async def worker(delay):
        await asyncio.sleep(delay)  # staggered starts, out of phase as real clients are
        while time.perf_counter() < deadline:
            try:
                ttft, error = await asyncio.wait_for(one_stream(port, api, req), 30)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                ttft, error = None, type(exc).__name__
            if error:
                errors[error] = errors.get(error, 0) + 1
            if ttft is not None:
                ttfts.append(ttft)

    await asyncio.gather(*(worker(i * 0.2 / concurrency) for i in range(concurrency)))
    return sorted(ttfts), errors


def cpu_seconds(pid):
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values, p):
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000 if values else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pace-ms", type=float, default=10)
    ap.add_argument("--budget-ms", type=float, default=2.0)
    ap.add_argument("--apis", default="chat,responses,messages")
    ap.add_argument("--pin", action="store_true", help="llmhost on CPU 1, the rest on CPU 0")
    a = ap.parse_args()
    if a.pin:
        if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
            raise SystemExit("--pin needs CPUs 0 and 1")
        os.sched_setaffinity(0, {0})  # (the upstream started below inherits it)
    up, lh = free_port(), free_port()
    work = f"/tmp/llmhost-bench-faces-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    registry = os.path.join(work, "servers.json")
    with open(registry, "w") as f:
        json.dump({"version": 1, "servers": [{"name": "paced", "url": f"http://127.0.0.1:{up}/v1",
                                              "models": ["bench-paced"]}]}, f)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "bench_tools.py"), "paced-server",
                               str(up), str(a.pace_ms)]),
             subprocess.Popen([sys.executable, os.path.join(ROOT, "llmhost.py"), "--registry",
                               registry, "serve", "--port", str(lh), "--no-access-log",
                               "--no-store"], stderr=subprocess.DEVNULL,
                              preexec_fn=(lambda: os.sched_setaffinity(0, {1})) if a.pin else None)]
    try:
        wait_port(up)
        wait_port(lh)
        apis = a.apis.split(",")
        results = {api: ([], {}, 0.0) for api in apis}
        for api in apis:
            asyncio.run(run_api(lh, api, a.concurrency, 1.0))  # warm-up, not counted
        for _ in range(max(1, a.rounds)):
            for api in apis:
                before = cpu_seconds(procs[1].pid)
                ttfts, errors = asyncio.run(run_api(lh, api, a.concurrency,
                                                    a.duration / max(1, a.rounds)))
                pooled, seen, cpu = results[api]
                pooled += ttfts
                for kind, count in errors.items():
                    seen[kind] = seen.get(kind, 0) + count
                results[api] = (pooled, seen, cpu + cpu_seconds(procs[1].pid) - before)
        results = {api: (sorted(ttfts), errors, cpu) for api, (ttfts, errors, cpu)
                   in results.items()}
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    print(f"first text delta, {a.concurrency} concurrent streams per API, {a.duration:g} s each "
          f"in {max(1, a.rounds)} turns, upstream events {a.pace_ms:g} ms apart"
          f"{', llmhost pinned to CPU 1' if a.pin else ''}")
    print("| API | streams | p50 ms | p90 ms | p99 ms | Δp99 vs chat ms | llmhost CPU ms/stream "
          "| errors |")
    print("|---|--:|--:|--:|--:|--:|--:|---|")
    ok = True
    chat_p99 = pct(results["chat"][0], 99) if "chat" in results else None
    for api, (ttfts, errors, cpu) in results.items():
        p99 = pct(ttfts, 99)
        delta = "" if api == "chat" or chat_p99 is None else f"{p99 - chat_p99:+.2f}"
        print(f"| {api} | {len(ttfts)} | {pct(ttfts, 50):.2f} | {pct(ttfts, 90):.2f} | "
              f"{p99:.2f} | {delta} | {cpu * 1000 / max(1, len(ttfts)):.2f} | {errors or 0} |")
        ok = ok and not errors and (api == "chat" or chat_p99 is None or
                                    p99 - chat_p99 <= a.budget_ms)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
