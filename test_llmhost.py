"""Tests for llmhost. Run: python3 -m pytest -q test_llmhost.py

Independent peers on loopback, never mocks of llmhost itself: the fake upstream is the standard
library's http.server (HTTP/1.1, hand-written chunked SSE); clients are http.client and raw
sockets, so llmhost's own client and server never only test each other. llmhost runs in-process
(its own event loop in a thread) for most tests and as a real subprocess where a user would.

`python3 test_llmhost.py fake-upstream PORT [MODEL...]` runs the fake upstream on its own, for
trying llmhost by hand (e.g. with the openai client).
"""

import asyncio
import base64
import hashlib
import http.client
import http.server
import io
import json
import os
import platform
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import zlib

import pytest

import llmhost

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10  # every socket in these tests has one, so a hang fails fast


def compile_scripts():
    """llmhost.py and this file compiled to bytecode in a directory of their own, once per session
    -> their .pyc files, which python3 runs as it runs the .py (and the one imports the other).
    A script run as `python3 llmhost.py` is compiled on every start and never cached: 0.2 s of
    CPU for its 13k lines, in each of the 150 llmhost processes and 50 MCP servers and fake
    upstreams the suite starts. The tests of a bare Python run llmhost.py itself."""
    import atexit
    import py_compile
    import shutil
    where = tempfile.mkdtemp(prefix="llmhost-pyc-")
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    return [py_compile.compile(os.path.join(HERE, name), os.path.join(where, name + "c"),
                               doraise=True) for name in ("llmhost.py", "test_llmhost.py")]


if __name__ == "__main__":  # this file run as a script: one of the servers it defines
    LLMHOST_PY, TESTS_PY = os.path.join(HERE, "llmhost.py"), os.path.abspath(__file__)
else:
    LLMHOST_PY, TESTS_PY = compile_scripts()


# =============================================================================
# Fake upstream: a scriptable OpenAI-compatible server on stdlib http.server
# =============================================================================

class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else head and body meet delayed ACKs: 40 ms a request

    coding = None  # this answer's Content-Encoding: a step's "encoding", else fake.encoding
    packer = None  # its zlib compressor (gzip, deflate); "br" is sent as it is, only labelled

    def log_message(self, *args):
        pass

    # -- plumbing ----------------------------------------------------------------------
    def begin_coding(self, coding):
        self.coding = coding
        self.packer = zlib.compressobj(wbits={"gzip": 31, "deflate": 15}[coding]) \
            if coding in ("gzip", "deflate") else None

    def pack(self, data, last=False):
        """`data` in this answer's coding; a stream's pieces are flushed one by one."""
        if self.packer is None:
            return data
        return self.packer.compress(data) + self.packer.flush(
            zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    def send_json(self, status, doc, extra=()):
        body = self.pack(json.dumps(doc).encode(), last=True)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.coding:
            self.send_header("Content-Encoding", self.coding)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def start_sse(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        if self.coding:
            self.send_header("Content-Encoding", self.coding)
        self.end_headers()

    def chunk(self, data):
        if self.packer is not None:
            if not data:  # the end of the stream: the coding's own end first
                last = self.pack(b"", last=True)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(last), last))
            else:
                data = self.pack(data)
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def event(self, doc):
        self.chunk(b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode())
                   + b"\n\n")

    # -- routes ------------------------------------------------------------------------
    def do_GET(self):
        fake = self.server.fake
        fake.record(self, b"")
        self.begin_coding(fake.encoding)
        if self.path == "/health":
            return self.send_json(200, {"status": "ok"})
        if self.path.rstrip("/") == fake.prefix + "/models" or \
                fake.root_api and self.path == "/models":
            if fake.models_status != 200:
                return self.send_json(fake.models_status, {"error": "nope"})
            return self.send_json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "owned_by": "fake"} for m in fake.models]})
        self.send_json(404, {"error": {"message": "not found", "type": "not_found"}})

    def do_POST(self):
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fake.record(self, raw)
        body = json.loads(raw)
        step = fake.next_step()
        self.begin_coding(step.get("encoding", fake.encoding))
        if step.get("hold") is not None:
            fake.holding.release()
            step["hold"].wait(TIMEOUT)
        if step.get("delay"):
            time.sleep(step["delay"])
        if step.get("interim_close"):  # takes the request (100 Continue), then dies
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
            step["close"] = True
        if step.get("close") or fake.dead:  # drop the connection without answering
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if step.get("status"):
            if step.get("raw") is not None:
                data = step["raw"]
                self.send_response(step["status"])
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return self.wfile.write(data)
            return self.send_json(step["status"], step.get("body", {"error": {
                "message": f"fake error {step['status']}", "type": "server_error",
                "code": None}}), step.get("headers", ()))
        if fake.root_api and self.path == "/embeddings":  # llama.cpp's own, at its root: a
            return self.send_json(200, [  # list, each embedding an array per pooled sequence
                {"index": i, "embedding": [[0.5, -1.25, i + 0.0, 3.0]]}
                for i in range(len(body["input"]) if isinstance(body["input"], list) else 1)])
        path = self.path[len(fake.prefix):].partition("?")[0]
        if path == "/chat/completions":
            return self.chat(body, step)
        if path in ("/responses", "/messages"):  # an upstream's own APIs (entries' "native")
            return self.native(path[1:], body, step)
        if path == "/completions":
            return self.send_json(200, {"id": "cmpl-1", "object": "text_completion",
                                        "model": body["model"], "choices": [
                {"index": 0, "text": "echo: " + str(body["prompt"]), "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
        if path == "/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return self.send_json(200, {"object": "list", "model": body["model"], "data": [
                {"object": "embedding", "index": i, "embedding": [0.5, -1.25, i + 0.0, 3.0]}
                for i in range(len(inputs))], "usage": {"prompt_tokens": 2, "total_tokens": 2}})
        if path == "/rerank":
            words = set(body["query"].lower().split())
            return self.send_json(200, {"model": body["model"], "results": [
                {"index": i, "relevance_score": len(words & set(doc.lower().split())) / 10}
                for i, doc in enumerate(body["documents"])]})
        self.send_json(404, {"error": {"message": "no such route", "type": "not_found"}})

    def chat(self, body, step):
        messages = body["messages"]
        last = messages[-1]
        calls = step.get("calls")
        if calls and body.get("tool_choice") != "none":  # scripted tool calls, in parallel
            return self.send_json(200, {
                "id": "chatcmpl-2", "object": "chat.completion", "created": 1,
                "model": body["model"], "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                                  "total_tokens": 6},
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": step.get("say"), "tool_calls": step.get(
                        "raw_calls") or [  # (raw_calls: given as they are)
                        {"id": None if step.get("no_ids") else f"call_{i}", "type": "function",
                         "function": {
                            "name": name, "arguments": json.dumps(args)}}
                        for i, (name, args) in enumerate(calls)]}}]}) \
                if not body.get("stream") else self.stream_calls(body, calls, step.get("say"))
        if str(last.get("content")).startswith("delay:"):  # for fakes run as a subprocess
            time.sleep(float(str(last["content"])[6:]))
        if last.get("role") == "tool":
            results = []
            for m in reversed(messages):
                if m.get("role") != "tool":
                    break
                results.insert(0, str(m.get("content")))
            reply, call = "tool result: " + " | ".join(results), None
        elif body.get("tools") and body.get("tool_choice") != "none":
            fn = body["tools"][0]["function"]["name"]
            reply, call = None, {"id": "call_1", "type": "function", "function": {
                "name": fn, "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
        else:
            content = last.get("content")
            if isinstance(content, list):
                texts = [p.get("text", "") for p in content if p.get("type") == "text"]
                images = sum(1 for p in content if p.get("type") == "image_url")
                content = " ".join(texts) + f" [{images} images]"
            reply, call = "echo: " + str(content), None
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        finish = step.get("finish") or ("tool_calls" if call else "stop")
        # vLLM names the stop string that ended an answer in the choice's stop_reason
        said = {"stop_reason": step["stop_reason"]} if "stop_reason" in step else {}
        if not body.get("stream"):
            message = {"role": "assistant", "content": reply}
            if call:
                message["tool_calls"] = [call]
            if step.get("reasoning"):  # as llama.cpp and vLLM give a model's thinking
                message["reasoning_content"] = step["reasoning"]
            return self.send_json(200, {
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                "model": body["model"], "usage": usage, "choices": [dict({
                    "index": 0, "message": message, "finish_reason": finish}, **said)]})
        self.start_sse()
        if step.get("drop_at_head"):  # dies after its head, before the first event
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": body["model"]}

        def delta(d, finish=None, **more):
            return dict(base, choices=[dict({"index": 0, "delta": d, "finish_reason": finish},
                                            **more)])

        self.event(delta({"role": "assistant", "content": ""}))
        if step.get("meet"):  # wait until the test says every stream has got this far
            try:
                step["meet"].wait(TIMEOUT)
            except threading.BrokenBarrierError:
                self.close_connection = True
                return
        paced_from = time.monotonic()  # pace by the clock: a late wake-up is not carried on
        pieces = [{"reasoning_content": w if i == 0 else " " + w} for i, w in
                  enumerate(step["reasoning"].split(" ") if step.get("reasoning") else ())]
        if call:
            args = call["function"]["arguments"]
            cut = len(args) // 3
            pieces += [{"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"],
                                                    "arguments": ""}}]}]
            pieces += [{"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
                       for part in (args[:cut], args[cut:2 * cut], args[2 * cut:])]
        else:
            words = reply.split(" ")
            pieces += [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
        for i, piece in enumerate(pieces):
            if step.get("split"):  # each event in two chunks, cut mid-JSON
                data = b"data: " + json.dumps(delta(piece)).encode() + b"\n\n"
                self.chunk(data[:len(data) // 2])
                if step.get("drop_after") is not None and i >= step["drop_after"]:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # dies mid-event
                    return
                self.chunk(data[len(data) // 2:])
                continue
            if step.get("drop_after") is not None and i >= step["drop_after"]:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # dies mid-stream
                return
            if step.get("stall_after") is not None and i >= step["stall_after"]:
                self.server.fake.holding.release()
                step["stall"].wait(TIMEOUT)
                self.close_connection = True
                return
            self.event(delta(piece))
            if step.get("pace"):
                time.sleep(max(0.0, paced_from + (i + 1) * step["pace"] - time.monotonic()))
        self.event(delta({}, finish, **said))
        if (body.get("stream_options") or {}).get("include_usage"):
            self.event(dict(base, choices=[], usage=usage))
        self.event(b"[DONE]")
        if step.get("hold_end"):  # the chunked end comes later (when the test says), in a
            step["hold_end"].wait(TIMEOUT)  # write of its own
        self.chunk(b"")


    def native(self, api, body, step):
        """The Responses or Messages API as a server that speaks it itself would answer:
        "native: " and the last input's text, whole or as the API's events (each numbered, for
        Responses); a step's drop_after kills the stream after that many text deltas."""
        given = body.get("input") if api == "responses" else body["messages"][-1]["content"]
        words = ("native: " + (given if isinstance(given, str) else "items")).split(" ")
        text = " ".join(words)
        usage = {"input_tokens": 11, "output_tokens": len(words)}
        if api == "responses":
            item = {"id": "msg_up", "type": "message", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}
            whole = {"id": "resp_up", "object": "response", "created_at": 1, "status": "completed",
                     "model": body["model"], "output": [item], "usage": dict(
                         usage, total_tokens=11 + len(words))}
            events = [("response.created", {"response": dict(whole, status="in_progress",
                                                             output=[], usage=None)})]
            events += [("response.output_text.delta", {
                "item_id": "msg_up", "output_index": 0, "content_index": 0,
                "delta": w if i == 0 else " " + w}) for i, w in enumerate(words)]
            events.append(("response.completed", {"response": whole}))
            events = [(name, dict(doc, type=name, sequence_number=n))
                      for n, (name, doc) in enumerate(events)]
        else:
            whole = {"id": "msg_up", "type": "message", "role": "assistant",
                     "model": body["model"], "content": [{"type": "text", "text": text}],
                     "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}
            events = [("message_start", {"message": dict(whole, content=[], stop_reason=None)}),
                      ("content_block_start", {"index": 0, "content_block": {
                          "type": "text", "text": ""}})]
            events += [("content_block_delta", {"index": 0, "delta": {
                "type": "text_delta", "text": w if i == 0 else " " + w}})
                for i, w in enumerate(words)]
            events += [("content_block_stop", {"index": 0}),
                       ("message_delta", {"delta": {"stop_reason": "end_turn",
                                                    "stop_sequence": None}, "usage": usage}),
                       ("message_stop", {})]
            events = [(name, dict(doc, type=name)) for name, doc in events]
        if not body.get("stream"):
            return self.send_json(200, whole)
        self.start_sse()
        deltas = 0
        for name, doc in events:
            if name in ("response.output_text.delta", "content_block_delta"):
                if step.get("drop_after") is not None and deltas >= step["drop_after"]:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # dies mid-stream
                    return
                deltas += 1
            self.chunk(b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(doc).encode()))
        self.chunk(b"")


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops SYNs of 50 concurrent connects

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):  # clients that left: expected
            self.fake.cut.set()
        else:
            super().handle_error(request, client_address)


def _stream_calls(self, body, calls, say=None):
    """A streamed answer that calls these tools, arguments split over several deltas; `say`
    is text before the calls, as models write ("Let me check.")."""
    self.start_sse()
    base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1,
            "model": body["model"]}
    self.event(dict(base, choices=[{"index": 0, "delta": {"role": "assistant"},
                                    "finish_reason": None}]))
    if say:
        self.event(dict(base, choices=[{"index": 0, "delta": {"content": say},
                                        "finish_reason": None}]))
    for i, (name, args) in enumerate(calls):
        text = json.dumps(args)
        self.event(dict(base, choices=[{"index": 0, "finish_reason": None, "delta": {
            "tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                            "function": {"name": name, "arguments": text[:3]}}]}}]))
        self.event(dict(base, choices=[{"index": 0, "finish_reason": None, "delta": {
            "tool_calls": [{"index": i, "function": {"arguments": text[3:]}}]}}]))
    self.event(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
    if (body.get("stream_options") or {}).get("include_usage"):
        self.event(dict(base, choices=[], usage={"prompt_tokens": 5, "completion_tokens": 1,
                                                 "total_tokens": 6}))
    self.event(b"[DONE]")
    self.chunk(b"")


FakeHandler.stream_calls = _stream_calls


class FakeUpstream:
    """A fake OpenAI server. `script(*steps)` queues per-request behaviours (status, delay,
    hold, close, drop_after, stall_after, pace, meet, encoding, finish, stop_reason); requests
    are recorded with their raw body."""

    def __init__(self, models=("fake-model",), prefix="/v1", port=0):
        self.models = list(models)
        self.prefix = prefix
        self.models_status = 200
        self.encoding = None  # Content-Encoding of every answer (a step's "encoding" wins)
        self.root_api = False  # also answer /models and /embeddings at "/", as llama.cpp does
        self.requests = []
        self.steps = []
        self.lock = threading.Lock()
        self.holding = threading.Semaphore(0)  # released when a request reaches a hold/stall
        self.cut = threading.Event()  # set when a client (llmhost) left in the middle of an answer
        self.server = QuietServer(("127.0.0.1", port), FakeHandler)
        self.server.fake = self
        self.dead = False  # kill(): requests under way are dropped without an answer
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{prefix}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def record(self, handler, raw):
        with self.lock:
            self.requests.append({"method": handler.command, "path": handler.path,
                                  "peer": handler.client_address,
                                  "headers": {k.lower(): v for k, v in handler.headers.items()},
                                  "body": raw})

    def script(self, *steps):
        with self.lock:
            self.steps.extend(steps)

    def next_step(self):
        with self.lock:
            return self.steps.pop(0) if self.steps else {}

    def posts(self):
        return [r for r in self.requests if r["method"] == "POST"]

    def kill(self):
        """Die: refuse new connections, drop the requests under way."""
        self.dead = True
        self.server.shutdown()
        self.server.server_close()

    def close(self):
        if self.dead:
            return
        self.server.shutdown()
        self.server.server_close()


# =============================================================================
# Harness: llmhost in-process, clients
# =============================================================================

class Running:
    """A Gateway on its own event loop in a thread, listening on 127.0.0.1:<port 0>."""

    def __init__(self, registry, **options):
        self.log = io.StringIO()  # the access log, as serve writes it (see logged_status)
        options.setdefault("access_log", llmhost.AccessLog(self.log))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway = llmhost.Gateway(registry, environ=options.pop("environ", {}), **options)
        addresses = self.call(self.gateway.start("127.0.0.1", 0))
        self.port = addresses[0][1]

    def call(self, coro, timeout=TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout=2):
        self.call(self.gateway.stop(timeout), timeout + 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


def write_registry(path, servers, mcp=None):
    doc = {"version": 1, "servers": servers, "mcpServers": mcp or {}}
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


@pytest.fixture
def fake():
    upstream = FakeUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def registry(tmp_path):
    return str(tmp_path / "servers.json")


@pytest.fixture
def gateway(fake, tmp_path):
    """llmhost with one server `local` serving `fake-model`."""
    path = write_registry(tmp_path / "servers.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path)
    yield running
    running.stop()


def request(port, method, path, body=None, headers=None, timeout=TIMEOUT):
    """-> (status, headers dict, body bytes) over a fresh http.client connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload


def post(port, path, body, **kw):
    status, headers, raw = request(port, "POST", path, body, **kw)
    return status, headers, raw


def jpost(port, path, body, **kw):
    status, headers, raw = request(port, "POST", path, body, **kw)
    return status, json.loads(raw)


def get_status(port, **kw):
    """GET /v1/status -> its JSON: what `llmhost.py status` shows."""
    return json.loads(request(port, "GET", "/v1/status", **kw)[2])


def server_status(port, name):
    """The /v1/status entry of the server `name`."""
    return next(s for s in get_status(port)["servers"] if s["name"] == name)


def logged_status(running, request_id):
    """The status in the access log line of the request sent with this X-Request-Id (the line
    is written once the request has ended, and flushed within a sweep), or None."""
    for line in running.log.getvalue().splitlines():
        if line.endswith(" id=" + request_id):
            return line.split(" status=")[1].split()[0]
    return None


def sse_events(raw):
    """Decode an SSE body the way clients do: the data of each event."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            events.append(b"\n".join(data).decode())
    return events


def raw_exchange(port, payload, timeout=TIMEOUT, half_close=True):
    """Send raw bytes; read until the server closes. -> bytes received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


# =============================================================================
# Wire format (pure)
# =============================================================================

@pytest.mark.parametrize("line, expected", [
    (b"GET / HTTP/1.1\r\n", ("GET", "/", "1.1")),
    (b"POST /v1/chat/completions?x=1 HTTP/1.0\r\n", ("POST", "/v1/chat/completions?x=1", "1.0")),
    (b"OPTIONS * HTTP/1.1\r\n", ("OPTIONS", "*", "1.1")),
    # absolute-form (RFC 9112 §3.2.2: a server MUST accept it); Request splits it
    (b"GET http://127.0.0.1:4000/v1/models?a=1 HTTP/1.1\r\n",
     ("GET", "http://127.0.0.1:4000/v1/models?a=1", "1.1")),
    (b"GET HTTPS://x HTTP/1.1\r\n", ("GET", "HTTPS://x", "1.1")),
])
def test_request_line_ok(line, expected):
    assert llmhost.parse_request_line(line) == expected


@pytest.mark.parametrize("target, host, path, query", [
    ("http://127.0.0.1:4000/v1/models?a=1", "127.0.0.1:4000", "/v1/models", "a=1"),
    ("HTTPS://x", "x", "/", ""),
    ("http://x?a=/v1/models", "x", "/", "a=/v1/models"),
    ("http://[::1]:4000/health", "[::1]:4000", "/health", ""),
])
def test_an_absolute_form_target_is_routed_by_its_path_and_its_authority_is_the_host(
        target, host, path, query):
    """RFC 9112 §3.2.2: the target's authority wins over the Host field."""
    request = llmhost.Request("GET", target, "1.1", {"host": "other.example"})
    assert (request.headers["host"], request.path, request.query) == (host, path, query)
    assert request.target == path + ("?" + query if query else "")


@pytest.mark.parametrize("line, status", [
    (b"GET / HTTP/1.1\n", 400),  # bare LF
    (b"GET /\r HTTP/1.1\r\n", 400),  # bare CR
    (b"GET  / HTTP/1.1\r\n", 400),  # double space
    (b"GET / HTTP/2.0\r\n", 505),
    (b"GET / HTTP/1.1 extra\r\n", 400),
    (b"BREW / HTTP/1.1\r\n", 501),
    (b"G@T / HTTP/1.1\r\n", 400),
    (b"GET ftp://x/ HTTP/1.1\r\n", 400),  # neither a path nor an http(s) URL
    (b"GET http:///v1/models HTTP/1.1\r\n", 400),  # no host (RFC 9110 §4.2.1)
    (b"GET http://127.0.0.1@evil.example/ HTTP/1.1\r\n", 400),  # userinfo (RFC 9110 §4.2.4)
    (b"GET /\x00 HTTP/1.1\r\n", 400),
    (b"GET /" + b"a" * llmhost.MAX_REQUEST_LINE + b" HTTP/1.1\r\n", 414),
])
def test_request_line_refused(line, status):
    with pytest.raises(llmhost.ProtocolError) as info:
        llmhost.parse_request_line(line)
    assert info.value.status == status and info.value.close


def test_request_line_limit_is_exact():
    prefix, suffix = b"GET /", b" HTTP/1.1\r\n"
    fits = prefix + b"a" * (llmhost.MAX_REQUEST_LINE - len(prefix) - len(suffix)) + suffix
    assert len(fits) == llmhost.MAX_REQUEST_LINE
    llmhost.parse_request_line(fits)
    with pytest.raises(llmhost.ProtocolError):
        llmhost.parse_request_line(fits[:5] + b"a" + fits[5:])


def test_header_block_parses_and_joins_repeats():
    headers = llmhost.parse_header_block(
        b"Host: x\r\nAccept: a\r\naccept:  b \r\nX-Empty:\r\n")
    assert headers == {"host": "x", "accept": "a, b", "x-empty": ""}


def test_header_block_keeps_inner_spaces_and_obs_text():
    headers = llmhost.parse_header_block(
        b"User-Agent: \tOpenAI/Python 1.54 \t\r\nX-Name: caf\xe9\r\nX-Colon: a:b\r\n")
    assert headers == {"user-agent": "OpenAI/Python 1.54", "x-name": "caf\xe9", "x-colon": "a:b"}


@pytest.mark.parametrize("block", [
    b"Host : x\r\n",  # space before colon (RFC 9112 5.1)
    b"Host: x\r\n folded\r\n",  # obs-fold
    b"Host: x\nAccept: y\r\n",  # bare LF inside the block
    b"Host: a\rb\r\n",  # bare CR
    b"Host: a\x00b\r\n",  # NUL
    b"Bad[name]: x\r\n",
    b"NoColon\r\n",
    b"Content-Length: 1\r\nContent-Length: 1\r\n",  # repeated framing header
    b"Host: a\r\nHost: b\r\n",
])
def test_header_block_refused(block):
    with pytest.raises(llmhost.ProtocolError) as info:
        llmhost.parse_header_block(block)
    assert info.value.status == 400


def test_header_count_limit_at_n_and_n_plus_1():
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(llmhost.MAX_HEADER_COUNT))
    assert len(llmhost.parse_header_block(lines)) == llmhost.MAX_HEADER_COUNT
    with pytest.raises(llmhost.ProtocolError) as info:
        llmhost.parse_header_block(lines + b"X-last: v\r\n")
    assert info.value.status == 431


@pytest.mark.parametrize("headers, result", [
    ({}, ("length", 0)),
    ({"content-length": "12"}, ("length", 12)),
    ({"transfer-encoding": "chunked"}, ("chunked", None)),
    ({"transfer-encoding": "Chunked"}, ("chunked", None)),
])
def test_body_framing(headers, result):
    assert llmhost.body_framing(headers) == result


@pytest.mark.parametrize("headers, status", [
    ({"content-length": "5", "transfer-encoding": "chunked"}, 400),
    ({"content-length": "-1"}, 400),
    ({"content-length": "1, 1"}, 400),
    ({"content-length": "0x10"}, 400),
    ({"content-length": "١٢"}, 400),  # unicode digits are not digits on the wire
    ({"transfer-encoding": "gzip, chunked"}, 501),
    ({"transfer-encoding": "identity"}, 501),
    ({"content-length": str(llmhost.MAX_BODY_BYTES + 1)}, 413),
])
def test_body_framing_refused(headers, status):
    with pytest.raises(llmhost.ProtocolError) as info:
        llmhost.body_framing(headers)
    assert info.value.status == status


def test_body_limit_at_n():
    assert llmhost.body_framing({"content-length": str(llmhost.MAX_BODY_BYTES)}) == \
        ("length", llmhost.MAX_BODY_BYTES)


@pytest.mark.parametrize("line, size", [(b"0\r\n", 0), (b"1a\r\n", 26), (b"A;ext=1\r\n", 10),
                                        (b"5;a;b=\"q\"\r\n", 5)])
def test_chunk_size(line, size):
    assert llmhost.parse_chunk_size(line) == size


@pytest.mark.parametrize("line", [b"\r\n", b"g\r\n", b"-1\r\n", b"1 2\r\n", b"5\n",
                                  b"0x5\r\n", b"11111111111111111\r\n", b"5;=x\r\n"])
def test_chunk_size_refused(line):
    with pytest.raises(llmhost.ProtocolError):
        llmhost.parse_chunk_size(line)


def test_response_head_refuses_response_splitting():
    with pytest.raises(ValueError):
        llmhost.response_head(200, [("X-Id", "a\r\nSet-Cookie: x")])
    assert llmhost.response_head(204, [("X-A", "b")]) == b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n"


@pytest.mark.parametrize("obj", [
    {"a": [1, 2.5, None, True, False, "é", {"b": {}}], "c": []}, "plain", "é\u2028",
    "half \ud83d", {"x": ["half \ud83d", "é"]}, [1e300, float("nan"), -0.0, 10**30],
    {1: 2, 2.5: "x", None: 3, True: 4}, 3, None, [], {}])
def test_json_bytes_is_compact_json_dumps(obj):
    """json_bytes' C encoder, built once, gives what json.dumps gives: UTF-8, or escaped
    throughout when a lone surrogate has no UTF-8."""
    try:
        expected = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        expected = json.dumps(obj, separators=(",", ":")).encode()
    assert llmhost.json_bytes(obj) == expected
    assert llmhost.json_bytes(obj) == expected  # (the encoder is reused: a second call too)


def test_json_bytes_refuses_what_is_no_json():
    with pytest.raises(TypeError):
        llmhost.json_bytes({"a": object()})
    assert llmhost.json_bytes({"a": 1}) == b'{"a":1}'  # (and works after a failure)


# =============================================================================
# Registry
# =============================================================================

def test_missing_registry_is_empty(registry):
    assert llmhost.load_registry(registry)["servers"] == []


def test_shipped_servers_json_is_a_valid_empty_registry():
    doc = llmhost.load_registry(os.path.join(HERE, "servers.json"))
    assert doc["version"] == 1 and doc["servers"] == []


@pytest.mark.parametrize("text, needle", [
    ('{"version": 1, "servers": [', "1:28: not valid JSON"),
    ('{"version": 2, "servers": []}', '"version" must be 1'),
    ('{"version": 1, "servers": {}}', '"servers" must be a list'),
    ('{"version": 1, "servers": [{"name": "a"}]}', 'needs exactly one of "url"'),
    ('{"version": 1, "servers": [{"name": "a", "url": "http://x", "ttl": 5}]}',
     "only apply to managed entries"),
    ('{"version": 1, "servers": [{"name": "a b", "url": "http://x"}]}', "servers[0] (a b).name"),
    ('{"version": 1, "servers": [{"name": "a", "url": "ftp://x"}]}', "servers[0] (a).url"),
    ('{"version": 1, "servers": [{"name": "a", "url": "http://x", "modles": []}]}',
     'unknown field "modles"'),
    ('{"version": 1, "servers": [{"name": "a", "url": "http://x"}, {"name": "a", "url": '
     '"http://y"}]}', "used twice"),
    ('{"version": 1, "servers": [{"name": "a", "url": "http://x", "models": ["m", "n"], '
     '"alias": "p"}]}', "alias needs exactly one model"),
    ('{"version": 1, "servers": [{"name": "a", "url": "http://x", "mcp": ["t"]}]}',
     'no MCP server named "t"'),
    ('{"version": 1, "servers": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"version": 1, "servers": [{"name": "a", "command": "srv ${PORT}", "models": ["m"], '
     '"ttl": false}]}', "servers[0] (a).ttl"),
    ('{"version": 1, "servers": [{"name": "a", "url": "http://x", "native": ["chat"]}]}',
     'servers[0] (a).native: must be a list of the APIs'),
    ('{"version": 1, "servers": [{"name": "a", "url": "http://x", "native": "messages"}]}',
     'servers[0] (a).native'),
])
def test_registry_errors_name_file_and_field(tmp_path, text, needle):
    path = tmp_path / "servers.json"
    path.write_text(text)
    with pytest.raises(llmhost.RegistryError) as info:
        llmhost.load_registry(str(path))
    assert str(path) in str(info.value) and needle in str(info.value)


def test_literal_key_makes_file_private(registry):
    doc = llmhost.empty_registry()
    doc["servers"].append({"name": "a", "url": "http://x/v1", "models": [], "api_key": "sk-1"})
    llmhost.save_registry(registry, doc)
    assert os.stat(registry).st_mode & 0o777 == 0o600
    doc["servers"][0].pop("api_key")
    os.chmod(registry, 0o644)
    llmhost.save_registry(registry, doc)
    assert os.stat(registry).st_mode & 0o777 == 0o644  # the mode it had is kept


def test_root_editing_a_service_users_registry_leaves_it_theirs(tmp_path):
    """`sudo llmhost.py add ...` on the file of a serve that runs as another user: the replaced
    file keeps its owner (before: root's, mode 0600, so that serve could no longer read it)."""
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    registry = write_registry(tmp_path / "s.json", [])
    os.chown(registry, 65534, 65534)  # nobody
    code, out, err = run_cli(registry, "add", "remote", "http://127.0.0.1:1/v1", "--no-check",
                             "--model", "m", "--api-key", "sk-literal")
    assert code == 0, err
    st = os.stat(registry)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)
    st = os.stat(registry + ".lock")  # (their next add must be able to take the lock)
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_a_lock_file_that_is_a_link_is_refused_not_followed(tmp_path):
    """Whoever can write the registry's folder could link the lock to a file of root's, which
    root's next `add` would create, or (when root gives the lock to the registry's owner)
    give away."""
    registry = write_registry(tmp_path / "s.json", [])
    target = tmp_path / "not-a-lock"
    os.symlink(target, registry + ".lock")
    code, out, err = run_cli(registry, "add", "x", "http://127.0.0.1:1/v1", "--no-check",
                             "--model", "m")
    assert code == 1 and "s.json.lock: it is a symbolic link; remove it" in err, err
    assert not target.exists() and llmhost.load_registry(registry)["servers"] == []


def test_failed_update_leaves_file_byte_identical(registry):
    llmhost.save_registry(registry, llmhost.empty_registry())
    before = open(registry, "rb").read()

    def change(doc):
        doc["servers"].append({"name": "a", "url": "http://x"})
        raise llmhost.RegistryError("no")

    with pytest.raises(llmhost.RegistryError):
        llmhost.update_registry(registry, change)
    with pytest.raises(llmhost.RegistryError):  # an invalid result is not saved either
        llmhost.update_registry(registry, lambda doc: doc["servers"].append({"name": "?"}))
    assert open(registry, "rb").read() == before
    assert [f for f in os.listdir(os.path.dirname(registry)) if f.endswith(".tmp")] == []


def test_racing_adds_from_many_processes_lose_nothing(registry):
    """Twelve `add --no-check` processes at once: every entry lands (the lock serialises the
    read-modify-write; without it, last writer wins)."""
    procs = [subprocess.Popen([sys.executable, LLMHOST_PY, "--registry",
                               registry, "add", f"s{i}", f"http://127.0.0.1:{9000 + i}/v1",
                               "--no-check"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(12)]
    for p in procs:
        assert p.wait(TIMEOUT * 3) == 0, p.stderr.read()
    names = sorted(e["name"] for e in llmhost.load_registry(registry)["servers"])
    assert names == sorted(f"s{i}" for i in range(12))


# =============================================================================
# CLI
# =============================================================================

def run_cli(registry, *argv, environ=None):
    """main() in-process -> (exit code, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = llmhost.main(["--registry", registry, *argv], environ=environ or {})
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_add_probes_and_saves(fake, registry):
    code, out, err = run_cli(registry, "add", "local", fake.url)
    assert code == 0, err
    entry = llmhost.load_registry(registry)["servers"][0]
    assert entry == {"name": "local", "url": fake.url, "models": ["fake-model"], "discover": True}
    assert fake.requests[-1]["path"] == "/v1/models"


def test_add_with_alias_saves_and_says_it(fake, registry):
    code, out, err = run_cli(registry, "add", "local", fake.url, "--model", "fake-model",
                             "--alias", "public")
    assert code == 0, err
    assert "(1 model: public -> fake-model)" in out
    entry = llmhost.load_registry(registry)["servers"][0]
    assert entry == {"name": "local", "url": fake.url, "models": ["fake-model"], "alias": "public"}


def test_add_with_alias_takes_the_one_model_an_upstream_serves(fake, registry):
    code, out, err = run_cli(registry, "add", "local", fake.url, "--alias", "public")
    assert code == 0 and "(1 model: public -> fake-model)" in out, err
    entry = llmhost.load_registry(registry)["servers"][0]  # (no "discover": the alias names
    assert entry["models"] == ["fake-model"] and "discover" not in entry  # that one for good)
    fake.models = ["a", "b"]
    code, out, err = run_cli(registry, "add", "two", fake.url, "--alias", "p")
    assert code == 1 and f"--alias needs exactly one model: {fake.url} lists 2; pick one " \
        "with --model" in err, err


def test_add_corrects_missing_v1(fake, registry):
    base = fake.url[:-3]
    code, out, err = run_cli(registry, "add", "local", base, "--model", "fake-model")
    assert code == 0, err
    assert "using " + fake.url in err
    assert llmhost.load_registry(registry)["servers"][0]["url"] == fake.url


def test_add_of_a_servers_root_takes_its_v1_api(fake, registry):
    """llama-server prints http://127.0.0.1:8080 and answers /models there too, but its root
    /embeddings is its own shape: a URL without a path is taken with /v1 when /v1/models
    answers as an OpenAI API, and `add` says so (before: kept as given)."""
    fake.root_api = True
    base = fake.url[:-3]
    for url in (base, base + "/"):
        code, out, err = run_cli(registry, "add", "minilm", url)
        assert code == 0, err
        assert f"using {fake.url}, where the server's OpenAI API answers" in err
        assert f"added minilm: {fake.url} (1 model" in out
        assert llmhost.load_registry(registry)["servers"][0]["url"] == fake.url
        assert run_cli(registry, "remove", "minilm")[0] == 0


def test_add_sends_upstream_key_from_env(fake, registry):
    code, _, err = run_cli(registry, "add", "local", fake.url, "--api-key-env", "UP_KEY",
                           environ={"UP_KEY": "sk-upstream"})
    assert code == 0, err
    assert fake.requests[-1]["headers"]["authorization"] == "Bearer sk-upstream"
    entry = llmhost.load_registry(registry)["servers"][0]
    assert entry["api_key_env"] == "UP_KEY" and "api_key" not in entry


@pytest.mark.parametrize("argv, needle", [
    (["add", "x", "not a url"], "invalid URL"),
    (["add", "x", "ftp://host/v1"], "scheme must be http or https"),
    (["add", "x", "http:///v1"], "no host"),
    (["add", "x", "http://127.0.0.1:99999/v1"], "invalid URL"),
    (["add", "bad name", "http://127.0.0.1:1/v1"], "invalid name"),
    (["add", "x", "http://127.0.0.1:1/v1"], "connection refused"),
    (["add", "x", "http://127.0.0.1:1/v1/chat/completions"], "not a base URL"),
    (["add", "x", "http://127.0.0.1:1/v1", "--no-check", "--alias", "p"],
     "--alias needs exactly one model: give it with --model"),
    (["add", "x", "http://127.0.0.1:1/v1", "--ready-path", "/up", "--start-timeout", "9"],
     "--ready-path, --start-timeout: only for --command entries"),
    (["add", "x", "--command", "srv --port ${PORT}", "--model", "m", "--api-key", "k",
      "--api-key-env", "K"], "either --api-key-env or --api-key"),
    (["add", "x", "http://user:pw@127.0.0.1:1/v1"], "credentials in a URL are not used"),
    (["add", "x", "http://127.0.0.1:1/v1", "--timeout", "-1"], "--timeout must be seconds > 0"),
    (["add", "x", "http://127.0.0.1:1/v1", "--no-check", "--timeout", "inf"],  # (no JSON:
     "--timeout must be seconds > 0"),  # it would be written as Infinity)
    (["add", "x", "--command", "srv ${PORT}", "--model", "m", "--ttl", "inf"], "--ttl must be"),
    (["mcp", "add", "x", "--no-check", "--timeout", "1e400", "--", "srv"],
     "'timeout' must be a positive number"),
    (["serve", "--mcp-max-rounds", "0"], "--mcp-max-rounds must be at least 1"),
    (["serve", "--mcp-allow-url", "127.0.0.1:8931"], "--mcp-allow-url '127.0.0.1:8931'"),
    (["mcp", "add", "x", "--transport", "sse", "--", "srv"], "--transport: only with --url"),
    (["mcp", "add", "x", "--url", "http://127.0.0.1:1/mcp", "--env", "A=1"],
     "--env: only for a -- COMMAND (stdio)"),
    (["serve", "--api-key", ""], "--api-key needs a value"),
    (["serve", "--workers", "2", "--max-concurrency", "1"], "cannot be split across 2 workers"),
    (["status", "--url", "127.0.0.1:4000"], "invalid --url"),
    (["discover", "--ports", "99999"], "port numbers (1-65535)"),
    (["bench", "http://127.0.0.1:1/v1", "--model", "m", "-n", "0"], "--requests must be at least 1"),
    (["bench", "http://127.0.0.1:1/v1", "--model", "m", "-d", "nan"], "--duration must be seconds"),
    (["bench", "http://127.0.0.1:1/v1", "--model", "m", "--timeout", "0"], "--timeout must be"),
    (["bench", "http://127.0.0.1:1/v1", "--model", "m", "--prompt-tokens", "0"],
     "--prompt-tokens must be at least 1"),
    (["bench", "http://127.0.0.1:1/v1", "--model", "m", "--api-key-env", "UNSET_VAR"],
     "$UNSET_VAR is not set"),
    (["serve", "--max-concurrency", "0"], "--max-concurrency must be at least 1"),
    (["serve", "--queue-timeout", "-1"], "--queue-timeout must be at least 0"),
    (["remove", "ghost"], "no server named 'ghost'"),
    (["add", "x", "http://127.0.0.1:1/v1", "--no-check", "--native", "responses,chat"],
     "--native takes responses and/or messages, comma-separated, not 'chat'"),
    (["add", "x", "http://127.0.0.1:1/v1", "--no-check", "--native", ","],
     "--native takes responses and/or messages"),
    (["show", "ghost"], "no server named 'ghost'"),
])
def test_cli_refusals_leave_file_untouched(registry, argv, needle):
    llmhost.save_registry(registry, {"version": 1, "servers": [
        {"name": "keep", "url": "http://127.0.0.1:2/v1", "models": ["m"]}], "mcpServers": {}})
    before = open(registry, "rb").read()
    code, out, err = run_cli(registry, *argv)
    assert code != 0 and needle in err, err
    assert open(registry, "rb").read() == before


def test_add_refuses_unknown_model_and_duplicate(fake, registry):
    assert run_cli(registry, "add", "local", fake.url)[0] == 0
    before = open(registry, "rb").read()
    code, _, err = run_cli(registry, "add", "other", fake.url, "--model", "nope")
    assert code == 1 and "does not serve nope" in err and "fake-model" in err
    code, _, err = run_cli(registry, "add", "local", fake.url)
    assert code == 1 and "already exists" in err
    assert open(registry, "rb").read() == before


def test_add_refuses_non_openai_answer_and_refused_key(fake, registry):
    fake.models_status = 401
    code, _, err = run_cli(registry, "add", "local", fake.url)
    assert code == 1 and "refused the key" in err
    fake.models_status = 500
    code, _, err = run_cli(registry, "add", "local", fake.url)
    assert code == 1 and "no OpenAI-compatible model list" in err and "--no-check" in err
    assert not os.path.exists(registry)


def test_add_unreachable_times_out_quickly(registry, monkeypatch):
    """A server that accepts but never answers: a clear error within the probe timeout."""
    monkeypatch.setattr(llmhost, "PROBE_TIMEOUT", 0.5)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        started = time.monotonic()
        code, _, err = run_cli(registry, "add", "x", f"http://127.0.0.1:{silent.getsockname()[1]}/v1")
        assert code == 1 and "no answer within" in err
        assert time.monotonic() - started < 5
    finally:
        silent.close()


def test_no_check_adds_unreachable_server(registry):
    code, out, err = run_cli(registry, "add", "later", "http://127.0.0.1:1/v1", "--no-check")
    assert code == 0, err
    assert llmhost.load_registry(registry)["servers"][0]["name"] == "later"


def test_list_show_remove(fake, registry):
    run_cli(registry, "add", "a", fake.url, "--model", "fake-model", "--api-key", "sk-secret")
    run_cli(registry, "add", "b", "http://127.0.0.1:1/v1", "--no-check", "--api-key-env", "K")
    code, out, _ = run_cli(registry, "list")
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "URL", "MODELS", "AUTH"]
    assert "env:K" in out and "key in file" in out and "sk-secret" not in out
    code, out, _ = run_cli(registry, "list", "--json")
    listed = json.loads(out)
    assert [e["name"] for e in listed] == ["a", "b"] and listed[0]["models"] == ["fake-model"]
    assert "sk-secret" not in out
    code, out, _ = run_cli(registry, "show", "a")
    assert code == 0 and "fake-model" in out and "sk-secret" not in out
    code, out, err = run_cli(registry, "remove", "a")
    assert code == 0
    assert [e["name"] for e in llmhost.load_registry(registry)["servers"]] == ["b"]
    code, _, err = run_cli(registry, "remove", "a")
    assert code == 1 and "'a'" in err and "known: b" in err


def test_add_native_round_trips_through_list_and_show(registry):
    code, out, err = run_cli(registry, "add", "own", "http://127.0.0.1:1/v1", "--no-check",
                             "--model", "m", "--native", "messages, responses,messages")
    assert code == 0, err
    (entry,) = llmhost.load_registry(registry)["servers"]
    assert entry["native"] == ["messages", "responses"]
    code, out, _ = run_cli(registry, "list", "--json")
    assert json.loads(out)[0]["native"] == ["messages", "responses"]
    code, out, _ = run_cli(registry, "list")
    assert "[native: messages, responses]" in out
    code, out, _ = run_cli(registry, "show", "own")
    assert re.search(r"^native\s+messages, responses$", out, re.M), out


def test_cli_runs_on_bare_python(tmp_path):
    """`python3 -I -S` (no site-packages) runs every non-MCP command."""
    reg = str(tmp_path / "r.json")
    cmd = [sys.executable, "-I", "-S", os.path.join(HERE, "llmhost.py"), "--registry", reg]
    for argv in (["--help"], ["--version"], ["add", "x", "http://127.0.0.1:1/v1", "--no-check"],
                 ["list"], ["list", "--json"], ["show", "x"], ["remove", "x"], ["serve", "--help"]):
        result = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, (argv, result.stderr)
    result = subprocess.run([sys.executable, "-I", "-S", "-c",
                             "import sys; sys.path.insert(0, %r); import llmhost; "
                             "print('mcp' in sys.modules, 'asyncio' in sys.modules)" % HERE],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.stdout.split() == ["False", "False"]
    # MCP on a bare Python: at once, a message that says what to install (it waited 30 s)
    started = time.monotonic()
    result = subprocess.run(cmd + ["mcp", "call", "--url", "http://127.0.0.1:1/mcp", "x"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1 and "pip install 'mcp" in result.stderr, result.stderr
    assert time.monotonic() - started < 10


# =============================================================================
# Proxy: the OpenAI API through llmhost
# =============================================================================

def test_health_and_models(gateway):
    status, _, raw = request(gateway.port, "GET", "/health")
    assert status == 200 and json.loads(raw) == {"status": "ok"}
    status, _, raw = request(gateway.port, "GET", "/v1/models")
    doc = json.loads(raw)
    assert status == 200 and doc["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in doc["data"]] == \
        [("fake-model", "model", "local")]
    status, _, raw = request(gateway.port, "GET", "/v1/models/fake-model")
    assert status == 200 and json.loads(raw)["id"] == "fake-model"
    status, _, raw = request(gateway.port, "GET", "/models")  # without the /v1 prefix
    assert status == 200 and json.loads(raw)["data"][0]["id"] == "fake-model"
    status, _, raw = request(gateway.port, "GET", "/models/fake-model")  # (was a 500)
    assert status == 200 and json.loads(raw)["id"] == "fake-model"
    body = b'\xef\xbb\xbf{"model": "fake-model", "messages": [{}], "stream": null}'
    assert post(gateway.port, "/v1/chat/completions", body)[0] == 200  # a BOM, a null: fine


def test_chat_forwards_body_bytes_untouched(gateway, fake):
    body = json.dumps(dict(CHAT, temperature=0.25, tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object"}}}], tool_choice="none",
        parallel_tool_calls=False, response_format={"type": "json_object"},
        some_future_field={"x": [1, 2]})).encode()
    status, headers, raw = post(gateway.port, "/v1/chat/completions", body)
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["content"] == "echo: hello there"
    assert headers["x-llmhost-server"] == "local" and float(headers["x-llmhost-overhead-ms"]) >= 0
    assert fake.posts()[-1]["body"] == body  # byte-exact: nothing re-encoded
    assert fake.posts()[-1]["path"] == "/v1/chat/completions"


def test_image_parts_forwarded_byte_exact(gateway, fake):
    png = base64.b64encode(os.urandom(300_000)).decode()  # ~400 KB data URL
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}}]}]}).encode()
    status, _, raw = post(gateway.port, "/v1/chat/completions", body)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == \
        "echo: what is this [1 images]"
    assert fake.posts()[-1]["body"] == body


def test_chat_stream_relays_events_and_usage(gateway):
    status, headers, raw = post(gateway.port, "/v1/chat/completions",
                                dict(CHAT, stream=True, stream_options={"include_usage": True}))
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert headers["transfer-encoding"] == "chunked"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: hello there"
    assert chunks[-1]["usage"]["total_tokens"] == 10 and chunks[-1]["choices"] == []


def test_a_stream_is_asked_for_its_usage_and_a_client_that_did_not_gets_none(fake, tmp_path):
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]},
        {"name": "plain", "url": fake.url, "models": ["plain-model"], "stream_usage": False}])
    running = Running(path)
    try:
        status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
        events = sse_events(raw)
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["choices"] for c in chunks) and not any(c.get("usage") for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
            "echo: hello there"
        assert json.loads(fake.posts()[-1]["body"])["stream_options"] == {"include_usage": True}
        status, _, raw = post(running.port, "/v1/chat/completions", dict(
            CHAT, stream=True, stream_options={"include_usage": True}))  # asked: it stays
        chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
        assert chunks[-1]["usage"]["total_tokens"] == 10 and chunks[-1]["choices"] == []
        assert json.loads(fake.posts()[-1]["body"])["stream_options"] == {"include_usage": True}
        _, samples = scrape(running.port)  # both streams' usage counted
        assert series(samples, "llmhost_tokens_total", model="fake-model", kind="prompt") == 14
        assert series(samples, "llmhost_tokens_total", model="fake-model",
                      kind="completion") == 6
        status, _, raw = post(running.port, "/v1/chat/completions", dict(
            CHAT, model="plain-model", stream=True))  # "stream_usage": false: not asked
        assert status == 200 and sse_events(raw)[-1] == "[DONE]"
        assert "stream_options" not in json.loads(fake.posts()[-1]["body"])
    finally:
        running.stop()


def test_add_no_stream_usage_is_saved_and_an_entry_asks_by_default(fake, tmp_path):
    path = tmp_path / "s.json"
    assert run_cli(str(path), "add", "plain", fake.url, "--no-stream-usage")[0] == 0
    assert run_cli(str(path), "add", "asks", fake.url)[0] == 0
    entries = {e["name"]: e for e in json.loads(path.read_text())["servers"]}
    assert entries["plain"]["stream_usage"] is False and "stream_usage" not in entries["asks"]


def test_the_usage_chunk_is_found_among_events_glued_together():
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n'
    delta = b'data: {"choices": [{"delta": {}}], "usage": null}\n\n'
    assert llmhost.without_usage_event(delta + usage + b"data: [DONE]\n\n") == (
        delta + b"data: [DONE]\n\n", usage)
    assert llmhost.without_usage_event(usage) == (b"", usage)
    assert llmhost.without_usage_event(delta) == (delta, None)


def test_streamed_tool_call_deltas_reassemble(gateway):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    status, _, raw = post(gateway.port, "/v1/chat/completions",
                          dict(CHAT, stream=True, tools=tools))
    calls = {}
    for event in sse_events(raw)[:-1]:
        for delta in json.loads(event)["choices"][0]["delta"].get("tool_calls", ()):
            call = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
            call["name"] += delta.get("function", {}).get("name", "")
            call["arguments"] += delta.get("function", {}).get("arguments", "")
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}


def test_tool_result_round_trip(gateway):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    status, doc = jpost(gateway.port, "/v1/chat/completions", dict(CHAT, tools=tools))
    message = doc["choices"][0]["message"]
    assert doc["choices"][0]["finish_reason"] == "tool_calls"
    call = message["tool_calls"][0]
    messages = CHAT["messages"] + [message, {"role": "tool", "tool_call_id": call["id"],
                                             "content": "21 degrees"}]
    status, doc = jpost(gateway.port, "/v1/chat/completions",
                        {"model": "fake-model", "messages": messages, "tools": tools})
    assert doc["choices"][0]["message"]["content"] == "tool result: 21 degrees"


def test_legacy_completions(gateway):
    status, doc = jpost(gateway.port, "/v1/completions", {"model": "fake-model", "prompt": "hi"})
    assert status == 200 and doc["choices"][0]["text"] == "echo: hi"


def test_embeddings_float_and_base64(gateway, fake):
    status, doc = jpost(gateway.port, "/v1/embeddings", {"model": "fake-model",
                                                         "input": ["a", "b"]})
    assert status == 200 and doc["data"][1]["embedding"] == [0.5, -1.25, 1.0, 3.0]
    status, doc = jpost(gateway.port, "/v1/embeddings", {"model": "fake-model", "input": "a",
                                                         "encoding_format": "base64"})
    packed = base64.b64decode(doc["data"][0]["embedding"])
    assert struct.unpack("<4f", packed) == (0.5, -1.25, 0.0, 3.0)
    assert doc["usage"]["total_tokens"] == 2


def test_rerank_normalised_best_first(gateway, fake):
    body = {"model": "fake-model", "query": "red apple",
            "documents": ["a green pear", {"text": "one red apple"}, "red car"],
            "top_n": 2, "return_documents": True}
    for path in ("/v1/rerank", "/rerank"):
        status, doc = jpost(gateway.port, path, body)
        assert status == 200, doc
        assert [r["index"] for r in doc["results"]] == [1, 2]
        assert doc["results"][0] == {"index": 1, "relevance_score": 0.2,
                                     "document": {"text": "one red apple"}}
        assert doc["model"] == "fake-model"
    assert json.loads(fake.posts()[-1]["body"])["documents"] == \
        ["a green pear", "one red apple", "red car"]  # objects flattened for the upstream


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/chat/completions", b"", 400, "invalid_json"),
    ("/v1/chat/completions",  # nested deeper than the parser goes (before: a 500, a traceback)
     b'{"model": "fake-model", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     "invalid_json"),
    ("/v1/chat/completions", {"model": "fake-model"}, 400, "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": []}, 400, "missing_required_parameter"),
    ("/v1/chat/completions", {"model": 3, "messages": [{}]}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": "fake-model", "messages": "hi"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": "fake-model", "messages": [{}], "stream": "yes"}, 400,
     "invalid_type"),  # (before: taken for a stream)
    ("/v1/chat/completions", b'{"model": "fake-model", "messages": [{}], "temperature": NaN}',
     400, "invalid_json"),  # (before: passed on; Python reads NaN, JSON has none)
    ("/v1/chat/completions", b'{"model": "fake-model", "messages": [{}], "top_p": 1e999}',
     400, "invalid_json"),  # (an alias re-encodes the body: it would send Infinity)
    ("/v1/chat/completions", {"model": "nope", "messages": [{}]}, 404, "model_not_found"),
    ("/v1/embeddings", {"model": "fake-model"}, 400, "missing_required_parameter"),
    ("/v1/rerank", {"model": "fake-model", "query": "q"}, 400, "missing_required_parameter"),
    ("/v1/rerank", {"model": "fake-model", "query": "q", "documents": [3]}, 400, "invalid_type"),
    ("/v1/completions", {"model": "fake-model"}, 400, "missing_required_parameter"),
    ("/v1/nothing", {}, 404, "not_found"),
])
def test_bad_requests_get_openai_envelopes(gateway, fake, path, body, status, code):
    got, headers, raw = post(gateway.port, path, body)
    doc = json.loads(raw)
    assert got == status and doc["error"]["code"] == code, doc
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert headers["content-type"] == "application/json"
    assert fake.posts() == []  # nothing reached the upstream


@pytest.mark.parametrize("path, body, param, code", [
    # a repeated key: routed on its last value, which an upstream may not read (before: the
    # body went on byte for byte; one keeping the first key would serve model "nope")
    ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}],'
     b' "model": "fake-model"}', "model", "duplicate_key"),
    ("/v1/embeddings", b'{"model": "fake-model", "input": "a", "encoding_format": "float", '
     b'"encoding_format": "base64"}', "encoding_format", "duplicate_key"),
    ("/v1/chat/completions", b'{"model": "fake-model", "messages": [{"role": "user"}], '
     b'"stream": false, "str\\u0065am": true}', "stream", "duplicate_key"),  # (spelt apart)
    ("/v1/chat/completions", dict(CHAT, n=129), "n", "integer_above_max_value"),
    ("/v1/completions", {"model": "fake-model", "prompt": "x", "n": 10**6}, "n",
     "integer_above_max_value"),
    ("/v1/chat/completions", dict(CHAT, n=0), "n", "integer_below_min_value"),
    ("/v1/chat/completions", dict(CHAT, n="2"), "n", "invalid_type"),
    ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user"}, "hi"]},
     "messages[1]", "invalid_type"),
    ("/v1/rerank", {"model": "fake-model", "query": "q", "documents": ["a"], "top_n": -1},
     "top_n", "integer_below_min_value"),
])
def test_fields_an_upstream_could_read_otherwise_are_refused_as_openai_does(
        gateway, fake, path, body, param, code):
    status, doc = jpost(gateway.port, path, body)
    assert status == 400 and doc["error"]["code"] == code, doc
    assert doc["error"]["param"] == param and doc["error"]["type"] == "invalid_request_error"
    assert f"'{param}'" in doc["error"]["message"]
    assert fake.posts() == []  # nothing reached the upstream


def test_a_key_repeated_is_refused_at_the_top_level_only(gateway, fake):
    """The top level is what llmhost routes on; a repeat inside a field (a tool's schema)
    changes nothing llmhost reads, so that body goes on untouched, as any other."""
    status, doc = jpost(gateway.port, "/v1/chat/completions",
                        b'{"model": "fake-model", "messages": [], "messages": [{"role": "user"}]}')
    assert status == 400 and doc["error"]["code"] == "duplicate_key" and fake.posts() == []
    assert doc["error"]["message"] == "The request body has the key 'messages' more than " \
        "once; send each key once."
    body = (b'{"model": "fake-model", "messages": [{"role": "user", "content": "a", '
            b'"content": "b"}], "n": 128}')
    status, doc = jpost(gateway.port, "/v1/chat/completions", body)
    assert status == 200 and doc["choices"][0]["message"]["content"] == "echo: b"
    assert fake.posts()[-1]["body"] == body


def test_rate_limit_fields_of_a_remote_api_reach_the_client(gateway, fake):
    """x-ratelimit-* (OpenAI, Groq, Together...), retry-after-ms and x-should-retry (the openai
    client's retry policy reads both) and openai-processing-ms are passed on; nothing else."""
    fields = [("x-ratelimit-remaining-requests", "99"), ("X-RateLimit-Reset-Tokens", "6m0s"),
              ("openai-processing-ms", "12"), ("x-secret-upstream-thing", "no")]
    answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "fake-model",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                           "finish_reason": "stop"}]}
    fake.script({"status": 200, "body": answer, "headers": fields},
                {"status": 429, "headers": [("retry-after-ms", "1500"),
                                            ("x-should-retry", "true")]})
    status, headers, _ = post(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "99"
    assert headers["x-ratelimit-reset-tokens"] == "6m0s" and headers["openai-processing-ms"] == "12"
    assert "x-secret-upstream-thing" not in headers
    status, headers, _ = post(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 429 and headers["retry-after-ms"] == "1500"
    assert headers["x-should-retry"] == "true"


def unpack(raw, coding):
    """A body as a client decodes it from its Content-Encoding ("br": sent as it is by the fake)."""
    return {"gzip": lambda b: zlib.decompress(b, 31), "deflate": zlib.decompress}.get(
        coding, lambda b: b)(raw)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_an_answer_an_upstream_compressed_anyway_is_relayed_with_its_content_encoding(
        gateway, fake, coding):
    """Upstreams are asked for identity (without Accept-Encoding any coding is acceptable,
    RFC 9110 §12.5.3); one that compresses anyway has its answer relayed with the coding
    named, so the client can decode it (before: the field was dropped, the bytes kept)."""
    fake.script({"encoding": coding})
    status, headers, raw = post(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 200 and headers.get("content-encoding") == coding, headers
    doc = json.loads(unpack(raw, coding))
    assert doc["choices"][0]["message"]["content"] == "echo: hello there"
    assert fake.posts()[-1]["headers"]["accept-encoding"] == "identity"


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_answers_llmhost_reads_are_decoded_from_gzip_and_deflate(gateway, fake, coding):
    """Where llmhost reads an answer (base64 embeddings, an error to wrap in OpenAI's
    envelope, an event stream it cuts into events), a compressed one is decoded and goes
    out plain, without the field (before: garbage JSON, or a 502 that could not read it)."""
    fake.script({"encoding": coding}, {"encoding": coding, "status": 400, "body": {
        "error": "bad things"}}, {"encoding": coding})
    status, headers, raw = post(gateway.port, "/v1/embeddings", {
        "model": "fake-model", "input": "a", "encoding_format": "base64"})
    assert status == 200 and "content-encoding" not in headers, raw
    packed = base64.b64decode(json.loads(raw)["data"][0]["embedding"])
    assert struct.unpack("<4f", packed) == (0.5, -1.25, 0.0, 3.0)
    status, headers, raw = post(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 400 and "content-encoding" not in headers
    assert json.loads(raw)["error"]["message"] == "upstream: bad things"
    status, headers, raw = post(gateway.port, "/v1/chat/completions", dict(CHAT, stream=True))
    assert status == 200 and "content-encoding" not in headers
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and b'"error"' not in raw, raw[:300]
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if json.loads(e)["choices"])
    assert text == "echo: hello there"
    assert all(r["headers"].get("accept-encoding") == "identity" for r in fake.requests)


def test_model_lists_compressed_anyway_are_read_by_serve_and_add(fake, tmp_path):
    """The model lists serve (discover entries, health probes) and `add` read are decoded too
    (before: taken for no OpenAI model list); both ask for identity."""
    fake.encoding = "gzip"
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["old"], "discover": True}])
    running = Running(path)
    try:
        ids = [m["id"] for m in json.loads(request(running.port, "GET", "/v1/models")[2])["data"]]
        assert ids == ["fake-model"]
    finally:
        running.stop()
    code, out, err = run_cli(str(tmp_path / "t.json"), "add", "local", fake.url)
    assert code == 0 and "(1 model: fake-model)" in out, err
    assert {r["headers"].get("accept-encoding") for r in fake.requests} == {"identity"}


def test_an_answer_in_a_coding_llmhost_cannot_decode_is_a_clear_502_where_it_must_read(
        gateway, fake):
    """br (or zstd...) where llmhost must read the answer is a 502 naming the coding (before:
    a 502 "could not be read" with a JSON error, or compressed bytes relayed as events)."""
    fake.script({"encoding": "br"}, {"encoding": "br"})
    status, doc = jpost(gateway.port, "/v1/embeddings", {
        "model": "fake-model", "input": "a", "encoding_format": "base64"})
    assert status == 502 and doc["error"]["code"] == "upstream_content_encoding", doc
    assert "encoded as 'br'" in doc["error"]["message"]
    status, doc = jpost(gateway.port, "/v1/chat/completions", dict(CHAT, stream=True))
    assert status == 502 and "encoded as 'br'" in doc["error"]["message"], doc


def test_decode_content_limits_and_forms():
    """Pure: gzip (several members too), deflate in the zlib format or raw (as some servers
    send it), identity; a body that decodes past the limit (a decompression bomb), a cut or
    corrupt one, or a coding zlib does not read, is an UpstreamError."""
    text = b'{"a": 1}' * 100
    raw_deflate = zlib.compressobj(wbits=-15)
    raw_deflate = raw_deflate.compress(text) + raw_deflate.flush()
    assert llmhost.decode_content(text, "") == text == llmhost.decode_content(text, "identity")
    assert llmhost.decode_content(zlib.compress(text), "deflate") == text
    assert llmhost.decode_content(raw_deflate, "deflate") == text
    import gzip
    assert llmhost.decode_content(gzip.compress(text) + gzip.compress(b"!"), "x-gzip") == \
        text + b"!"
    decoder = llmhost.content_decoder("deflate")  # fed byte by byte, raw deflate too
    assert b"".join(decoder.feed(raw_deflate[i:i + 1]) for i in range(len(raw_deflate))) == text
    bomb = gzip.compress(b"\0" * (1 << 20))
    assert llmhost.decode_content(bomb, "gzip", limit=1 << 20) == b"\0" * (1 << 20)
    for body, coding, needle in [
            (bomb, "gzip", "decodes to more than 1048575 bytes"),
            (gzip.compress(text)[:-5], "gzip", "is cut short"),
            (b"not gzip at all", "gzip", "is corrupt"),
            (text, "br", "encoded as 'br'"), (text, "gzip, br", "encoded as 'gzip, br'")]:
        with pytest.raises(llmhost.UpstreamError) as info:
            llmhost.decode_content(body, coding, limit=(1 << 20) - 1)
        assert needle in info.value.message and info.value.status == 502


def test_an_upstream_answer_of_another_shape_is_a_502_that_says_what_was_expected(
        fake, tmp_path, caplog):
    """An entry saved with a server's root as its URL (llama.cpp): embeddings come back as
    llama.cpp's own list of nested arrays. A 502 says what was expected (before: "'list'
    object has no attribute 'get'"), and serve warns of the URL once it listens."""
    fake.root_api = True
    root = fake.url[:-3]
    path = write_registry(tmp_path / "s.json", [
        {"name": "minilm", "url": root, "models": ["fake-model"]}])
    running = Running(path)
    try:
        status, doc = jpost(running.port, "/v1/embeddings", {
            "model": "fake-model", "input": "a", "encoding_format": "base64"})
        assert status == 502 and doc["error"]["code"] == "upstream_format", doc
        assert doc["error"]["message"] == 'upstream embeddings answer is not an OpenAI ' \
            'embeddings object (expected {"data": [...]}, got a list)'
        assert wait_until(lambda: "server minilm: its URL" in caplog.text)
        assert f"{root}/v1/models answers as an OpenAI API" in caplog.text
        assert f"set its url to {root}/v1" in caplog.text
    finally:
        running.stop()


@pytest.mark.parametrize("path, answer, needle", [
    ("/v1/embeddings", {"data": [{"embedding": [[0.5]]}]},
     "not an OpenAI embeddings object (data[0].embedding is not a list of numbers)"),
    ("/v1/embeddings", {"data": ["x"]},
     "not an OpenAI embeddings object (data[0] is a string, not an object)"),
    ("/v1/embeddings", {"object": "list"}, 'got an object without a "data" list'),
    ("/v1/rerank", {"results": [{"index": 0, "relevance_score": "high"}]},
     "relevance_score is a string, not a number"),
    ("/v1/rerank", "ok", 'no results list (expected {"results": [...]}, got a string)'),
])
def test_read_answers_of_the_wrong_shape_are_502s_naming_it(gateway, fake, path, answer,
                                                             needle):
    """Where llmhost reads an answer (base64 embeddings, rerank), every shape it cannot use
    is a 502 that says so, never a Python exception's words."""
    fake.script({"status": 200, "body": answer})
    body = {"model": "fake-model", "input": "a", "encoding_format": "base64"} \
        if path == "/v1/embeddings" else {"model": "fake-model", "query": "q",
                                          "documents": ["a"]}
    status, doc = jpost(gateway.port, path, body)
    assert status == 502 and needle in doc["error"]["message"], doc
    assert doc["error"]["code"] == "upstream_format"


def test_unknown_model_lists_known_ones(gateway):
    status, doc = jpost(gateway.port, "/v1/chat/completions", dict(CHAT, model="gpt-9"))
    assert status == 404 and "fake-model" in doc["error"]["message"]
    assert doc["error"]["param"] == "model"


def test_wrong_method_is_405(gateway):
    status, headers, raw = request(gateway.port, "GET", "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "POST"
    assert json.loads(raw)["error"]["code"] == "method_not_allowed"
    status, headers, raw = request(gateway.port, "POST", "/v1/models")
    assert status == 405 and headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("step, status, fragment", [
    ({"status": 500}, 500, "fake error 500"),  # an OpenAI envelope: passed on as it is
    ({"status": 400, "body": {"error": "bad things"}}, 400, "upstream: bad things"),  # Ollama
    ({"status": 422, "body": {"detail": "field x"}}, 422, "upstream: field x"),  # FastAPI
    ({"status": 500, "raw": b"Internal oops"}, 500, "upstream: Internal oops"),
])
def test_upstream_errors_passed_on_in_envelope(gateway, fake, step, status, fragment):
    fake.script(step)
    got, doc = jpost(gateway.port, "/v1/chat/completions", CHAT)
    assert got == status and fragment in doc["error"]["message"]
    assert doc["error"]["type"] in ("server_error", "invalid_request_error")


def test_an_input_the_model_cannot_read_is_a_400_and_cools_no_server(gateway, fake):
    """llama.cpp answers an image sent to a text-only model with a 500 (its runtime_error):
    the request's fault, so a 400 in the face's envelope, and the server, whatever a client's
    retries, stays up for everyone."""
    refusal = {"status": 500, "body": {"error": {
        "code": 500, "type": "server_error", "message": "image input is not supported - hint: "
        "if this is unexpected, you may need to provide the mmproj"}}}
    for _ in range(llmhost.FAILURES_BEFORE_COOLDOWN + 1):
        fake.script(refusal)
        status, doc = jpost(gateway.port, "/v1/chat/completions", CHAT)
        assert status == 400 and doc["error"]["type"] == "invalid_request_error", doc
        assert "image input is not supported" in doc["error"]["message"]
    fake.script(refusal)
    status, _, raw = post(gateway.port, "/v1/messages", {
        "model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    doc = json.loads(raw)
    assert status == 400 and doc["error"]["type"] == "invalid_request_error", doc
    local = json.loads(request(gateway.port, "GET", "/v1/status")[2])["servers"][0]
    assert local["errors"] == 0 and local["cooldown_seconds"] == 0, local
    fake.script({"status": 500})  # any other 500 is still the server's failure
    assert jpost(gateway.port, "/v1/chat/completions", CHAT)[0] == 500
    local = json.loads(request(gateway.port, "GET", "/v1/status")[2])["servers"][0]
    assert local["errors"] == 1, local


def test_upstream_unreachable_is_502_and_timeout_504(tmp_path, fake):
    path = write_registry(tmp_path / "s.json", [
        {"name": "dead", "url": "http://127.0.0.1:1/v1", "models": ["dead-model"]},
        {"name": "slow", "url": fake.url, "models": ["fake-model"], "timeout": 0.5}])
    running = Running(path)
    try:
        status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, model="dead-model"))
        assert status == 502 and doc["error"]["code"] == "upstream_unreachable"
        fake.script({"delay": 2})
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 504 and doc["error"]["code"] == "upstream_timeout"
    finally:
        running.stop()


def test_a_request_without_a_key_is_refused_before_its_body_is_read(fake, tmp_path):
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, api_keys=["k1"])
    try:
        for expect in (b"", b"Expect: 100-continue\r\n"):
            with socket.create_connection(("127.0.0.1", running.port), timeout=3) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + expect +
                          b"Content-Length: 30000000\r\n\r\n" + b"{" * 65536)
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += s.recv(65536)  # before the fix: nothing until 30 MB had come
            assert answer.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in answer
            assert b"\r\nConnection: close\r\n" in answer
        with socket.create_connection(("127.0.0.1", running.port), timeout=3) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                      b"chunked\r\n\r\n10000\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 401 ")
        status, _, _ = post(running.port, "/v1/chat/completions", CHAT,
                            headers={"Authorization": "Bearer k1"})
        assert status == 200  # a keyed request with a body is read and answered as before
    finally:
        running.stop()


@pytest.mark.parametrize("head, status", [
    (b"POST /v1/nope HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"404"),
    (b"PUT /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"405"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: rebound.example\r\n", b"403"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n",
     b"403")])
def test_a_request_refused_by_its_head_gets_no_100_continue_and_its_body_is_not_read(
        fake, tmp_path, head, status):
    """As nginx, which sends 100 Continue only once it reads the body: a client that waits
    for it sends nothing of a body that would be thrown away."""
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, allowed_hosts=())  # (serve on loopback: the rebinding guard)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=3) as s:
            s.sendall(head + b"Expect: 100-continue\r\nContent-Length: 30000000\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += s.recv(65536)  # (before: 100 Continue, then a wait for 30 MB)
        assert answer.startswith(b"HTTP/1.1 " + status + b" ") and b"100 Continue" not in answer
    finally:
        running.stop()


def test_api_keys(fake, tmp_path):
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"], "api_key_env": "UPKEY"}])
    running = Running(path, api_keys=["k1", "k2"], environ={"UPKEY": "sk-up"})
    try:
        status, headers, raw = post(running.port, "/v1/chat/completions", CHAT)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        assert headers["www-authenticate"].startswith("Bearer")
        status, _, raw = post(running.port, "/v1/chat/completions", CHAT,
                              headers={"Authorization": "Bearer wrong"})
        assert status == 401 and "wrong" not in raw.decode()
        status, _, raw = post(running.port, "/v1/chat/completions", CHAT,
                              headers={"Authorization": "Basic azE6"})
        assert status == 401 and "scheme 'Basic' is not supported" in raw.decode()
        for auth, said in (("sk-secret-key", "needs the scheme"), ("Bearer ", "Missing API key")):
            status, _, raw = post(running.port, "/v1/chat/completions", CHAT,
                                  headers={"Authorization": auth})  # (a key is never echoed)
            assert status == 401 and said in raw.decode() and "secret" not in raw.decode()
        for hdrs in ({"Authorization": "Bearer k2"}, {"x-api-key": "k1"}):
            status, _, _ = post(running.port, "/v1/chat/completions", CHAT, headers=hdrs)
            assert status == 200
        assert request(running.port, "GET", "/health")[0] == 200  # stays open
        assert request(running.port, "GET", "/v1/models")[0] == 401
        # the client's key never goes upstream; the entry's own key does
        assert fake.posts()[-1]["headers"]["authorization"] == "Bearer sk-up"
        # the CLI reads $LLMHOST_API_KEY the way serve does (blanks skipped)
        code, out, err = run_cli("unused", "status", "--url", f"http://127.0.0.1:{running.port}",
                                 environ={"LLMHOST_API_KEY": " , k2"})
        assert code == 0, err
    finally:
        running.stop()


def test_a_non_ascii_api_key_matches_sent_as_utf8_or_as_latin1(fake, tmp_path):
    """Header bytes are read as latin-1: a key is compared as the bytes sent, so curl's UTF-8
    matches (before: only latin-1 did), as does the latin-1 of http.client and browsers."""
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    # ('à' ends in \xa0 in UTF-8, a byte str.strip() takes for a blank)
    running = Running(path, api_keys=["clé-à", "键-密钥"])
    try:
        def send(field, value):
            raw = raw_exchange(running.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               + field + b": " + value + b"\r\nConnection: close\r\n\r\n")
            return parse_response(raw)[0]

        for field, prefix in ((b"Authorization", b"Bearer "), (b"X-Api-Key", b"")):
            for value, expected in (("clé-à".encode(), 200), ("clé-à".encode("latin-1"), 200),
                                    ("键-密钥".encode(), 200), ("clé-".encode(), 401),
                                    ("cle-a".encode(), 401),
                                    ("键-密钥".encode("gb18030"), 401)):
                assert send(field, prefix + value) == expected, (field, value)
        status, _, _ = request(running.port, "GET", "/v1/models",
                               headers={"Authorization": "Bearer clé-à"})  # (as latin-1)
        assert status == 200
        for key in ("clé-à", "键-密钥"):  # the CLI sends the key as UTF-8, as curl does
            code, out, err = run_cli("unused", "status", "--url",
                                     f"http://127.0.0.1:{running.port}",
                                     environ={"LLMHOST_API_KEY": key})
            assert code == 0, err
    finally:
        running.stop()


def test_alias_and_pinned_server(fake, tmp_path):
    other = FakeUpstream(models=["fake-model"])
    try:
        path = write_registry(tmp_path / "s.json", [
            {"name": "a", "url": fake.url, "models": ["fake-model"], "alias": "public"},
            {"name": "b", "url": other.url, "models": ["fake-model"]}])
        running = Running(path)
        try:
            status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, model="public"))
            assert status == 200 and json.loads(fake.posts()[-1]["body"])["model"] == "fake-model"
            ids = [m["id"] for m in json.loads(request(running.port, "GET", "/v1/models")[2])["data"]]
            assert ids == ["fake-model", "public"]
            for _ in range(3):
                jpost(running.port, "/v1/chat/completions", dict(CHAT, model="b/fake-model"))
            assert len(other.posts()) == 3 and len(fake.posts()) == 1
            # half an emoji (a lone surrogate escape) survives the model name's rewrite
            status, doc = jpost(running.port, "/v1/chat/completions", dict(
                CHAT, model="public", messages=[{"role": "user", "content": "hi \ud83d"}]))
            assert status == 200 and b"hi \\ud83d" in fake.posts()[-1]["body"], doc
        finally:
            running.stop()
    finally:
        other.close()


def test_upstream_failures_and_cooldowns_are_logged(tmp_path, caplog):
    """As nginx's error log ("connect() failed", "upstream server temporarily disabled"): the
    access log says only 502, and a stream that dies mid-answer was sent as a 200."""
    path = write_registry(tmp_path / "s.json", [
        {"name": "dead", "url": "http://127.0.0.1:1/v1", "models": ["m"]}])
    running = Running(path)
    try:
        for _ in range(llmhost.FAILURES_BEFORE_COOLDOWN):
            assert jpost(running.port, "/v1/chat/completions", dict(CHAT, model="m"))[0] == 502
    finally:
        running.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("server dead")]
    assert len(lines) == llmhost.FAILURES_BEFORE_COOLDOWN and "cannot connect" in lines[0], lines
    assert lines[-1].endswith(f"({llmhost.FAILURES_BEFORE_COOLDOWN} failures in a row); "
                              f"cooling down for {llmhost.COOLDOWN_BASE:g}s")


def test_serve_warns_of_an_upstream_key_variable_that_is_not_set(fake, tmp_path, caplog):
    path = write_registry(tmp_path / "s.json", [
        {"name": "keyed", "url": fake.url, "models": ["fake-model"],
         "api_key_env": "KEYED_API_KEY"}])
    running = Running(path, environ={})
    try:
        assert "server keyed: environment variable KEYED_API_KEY is not set: its requests go " \
            "without an API key" in caplog.text
        assert jpost(running.port, "/v1/chat/completions", CHAT)[0] == 200  # served anyway
    finally:
        running.stop()


def test_discover_rereads_models_at_start(fake, tmp_path):
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["old"], "discover": True}])
    fake.models = ["new-1", "new-2"]
    running = Running(path)
    try:
        ids = [m["id"] for m in json.loads(request(running.port, "GET", "/v1/models")[2])["data"]]
        assert ids == ["new-1", "new-2"]
        fake.models = ["new-1", "new-2", "pulled-later"]  # (ollama pull) then SIGHUP, or any
        running.call(running.gateway.reload())  # edit of servers.json: both reload
        ids = [m["id"] for m in json.loads(request(running.port, "GET", "/v1/models")[2])["data"]]
        assert ids == ["new-1", "new-2", "pulled-later"]
    finally:
        running.stop()


def test_keep_alive_reuses_connections_both_sides(gateway, fake):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    sockets = []  # (http.client opens a new one, silently, if the last was closed)
    for i in range(5):
        conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Connection") is None
        resp.read()
        sockets.append(conn.sock)
    conn.close()
    assert sockets[0] is not None and all(s is sockets[0] for s in sockets)  # client side
    assert len({r["peer"] for r in fake.posts()}) == 1  # upstream side: one connection
    ids = {r["headers"].get("x-request-id") for r in fake.posts()}
    assert len(ids) == 5  # each request got its own id, forwarded upstream


def test_request_id_accepted_or_minted(gateway, fake):
    status, headers, _ = post(gateway.port, "/v1/chat/completions", CHAT,
                              headers={"X-Request-Id": "abc-123"})
    assert headers["x-request-id"] == "abc-123"
    assert fake.posts()[-1]["headers"]["x-request-id"] == "abc-123"
    status, headers, _ = post(gateway.port, "/v1/chat/completions", CHAT,
                              headers={"X-Request-Id": "bad id\twith space"})
    assert headers["x-request-id"] != "bad id\twith space" and headers["x-request-id"]


def test_chunked_request_body_and_100_continue(gateway, fake):
    body = json.dumps(CHAT).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    chunked = b"%x;note=1\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (
        10, body[:10], len(body) - 10, body[10:])
    raw = raw_exchange(gateway.port, head + chunked, half_close=False)
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert fake.posts()[-1]["body"] == body


def test_http10_keep_alive_and_no_100_continue(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body, _ = parse_response(s.recv(65536))
        assert status == 200 and headers["connection"] == "keep-alive"
        body = json.dumps(CHAT).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        raw = s.recv(65536)
        assert raw.startswith(b"HTTP/1.0 200 ")  # no interim 100 for an HTTP/1.0 client
    # chunked is no HTTP/1.0 framing (RFC 9112 §6.1): answered, then the connection is closed
    raw = raw_exchange(gateway.port, b"POST /v1/chat/completions HTTP/1.0\r\nConnection: "
                       b"keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                       b"GET /health HTTP/1.0\r\n\r\n" % (len(body), body), half_close=False)
    status, headers, _, rest = parse_response(raw)
    assert status == 200 and headers.get("connection") == "close" and rest == b""


def test_http10_client_gets_close_delimited_stream(gateway):
    body = json.dumps(dict(CHAT, stream=True)).encode()
    raw = raw_exchange(gateway.port, b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: "
                       b"%d\r\n\r\n%s" % (len(body), body), half_close=False)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert sse_events(payload)[-1] == "[DONE]"



# =============================================================================
# Responses API: /v1/responses translated onto the fake's chat completions
# =============================================================================

def rpost(port, body, **kw):
    status, _, raw = post(port, "/v1/responses", body, **kw)
    return status, json.loads(raw)


def response_events(raw):
    """A Responses stream -> its events (the data of each), checking each `event:` names the
    type its data says."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = block.decode().split("\n")
        names = [line[7:] for line in lines if line.startswith("event: ")]
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if data:
            doc = json.loads("\n".join(data))
            assert names == [doc["type"]], (names, doc["type"])
            events.append(doc)
    return events


def rstream(port, body, **kw):
    status, headers, raw = post(port, "/v1/responses", dict(body, stream=True), **kw)
    return status, headers, response_events(raw) if status == 200 else json.loads(raw)


def upstream_bodies(fake):
    return [json.loads(r["body"]) for r in fake.posts()]


def output_of(doc, kind):
    return [item for item in doc["output"] if item["type"] == kind]


def test_responses_create_translates_onto_chat_and_answers_a_response(gateway, fake):
    status, doc = rpost(gateway.port, {
        "model": "fake-model", "instructions": "Be brief.", "input": "hello there",
        "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9, "metadata": {"k": "v"}})
    assert status == 200, doc
    (sent,) = upstream_bodies(fake)
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello there"}]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (50, 0.2, 0.9)
    assert "metadata" not in sent and "instructions" not in sent and "input" not in sent
    assert doc["object"] == "response" and doc["id"].startswith("resp_")
    assert (doc["status"], doc["model"], doc["metadata"]) == ("completed", "fake-model", {"k": "v"})
    (message,) = doc["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "output_text", "text": "echo: hello there",
                                   "annotations": []}]
    assert doc["usage"] == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10,
                            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                            "output_tokens_details": {"reasoning_tokens": 0}}
    for field in ("created_at", "parallel_tool_calls", "tool_choice", "tools", "error",
                  "incomplete_details", "instructions", "temperature", "top_p"):
        assert field in doc, field


def test_responses_image_input_reaches_the_upstream_as_an_image_url(gateway, fake):
    url = f"data:image/png;base64,{PNG_1PX}"
    status, doc = rpost(gateway.port, {"model": "fake-model", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is it"},
        {"type": "input_image", "image_url": url, "detail": "low"}]}]})
    assert status == 200, doc
    assert doc["output"][0]["content"][0]["text"] == "echo: what is it [1 images]"
    assert upstream_bodies(fake)[0]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "what is it"},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}]
    status, doc = rpost(gateway.port, {"model": "fake-model", "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1"}]}]})
    assert status == 400 and "file_id" in doc["error"]["message"], doc


def test_requests_leave_nothing_for_the_cyclic_gc(gateway):
    """What serving a request builds is freed by reference counting once it is answered: none
    of it waits for the cyclic GC, whose passes over a heap of such garbage stalled every
    stream (a Responses render and its request referred to each other, so did a client
    connection and its Wire: 6 ms pauses at 50 streams, Responses' first-token p99 +3 to +8 ms
    over chat's). Objects of llmhost's classes that only the GC finds are such garbage."""
    import gc
    MESSAGES = [{"role": "user", "content": "hi"}]
    bodies = [("/v1/chat/completions", {"model": "fake-model", "messages": MESSAGES}),
              ("/v1/chat/completions", {"model": "fake-model", "messages": MESSAGES,
                                        "stream": True}),
              ("/v1/responses", {"model": "fake-model", "input": "hi"}),
              ("/v1/responses", {"model": "fake-model", "input": "hi", "stream": True}),
              ("/v1/messages", {"model": "fake-model", "max_tokens": 20, "messages": MESSAGES}),
              ("/v1/messages", {"model": "fake-model", "max_tokens": 20, "messages": MESSAGES,
                                "stream": True}),
              ("/v1/chat/completions", {"model": "no-such-model", "messages": MESSAGES})]
    for path, body in bodies:  # (first uses: imports, the response store)
        post(gateway.port, path, body)
    connections = gateway.gateway.http.connections
    assert wait_until(lambda: not connections)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # (what a pass finds is kept in gc.garbage, not freed)
    try:
        for path, body in bodies * 2:
            status, _, _ = post(gateway.port, path, body)
            assert status == (404 if body["model"] == "no-such-model" else 200)
        assert wait_until(lambda: not connections)  # (each connection's end is seen)
        gc.collect()
        found = sorted({type(o).__qualname__ for o in gc.garbage
                        if type(o).__module__ == llmhost.__name__})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert found == []


def test_responses_stream_events_in_order_with_sequence_numbers(gateway, fake):
    fake.script({"reasoning": "think first", "pace": 0.01})
    status, headers, events = rstream(gateway.port, {"model": "fake-model", "input": "hello there"})
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    created, final = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"] == final["id"] and final["status"] == "completed"
    reasoning, message = final["output"]
    assert reasoning["type"] == "reasoning" and \
        reasoning["content"] == [{"type": "reasoning_text", "text": "think first"}]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == message["content"][0]["text"] == "echo: hello there"
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert {(e["item_id"], e["output_index"]) for e in deltas} == {(message["id"], 1)}
    assert final["usage"]["total_tokens"] == 10
    sent = upstream_bodies(fake)[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("finish, tools", [("stop", False), ("length", False), (None, True)])
def test_responses_templated_events_are_the_bytes_event_makes(gateway, fake, monkeypatch, finish,
                                                             tools):
    """The events a stream writes from templates (a message's added, delta and done events)
    are, byte for byte, what the renderer's generic event() makes of the same fields."""
    body = {"model": "fake-model", "input": 'say "h\u00e9" \\ \u2603 \U0001f600\nnow',
            "instructions": "Be brief, \u00e9.", "metadata": {"k": "v\u2603"}, "temperature": 0.5,
            "top_p": 0.9, "user": "u1", "max_output_tokens": 50}
    if tools:  # (the fake calls the first tool given)
        body["tools"] = [weather_tool()]
    raws = []
    for generic in (False, True):
        if generic:
            monkeypatch.setattr(llmhost.ResponsesRender, "templated", lambda self: False)
            monkeypatch.setattr(llmhost.ResponsesRender, "response_json", lambda self, doc=None:
                                llmhost.json_bytes(doc or self.response("in_progress", [])))
        fake.script({"reasoning": "think first", "finish": finish})
        status, _, raw = post(gateway.port, "/v1/responses", dict(body, stream=True))
        assert status == 200, raw
        raws.append(re.sub(rb'"(resp|rs|msg|fc)_[0-9a-f]{48}"', rb'"\1_"', re.sub(
            rb'"(created_at|completed_at)":\d+', rb'"\1":0', raw)))
    assert raws[0] == raws[1]
    kinds = [e["type"] for e in response_events(raws[0])]
    assert kinds.count("response.output_text.delta") == (0 if tools else 6)
    assert ("response.function_call_arguments.done" in kinds) == tools
    assert kinds[-1] == ("response.incomplete" if finish == "length" else "response.completed")


@pytest.mark.parametrize("body", [
    {"model": "m", "input": "hi"},
    {"model": "m\u00e9", "input": "hi", "instructions": "Be brief, \u2603.", "max_output_tokens": 5,
     "metadata": {"k": "v\u00e9"}, "temperature": 0.5, "top_p": 1, "user": "u",
     "parallel_tool_calls": False, "previous_response_id": "resp_1", "tool_choice": "required",
     "reasoning": {"effort": "low"}, "text": {"format": {"type": "json_object"}},
     "tools": [{"type": "function", "name": "f", "parameters": {}},
               {"type": "mcp", "server_label": "s", "headers": {"a": "b"}}]},
    {"model": "m", "input": "hi", "instructions": [{"role": "system", "content": "x"}],
     "tool_choice": {"type": "function", "name": "f"}, "temperature": 1e-7},
    {"model": "m", "input": "hi", "instructions": "half \ud83d"},  # (no UTF-8: all escaped)
])
@pytest.mark.parametrize("store", [True, False])
def test_responses_response_json_is_json_bytes_of_the_response(body, store):
    """A stream's Responses are encoded with their echo of the request encoded once
    (response_json): byte for byte what json_bytes makes of the whole Response."""
    request = types.SimpleNamespace(conn=None)
    render = llmhost.ResponsesRender(request, body, llmhost.new_item_id("resp"), True, rounds=8,
                                     names={}, rules={}, approved=[], store=store)
    message = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "h\u00e9 \U0001f600", "annotations": []}]}
    usage = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
             "input_tokens_details": {"cached_tokens": 0}}
    for doc in (render.response("in_progress", []),
                render.response("completed", [message], usage),
                render.response("incomplete", [message], usage,
                                incomplete={"reason": "max_output_tokens"}),
                render.response("failed", [message], error={"code": "server_error",
                                                            "message": "upstream: \u2603"}),
                render.response("completed", [dict(message, content=[
                    {"type": "output_text", "text": "half \udc00", "annotations": []}])])):
        assert render.response_json(doc) == llmhost.json_bytes(doc)
    assert render.response_json() == llmhost.json_bytes(render.response("in_progress", []))


@pytest.mark.parametrize("texts", [["h\u00e9 ", "\U0001f600"], ["half \ud83d"],
                                   ["why", None, "answer"]])  # (None: a reasoning item)
def test_responses_streamed_items_spliced_into_the_response_are_its_json(texts):
    """The final Response's output is spliced from the JSON of the messages streamed
    (close_item's): byte for byte what json_bytes makes of it; a lone surrogate in one (no
    UTF-8) and an item not streamed from a template take json_bytes."""
    written = []
    conn = types.SimpleNamespace(gone=False, write_chunk=written.append,
                                 start_stream=lambda *args: True)
    request = types.SimpleNamespace(conn=conn, status=None)
    render = llmhost.ResponsesRender(request, {"model": "m\u00e9", "input": "x"},
                                     llmhost.new_item_id("resp"), True, rounds=8, names={},
                                     rules={}, approved=[], store=False)
    render.opened(None)
    reasoning = False
    for text in texts:
        if text is None:
            reasoning = True
            continue
        render.text(text, reasoning=reasoning)
        reasoning = False
    render.close_item()
    assert bool(render.items_json) == ("\ud83d" not in texts[0])  # (the spliced way taken)
    doc = render.response("completed", render.output, {"input_tokens": 1})
    assert render.response_json(doc) == llmhost.json_bytes(doc)
    done = llmhost.json_loads(written[-1].split(b"data: ")[-1])
    assert done["type"] == "response.output_item.done" and done["item"] == render.output[-1]


def test_responses_stream_sends_text_as_it_comes_and_a_death_ends_it_with_response_failed(
        gateway, fake):
    stall = threading.Event()
    fake.script({"stall_after": 1, "stall": stall})
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/responses", json.dumps(
        {"model": "fake-model", "input": "hello there", "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = b""
    while b"response.output_text.delta" not in seen:  # the first word, while the upstream
        seen += resp.readline()  # still holds the rest
    assert b'"delta":"echo:"' in resp.readline()
    stall.set()  # the upstream dies mid-stream
    events = response_events(seen + resp.read())
    conn.close()
    assert events[-1]["type"] == "response.failed", [e["type"] for e in events]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["type"] == "message"
    assert not any(e["type"] == "response.completed" for e in events)


def test_responses_a_refusal_before_the_first_event_is_an_http_status(gateway, fake):
    fake.script({"status": 429, "headers": [("Retry-After", "7")]})
    status, headers, doc = rstream(gateway.port, {"model": "fake-model", "input": "hi"})
    assert status == 429 and headers["retry-after"] == "7"
    assert doc["error"]["type"] == "server_error" and "fake error 429" in doc["error"]["message"]
    status, doc = rpost(gateway.port, {"model": "nope", "input": "hi"})
    assert status == 404 and doc["error"]["type"] == "invalid_request_error"


def weather_tool(**extra):
    return dict({"type": "function", "name": "get_weather", "description": "Weather.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                 "strict": True}, **extra)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_function_tool_round_trip_with_previous_response_id(gateway, fake, stream):
    body = {"model": "fake-model", "input": "weather?", "tools": [weather_tool()],
            "tool_choice": "required", "parallel_tool_calls": False}
    if stream:
        status, _, events = rstream(gateway.port, body)
        first = events[-1]["response"]
        kinds = [e["type"] for e in events]
        assert kinds.index("response.function_call_arguments.delta") < \
            kinds.index("response.function_call_arguments.done") < kinds.index("response.completed")
    else:
        status, first = rpost(gateway.port, body)
    assert status == 200, first
    sent = upstream_bodies(fake)[0]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather.", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    assert (sent["tool_choice"], sent["parallel_tool_calls"]) == ("required", False)
    (call,) = output_of(first, "function_call")
    assert (call["call_id"], call["name"], json.loads(call["arguments"])["city"]) == \
        ("call_1", "get_weather", "Paris")
    assert call["id"].startswith("fc_") and call["status"] == "completed"
    status, second = rpost(gateway.port, {
        "model": "fake-model", "previous_response_id": first["id"], "tools": [weather_tool()],
        "input": [{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]})
    assert status == 200, second
    assert second["output"][0]["content"][0]["text"] == "tool result: sunny"
    assert second["previous_response_id"] == first["id"]
    messages = upstream_bodies(fake)[1]["messages"]
    assert messages == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


def test_responses_function_tool_round_trip_with_the_input_replayed(gateway, fake):
    asked = [{"role": "developer", "content": "Use tools."},
             {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]}]
    status, first = rpost(gateway.port, {"model": "fake-model", "input": asked, "store": False,
                                         "instructions": "Be brief.", "tools": [weather_tool()]})
    assert status == 200, first
    replay = asked + first["output"] + [{"type": "function_call_output", "call_id": "call_1",
                                         "output": [{"type": "input_text", "text": "windy"}]}]
    status, second = rpost(gateway.port, {"model": "fake-model", "input": replay,
                                          "tools": [weather_tool()], "store": False})
    assert status == 200, second
    assert second["output"][0]["content"][0]["text"] == "tool result: windy"
    assert upstream_bodies(fake)[0]["messages"][0] == {"role": "system",
                                                       "content": "Be brief.\n\nUse tools."}
    messages = upstream_bodies(fake)[1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2]["tool_calls"][0]["id"] == "call_1"


def test_responses_text_format_json_schema_reaches_the_upstream_as_response_format(gateway, fake):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    status, doc = rpost(gateway.port, {"model": "fake-model", "input": "a city", "text": {
        "format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}}})
    assert status == 200, doc
    assert upstream_bodies(fake)[0]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "city", "schema": schema, "strict": True}}
    assert doc["text"]["format"]["name"] == "city"
    status, doc = rpost(gateway.port, {"model": "fake-model", "input": "a city",
                                       "text": {"format": {"type": "json_schema"}}})
    assert status == 400 and doc["error"]["param"] == "text.format.schema"


@pytest.mark.parametrize("stream", [False, True])
def test_responses_a_length_stop_is_incomplete(gateway, fake, stream):
    fake.script({"finish": "length"})
    body = {"model": "fake-model", "input": "hello there", "max_output_tokens": 3}
    if stream:
        status, _, events = rstream(gateway.port, body)
        assert events[-1]["type"] == "response.incomplete"
        doc = events[-1]["response"]
    else:
        status, doc = rpost(gateway.port, body)
    assert status == 200
    assert (doc["status"], doc["incomplete_details"]) == ("incomplete",
                                                          {"reason": "max_output_tokens"})
    assert doc["output"][0]["status"] == "incomplete"
    assert upstream_bodies(fake)[0]["max_tokens"] == 3


def test_responses_retrieve_input_items_and_delete(gateway, fake):
    status, doc = rpost(gateway.port, {"model": "fake-model", "input": [
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"}]})
    assert status == 200
    rid = doc["id"]
    status, _, raw = request(gateway.port, "GET", f"/v1/responses/{rid}")
    assert status == 200 and json.loads(raw) == doc
    status, _, raw = request(gateway.port, "GET", f"/v1/responses/{rid}/input_items")
    listed = json.loads(raw)
    texts = [item["content"][0]["text"] for item in listed["data"]]
    assert status == 200 and texts == ["three", "two", "one"]  # newest first, as at OpenAI
    assert listed["first_id"] == listed["data"][0]["id"] and listed["has_more"] is False
    assert [i["content"][0]["type"] for i in listed["data"]] == ["input_text", "output_text",
                                                                  "input_text"]
    status, _, raw = request(gateway.port, "GET",
                             f"/v1/responses/{rid}/input_items?order=asc&limit=2")
    page = json.loads(raw)
    assert [i["content"][0]["text"] for i in page["data"]] == ["one", "two"] and page["has_more"]
    status, _, raw = request(gateway.port, "GET", f"/v1/responses/{rid}/input_items?after="
                             f"{page['last_id']}&order=asc")
    assert [i["content"][0]["text"] for i in json.loads(raw)["data"]] == ["three"]
    status, _, raw = request(gateway.port, "DELETE", f"/v1/responses/{rid}")
    assert status == 200 and json.loads(raw) == {"id": rid, "object": "response", "deleted": True}
    for path in (f"/v1/responses/{rid}", f"/v1/responses/{rid}/input_items"):
        status, _, raw = request(gateway.port, "GET", path)
        assert status == 404 and rid in json.loads(raw)["error"]["message"]
    status, _, raw = request(gateway.port, "DELETE", f"/v1/responses/{rid}")
    assert status == 404


def test_responses_are_kept_in_a_private_file_that_a_restart_reads(fake, tmp_path):
    path = write_registry(tmp_path / "servers.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path)
    try:
        status, doc = rpost(running.port, {"model": "fake-model", "input": "remember"})
    finally:
        running.stop()
    store = tmp_path / "servers.json.responses.sqlite"
    assert os.stat(store).st_mode & 0o777 == 0o600
    running = Running(path)
    try:
        status, again = rpost(running.port, {"model": "fake-model", "input": "and?",
                                             "previous_response_id": doc["id"]})
        assert status == 200, again
        assert [m["content"] for m in upstream_bodies(fake)[-1]["messages"]] == \
            ["remember", "echo: remember", "and?"]
    finally:
        running.stop()


def test_responses_store_prunes_by_count_and_age(tmp_path):
    store = llmhost.ResponseStore(str(tmp_path / "r.sqlite"), max_age=3600, max_count=2,
                                  prune_saves=1)

    async def run():
        for i in range(3):
            await store.save(f"resp_{i}", "", {"id": i}, [], [])
        kept = [await store.get(f"resp_{i}", "", "response") for i in range(3)]
        store.max_age = -1  # everything is older than that now
        expired = await store.get("resp_2", "", "response")
        return kept, expired
    try:
        (kept, expired) = asyncio.run(run())
    finally:
        store.close()
    assert kept == [None, '{"id":1}', '{"id":2}'] and expired is None


def test_responses_are_only_for_the_key_that_made_them(fake, tmp_path):
    path = write_registry(tmp_path / "servers.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, api_keys=("key-one", "key-two"))
    one, two = ({"Authorization": f"Bearer key-{k}"} for k in ("one", "two"))
    try:
        status, doc = rpost(running.port, {"model": "fake-model", "input": "mine"}, headers=one)
        assert status == 200
        for method, path in (("GET", f"/v1/responses/{doc['id']}"),
                             ("GET", f"/v1/responses/{doc['id']}/input_items"),
                             ("DELETE", f"/v1/responses/{doc['id']}")):
            status, _, raw = request(running.port, method, path, headers=two)
            assert status == 404, (method, path)
        status, other = rpost(running.port, {"model": "fake-model", "input": "x",
                                             "previous_response_id": doc["id"]}, headers=two)
        assert status == 400 and other["error"]["code"] == "previous_response_not_found"
        status, _, raw = request(running.port, "GET", f"/v1/responses/{doc['id']}", headers=one)
        assert status == 200 and json.loads(raw)["id"] == doc["id"]
        with open(str(tmp_path / "servers.json.responses.sqlite"), "rb") as f:
            assert b"key-one" not in f.read()  # a hash of it, never the key
    finally:
        running.stop()


def test_responses_store_false_and_no_store_keep_nothing(fake, tmp_path, gateway):
    status, doc = rpost(gateway.port, {"model": "fake-model", "input": "x", "store": False})
    assert status == 200 and doc["store"] is False
    status, _, _ = request(gateway.port, "GET", f"/v1/responses/{doc['id']}")
    assert status == 404
    status, doc = rpost(gateway.port, {"model": "fake-model", "input": "x",
                                       "previous_response_id": doc["id"]})
    assert status == 400 and doc["error"]["param"] == "previous_response_id"
    other = tmp_path / "other"
    other.mkdir()
    path = write_registry(other / "servers.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, store_responses=False)
    try:
        status, doc = rpost(running.port, {"model": "fake-model", "input": "x"})
        assert status == 200 and doc["store"] is False
        status, _, raw = request(running.port, "GET", f"/v1/responses/{doc['id']}")
        assert status == 404 and "--no-store" in json.loads(raw)["error"]["message"]
        status, doc = rpost(running.port, {"model": "fake-model", "input": "x",
                                           "previous_response_id": doc["id"]})
        assert status == 400 and "--no-store" in doc["error"]["message"]
    finally:
        running.stop()
    assert not os.path.exists(other / "servers.json.responses.sqlite")
    assert llmhost.build_parser().parse_args(["serve", "--no-store"]).no_store is True


def test_responses_an_unknown_previous_response_id_is_a_clear_400(gateway):
    status, doc = rpost(gateway.port, {"model": "fake-model", "input": "x",
                                       "previous_response_id": "resp_nope"})
    assert status == 400
    assert doc["error"] == {"message": "Previous response with id 'resp_nope' not found.",
                            "type": "invalid_request_error", "param": "previous_response_id",
                            "code": "previous_response_not_found"}


def test_responses_input_tokens_is_an_estimate_that_says_so(gateway, fake):
    status, doc = jpost(gateway.port, "/v1/responses/input_tokens", {
        "model": "fake-model", "instructions": "x" * 400, "input": "y" * 400})
    assert status == 200 and doc["object"] == "response.input_tokens"
    assert doc["estimated"] is True and 200 <= doc["input_tokens"] < 220
    assert fake.posts() == []  # (counted here, not asked of the model)


CODEX_BODY = {  # what Codex CLI sends (shared/CLIENT_NOTES.md), trimmed
    "model": "fake-model", "instructions": "You are Codex.", "stream": True, "store": False,
    "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0199a1b2-c3d4", "client_metadata": {"session": "s1"},
    "tool_choice": "auto", "parallel_tool_calls": True,
    "text": {"verbosity": "medium"},
    "tools": [
        {"type": "namespace", "name": "mcp__docs__", "description": "Docs server.", "tools": [
            {"type": "function", "name": "search", "description": "Search docs.",
             "strict": False, "parameters": {"type": "object", "properties": {
                 "q": {"type": "string"}}}},
            {"type": "custom", "name": "raw", "description": "Free text."}]},
        {"type": "function", "name": "shell", "description": "Run a command.", "strict": False,
         "parameters": {"type": "object", "properties": {"command": {"type": "array",
                                                                     "items": {"type": "string"}}}}},
        {"type": "custom", "name": "apply_patch", "description": "Patch files.",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
        {"type": "web_search"}],
    "input": [
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "<permissions>read-only</permissions>"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "<environment_context/>"},
            {"type": "input_text", "text": "list the files"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA..."}]}


def test_responses_a_codex_request_is_accepted(gateway, fake):
    status, _, events = rstream(gateway.port, CODEX_BODY)
    assert status == 200, events
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed" and final["store"] is False
    sent = upstream_bodies(fake)[0]
    assert sent["messages"] == [
        {"role": "system", "content": "You are Codex.\n\n<permissions>read-only</permissions>"},
        {"role": "user", "content": "<environment_context/>\n\nlist the files"}]
    assert [t["function"]["name"] for t in sent["tools"]] == ["mcp__docs__search", "shell"]
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is True
    for field in ("reasoning", "include", "prompt_cache_key", "client_metadata", "store", "text",
                  "response_format"):
        assert field not in sent, field
    # the model calls the namespace's function (the fake calls the first tool offered)
    (call,) = output_of(final, "function_call")
    assert (call["namespace"], call["name"]) == ("mcp__docs__", "search")
    replay = CODEX_BODY["input"] + final["output"] + [
        {"type": "function_call_output", "call_id": call["call_id"], "output": "README.md"}]
    status, _, events = rstream(gateway.port, dict(CODEX_BODY, input=replay))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "tool result: README.md"
    assert upstream_bodies(fake)[1]["messages"][2]["tool_calls"][0]["function"]["name"] == \
        "mcp__docs__search"
    status, doc = rpost(gateway.port, dict(CODEX_BODY, stream=False,
                                           tool_choice={"type": "web_search"}))
    assert status == 400 and doc["error"]["param"] == "tool_choice"


RESPONSES_MCP = {"type": "mcp", "server_label": "t", "allowed_tools": ["echo"]}


@pytest.mark.parametrize("stream", [False, True])
def test_responses_mcp_tools_run_in_llmhost_with_list_and_call_items(mcp_env, stream):
    running, fake = mcp_env
    fake.steps.clear()
    fake.requests.clear()
    fake.script({"calls": [("t__echo", {"text": "hi"})]})
    body = {"model": "fake-model", "input": "go", "tools": [RESPONSES_MCP]}
    if stream:
        status, _, events = rstream(running.port, body, timeout=TIMEOUT * 3)
        doc = events[-1]["response"]
        kinds = [e["type"] for e in events]
        assert kinds[:12] == [
            "response.created", "response.in_progress",
            "response.output_item.added", "response.mcp_list_tools.in_progress",
            "response.mcp_list_tools.completed", "response.output_item.done",
            "response.output_item.added", "response.mcp_call_arguments.delta",
            "response.mcp_call_arguments.done", "response.mcp_call.in_progress",
            "response.mcp_call.completed", "response.output_item.done"], kinds
        assert kinds[-1] == "response.completed"
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
    else:
        status, doc = rpost(running.port, body, timeout=TIMEOUT * 3)
    assert status == 200, doc
    listing, call, message = doc["output"]
    assert listing["type"] == "mcp_list_tools" and listing["server_label"] == "t"
    assert [t["name"] for t in listing["tools"]] == ["echo"]
    assert listing["tools"][0]["input_schema"]["properties"]["text"]["type"] == "string"
    assert (call["type"], call["server_label"], call["name"], json.loads(call["arguments"]),
            call["output"], call["status"]) == ("mcp_call", "t", "echo", {"text": "hi"}, "hi",
                                                "completed")
    assert message["content"][0]["text"] == "tool result: hi"
    assert doc["usage"]["total_tokens"] == 16  # both rounds
    first, second = upstream_bodies(fake)
    assert [t["function"]["name"] for t in first["tools"]] == ["t__echo"]
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_0", "content": "hi"}


@pytest.mark.parametrize("replayed", [False, True])
def test_responses_mcp_require_approval_round_trip(mcp_env, replayed):
    running, fake = mcp_env
    fake.steps.clear()
    fake.requests.clear()
    fake.script({"calls": [("t__echo", {"text": "ok?"})]})
    tool = dict(RESPONSES_MCP, require_approval="always")
    asked = [{"role": "user", "content": "go"}]
    status, first = rpost(running.port, {"model": "fake-model", "input": asked, "tools": [tool]},
                          timeout=TIMEOUT * 3)
    assert status == 200, first
    (ask,) = output_of(first, "mcp_approval_request")
    assert (ask["server_label"], ask["name"], json.loads(ask["arguments"])) == \
        ("t", "echo", {"text": "ok?"})
    assert not output_of(first, "mcp_call") and len(fake.posts()) == 1  # nothing ran
    approve = {"type": "mcp_approval_response", "approval_request_id": ask["id"], "approve": True}
    body = {"model": "fake-model", "tools": [tool], "input": asked + first["output"] + [approve]} \
        if replayed else {"model": "fake-model", "tools": [tool], "input": [approve],
                          "previous_response_id": first["id"]}
    status, second = rpost(running.port, body, timeout=TIMEOUT * 3)
    assert status == 200, second
    (call,) = output_of(second, "mcp_call")
    assert (call["approval_request_id"], call["output"]) == (ask["id"], "ok?")
    assert second["output"][-1]["content"][0]["text"] == "tool result: ok?"
    messages = upstream_bodies(fake)[1]["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == ask["id"]
    assert messages[-1] == {"role": "tool", "tool_call_id": ask["id"], "content": "ok?"}
    # refused: the model is told, nothing runs
    fake.steps.clear()
    fake.requests.clear()
    fake.script({"calls": [("t__echo", {"text": "again?"})]})
    status, third = rpost(running.port, {"model": "fake-model", "tools": [tool], "input": "more",
                                         "previous_response_id": second["id"]},
                          timeout=TIMEOUT * 3)
    (ask,) = output_of(third, "mcp_approval_request")
    status, fourth = rpost(running.port, {
        "model": "fake-model", "tools": [tool], "previous_response_id": third["id"], "input": [
            {"type": "mcp_approval_response", "approval_request_id": ask["id"],
             "approve": False, "reason": "not now"}]}, timeout=TIMEOUT * 3)
    assert status == 200 and not output_of(fourth, "mcp_call")
    assert upstream_bodies(fake)[1]["messages"][-1]["content"] == \
        "The user did not approve this tool call: not now"


def test_responses_mcp_approval_filters_and_bad_shapes(mcp_env):
    running, fake = mcp_env
    fake.steps.clear()
    fake.requests.clear()
    fake.script({"calls": [("t__echo", {"text": "a"}), ("t__weather", {"city": "Oslo"})]})
    tool = {"type": "mcp", "server_label": "t", "allowed_tools": ["echo", "weather"],
            "require_approval": {"never": {"tool_names": ["echo"]}}}
    status, doc = rpost(running.port, {"model": "fake-model", "input": "go", "tools": [tool]},
                        timeout=TIMEOUT * 3)
    assert status == 200, doc
    (ran,) = output_of(doc, "mcp_call")  # echo needs no approval: it ran; weather waits
    (ask,) = output_of(doc, "mcp_approval_request")
    assert (ran["name"], ran["output"], ask["name"]) == ("echo", "a", "weather")
    status, doc = rpost(running.port, {"model": "fake-model", "input": "go", "tools": [
        dict(tool, require_approval="sometimes")]})
    assert status == 400 and doc["error"]["param"] == "tools[0].require_approval"
    status, doc = rpost(running.port, {"model": "fake-model", "input": [
        {"type": "mcp_approval_response", "approval_request_id": "mcpr_nope", "approve": True}],
        "tools": [RESPONSES_MCP]})
    assert status == 400 and doc["error"]["code"] == "approval_request_not_found"
    # chat still runs MCP tools without asking, and refuses to be asked
    status, doc = jpost(running.port, "/v1/chat/completions", {
        "model": "fake-model", "messages": [{"role": "user", "content": "go"}],
        "tools": [dict(RESPONSES_MCP, require_approval="always")]})
    assert status == 400 and "require_approval" in doc["error"]["message"]


def test_responses_echo_an_mcp_tools_credentials_nowhere():
    tool = {"type": "mcp", "server_label": "d", "server_url": "http://127.0.0.1:1/mcp",
            "headers": {"Authorization": "Bearer secret"}, "require_approval": "never"}
    assert llmhost.redacted_tool(tool) == dict(tool, headers=None, authorization=None)
    assert llmhost.redacted_tool(RESPONSES_MCP) is RESPONSES_MCP


@pytest.mark.parametrize("body, param", [
    ({"input": 5}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "metadata": {"a": 1}}, "metadata"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({}, "input"),
])
def test_responses_bad_requests_are_400s_in_openais_envelope(gateway, body, param):
    status, doc = rpost(gateway.port, dict({"model": "fake-model"}, **body))
    assert status == 400, doc
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["param"] == param


# =============================================================================
# Messages API: Anthropic's face, translated onto the fake's chat completions
# =============================================================================

MSG = {"model": "fake-model", "max_tokens": 256,
       "messages": [{"role": "user", "content": "hello there"}]}
USAGE = {"input_tokens": 7, "output_tokens": 3, "cache_creation_input_tokens": 0,
         "cache_read_input_tokens": 0}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather of a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}


def mpost(port, body, path="/v1/messages", **kw):
    status, headers, raw = request(port, "POST", path, body, **kw)
    return status, headers, json.loads(raw)


def sent_body(fake, i=-1):
    return json.loads(fake.posts()[i]["body"])


def named_events(raw):
    """A Messages stream as (event name, data) pairs, in order: named events, as the API's."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append((name, json.loads(b"\n".join(data))))
    assert all(name == data["type"] for name, data in events), events
    return events


def completion(message, finish="stop", **choice):
    """A whole chat completion the fake answers with (a stream is asked: it is one chunk)."""
    return {"status": 200, "body": {
        "id": "c1", "object": "chat.completion", "created": 1, "model": "fake-model",
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        "choices": [dict({"index": 0, "message": dict({"role": "assistant"}, **message),
                          "finish_reason": finish}, **choice)]}}


def test_messages_system_as_a_string_as_blocks_and_as_a_message_inside_messages(gateway, fake):
    status, headers, doc = mpost(gateway.port, dict(MSG, system="Be brief."))
    assert status == 200 and headers["content-type"] == "application/json"
    assert doc["id"].startswith("msg_") and len(doc["id"]) > 10
    assert doc == {"id": doc["id"], "type": "message", "role": "assistant", "model": "fake-model",
                   "content": [{"type": "text", "text": "echo: hello there"}],
                   "stop_reason": "end_turn", "stop_sequence": None, "usage": USAGE}
    sent = sent_body(fake)
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello there"}]
    assert sent["max_tokens"] == 256 and "stream" not in sent and "system" not in sent
    # blocks (cache_control left out), and a system-role message (Claude Code sends one):
    # one system message first, which every chat template takes
    status, _, doc = mpost(gateway.port, dict(MSG, system=[
        {"type": "text", "text": "One.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Two."}], messages=[
        {"role": "user", "content": [{"type": "text", "text": "hi",
                                      "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": "Three."}]))
    assert status == 200 and doc["content"] == [{"type": "text", "text": "echo: hi"}]
    assert sent_body(fake)["messages"] == [{"role": "system", "content": "One.\n\nTwo.\n\nThree."},
                                           {"role": "user", "content": "hi"}]


def test_messages_images_reach_the_upstream_as_image_url_parts(gateway, fake):
    status, _, doc = mpost(gateway.port, dict(MSG, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what are these"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": PNG_1PX}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]}]))
    assert status == 200
    assert doc["content"] == [{"type": "text", "text": "echo: what are these [2 images]"}]
    assert sent_body(fake)["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "what are these"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1PX}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]
    assert b'"url":"data:image/png;base64,' + PNG_1PX.encode() + b'"' in fake.posts()[-1]["body"]


def test_messages_tool_use_then_tool_result_round_trip(gateway, fake):
    tools = [dict(WEATHER_TOOL, cache_control={"type": "ephemeral"})]
    status, _, doc = mpost(gateway.port, dict(MSG, tools=tools, tool_choice={
        "type": "any", "disable_parallel_tool_use": True}))
    assert status == 200
    assert doc["stop_reason"] == "tool_use" and doc["stop_sequence"] is None
    assert doc["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                               "input": {"city": "Paris", "unit": "celsius"}}]
    sent = sent_body(fake)
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER_TOOL["input_schema"],
        "description": "Weather of a city."}}]
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    turn = [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Let me look."}] + doc["content"] + [
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Atlantis"}}]
    status, _, doc = mpost(gateway.port, dict(MSG, tools=tools, messages=MSG["messages"] + [
        {"role": "assistant", "content": turn},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1",
             "content": [{"type": "text", "text": "18 C"}]},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "no such city",
             "is_error": True}]}], tool_choice={"type": "tool", "name": "get_weather"}))
    assert status == 200 and doc["stop_reason"] == "end_turn"
    assert doc["content"] == [{"type": "text", "text": "tool result: 18 C | Error: no such city"}]
    sent = sent_body(fake)
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}},
            {"id": "call_2", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city":"Atlantis"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Error: no such city"}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_messages_stop_sequences_and_sampling_reach_the_upstream(gateway, fake):
    status, _, doc = mpost(gateway.port, dict(MSG, stop_sequences=["END", "###"],
                                              temperature=0.2, top_p=0.9, top_k=40))
    assert status == 200 and doc["stop_reason"] == "end_turn"
    sent = sent_body(fake)
    assert (sent["stop"], sent["temperature"], sent["top_p"], sent["top_k"]) == \
        (["END", "###"], 0.2, 0.9, 40)
    # vLLM names the stop string that ended the answer (a token id when it was a token)
    fake.script({"stop_reason": "###"}, {"stop_reason": 2}, {"stop_reason": "###"})
    status, _, doc = mpost(gateway.port, dict(MSG, stop_sequences=["END", "###"]))
    assert (doc["stop_reason"], doc["stop_sequence"]) == ("stop_sequence", "###")
    status, _, doc = mpost(gateway.port, dict(MSG, stop_sequences=["END", "###"]))
    assert (doc["stop_reason"], doc["stop_sequence"]) == ("end_turn", None)
    status, _, raw = post(gateway.port, "/v1/messages", dict(MSG, stream=True,
                                                             stop_sequences=["END", "###"]))
    (delta,) = [data for name, data in named_events(raw) if name == "message_delta"]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "###"}


@pytest.mark.parametrize("stream", [False, True])
def test_messages_a_length_stop_is_max_tokens_and_reasoning_a_thinking_block(gateway, fake,
                                                                             stream):
    """Claude Code asks to resume an answer cut at max_tokens: the stop reason must say so."""
    fake.script(completion({"content": "It is", "reasoning_content": "The user asks."},
                           finish="length"))
    if not stream:
        status, _, doc = mpost(gateway.port, MSG)
        assert status == 200 and doc["stop_reason"] == "max_tokens"
        assert doc["content"] == [
            {"type": "thinking", "thinking": "The user asks.", "signature": ""},
            {"type": "text", "text": "It is"}]
        assert doc["usage"]["output_tokens"] == 4
        return
    status, _, raw = post(gateway.port, "/v1/messages", dict(MSG, stream=True))
    assert status == 200
    events = named_events(raw)
    assert [(name, data.get("index"), (data.get("delta") or {}).get("type"))
            for name, data in events] == [
        ("message_start", None, None), ("ping", None, None),
        ("content_block_start", 0, None), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, None), ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None), ("message_delta", None, None),
        ("message_stop", None, None)]
    assert events[2][1]["content_block"] == {"type": "thinking", "thinking": "",
                                             "signature": ""}
    assert events[3][1]["delta"]["thinking"] == "The user asks."
    assert events[7][1]["delta"]["text"] == "It is"
    assert events[9][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[9][1]["usage"]["output_tokens"] == 4


def test_messages_stream_events_in_order_and_deltas_before_the_end(gateway, fake):
    end = threading.Event()
    fake.script({"hold_end": end})
    # (shorter than the fake's hold, which ends by itself after TIMEOUT: deltas held back
    # until the upstream's end time out here)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT / 2)
    try:
        conn.request("POST", "/v1/messages?beta=true", json.dumps(dict(MSG, stream=True)),
                     {"Content-Type": "application/json", "anthropic-version": "2023-06-01"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
        seen = b""
        while b'"text":" there"' not in seen:  # the last word, while the upstream holds its end
            line = resp.readline()
            assert line, seen
            seen += line
        assert b"message_delta" not in seen and b"message_stop" not in seen
        end.set()
        raw = seen + resp.read()
    finally:
        end.set()
        conn.close()
    events = named_events(raw)
    assert [name for name, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and \
        start["stop_reason"] is None and start["model"] == "fake-model"
    assert start["usage"]["input_tokens"] == 0 and start["usage"]["output_tokens"] == 0
    assert events[2][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    assert [data["delta"] for _, data in events[3:6]] == [
        {"type": "text_delta", "text": t} for t in ("echo:", " hello", " there")]
    assert events[6][1] == {"type": "content_block_stop", "index": 0}
    assert events[7][1] == {"type": "message_delta", "delta": {
        "stop_reason": "end_turn", "stop_sequence": None}, "usage": USAGE}
    assert events[8][1] == {"type": "message_stop"}
    assert sent_body(fake)["stream"] is True  # (with include_usage: the usage above)


def test_messages_templated_events_are_the_bytes_named_event_makes(gateway, fake):
    """The events a stream writes from templates (message_start and its ping, a text block's
    start, a block's stop, message_delta and message_stop) are, byte for byte and key for key,
    what named_event() makes of the doc the API defines."""
    fake.script({"reasoning": "think first"})
    status, _, raw = post(gateway.port, "/v1/messages", dict(MSG, stream=True))
    assert status == 200
    blocks = [block + b"\n\n" for block in raw.split(b"\n\n") if block]
    events = named_events(raw)
    assert len(blocks) == len(events)
    for block, (name, data) in zip(blocks, events):
        assert block == llmhost.named_event(name, data), block
    usage = ["input_tokens", "output_tokens", "cache_creation_input_tokens",
             "cache_read_input_tokens"]
    keys = {name: data for name, data in events}
    assert list(keys["message_start"]["message"]) == [
        "id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"]
    assert list(keys["message_start"]["message"]["usage"]) == usage
    starts = [data for name, data in events if name == "content_block_start"]
    assert starts[1] == {"type": "content_block_start", "index": 1,
                         "content_block": {"type": "text", "text": ""}}
    assert events[-3] == ("content_block_stop", {"type": "content_block_stop", "index": 1})
    assert list(events[-2][1]) == ["type", "delta", "usage"] and \
        list(events[-2][1]["delta"]) == ["stop_reason", "stop_sequence"] and \
        list(events[-2][1]["usage"]) == usage
    assert [(name, list(data)) for name, data in events if name == "content_block_start"] == [
        ("content_block_start", ["type", "index", "content_block"])] * 2


def test_messages_an_upstream_dying_mid_stream_ends_with_an_error_event(gateway, fake):
    fake.script({"drop_after": 1})
    status, _, raw = post(gateway.port, "/v1/messages", dict(MSG, stream=True))
    assert status == 200
    events = named_events(raw)
    assert [name for name, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "error"]
    error = events[-1][1]
    assert error["error"]["type"] == "api_error" and "upstream" in error["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status, kind", [(429, "rate_limit_error"),
                                          (400, "invalid_request_error")])
def test_messages_an_upstream_refusal_before_the_first_event_is_an_http_status(
        gateway, fake, stream, status, kind):
    """A 429 (or the upstream's own 400: max_tokens above its limit, say) before any event is
    the HTTP status, in Anthropic's envelope; a 429's Retry-After is passed on."""
    fake.script({"status": status, "headers": [("Retry-After", "30")] if status == 429 else [],
                 "body": {"error": {
        "message": "max_tokens is too large", "type": "BadRequestError", "code": status}}})
    got, headers, doc = mpost(gateway.port, dict(MSG, stream=stream, max_tokens=32000))
    assert got == status and headers["content-type"] == "application/json"
    assert doc == {"type": "error", "error": {"type": kind,
                                              "message": "upstream: max_tokens is too large"}}
    assert headers.get("retry-after") == ("30" if status == 429 else None)


def test_messages_bad_requests_are_400s_in_anthropics_envelope(gateway, fake):
    for body, needle in [
            ({k: v for k, v in MSG.items() if k != "max_tokens"}, "max_tokens: Field required"),
            (dict(MSG, max_tokens=0), "max_tokens"),
            (dict(MSG, messages=[]), "messages"),
            (dict(MSG, messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
            (dict(MSG, tool_choice={"type": "sometimes"}), "tool_choice"),
            (dict(MSG, messages=[{"role": "user", "content": [{"type": "image", "source": {
                "type": "file", "file_id": "f1"}}]}]), "messages[0].content[0].source"),
            (b"{not json", "not valid JSON")]:
        status, _, doc = mpost(gateway.port, body)
        assert status == 400, (body, doc)
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error", doc
        assert needle in doc["error"]["message"], doc
    assert fake.posts() == []
    status, _, doc = mpost(gateway.port, dict(MSG, model="nope"))
    assert status == 404 and doc["error"]["type"] == "not_found_error"


def test_messages_a_bad_api_key_is_a_401_in_anthropics_envelope(fake, tmp_path):
    path = write_registry(tmp_path / "s.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, api_keys=["k1"])
    try:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            for headers in ({"x-api-key": "wrong"}, {}):
                status, _, doc = mpost(running.port, MSG, path=path, headers=headers)
                assert status == 401 and doc["type"] == "error", doc
                assert doc["error"]["type"] == "authentication_error" and \
                    "wrong" not in doc["error"]["message"]
        status, _, doc = mpost(running.port, MSG, headers={
            "x-api-key": "k1", "anthropic-version": "2023-06-01"})
        assert status == 200 and doc["type"] == "message"
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 401 and doc["error"]["code"] == "invalid_api_key"  # chat: OpenAI's
        # A web page's request, refused from its head before the key is looked at, is
        # refused in Anthropic's envelope too (before: OpenAI's, as the face came later).
        reached = len(fake.posts())
        for headers in ({"Origin": "https://evil.example", "x-api-key": "k1"},
                        {"Sec-Fetch-Site": "cross-site", "x-api-key": "k1"}):
            status, _, doc = mpost(running.port, MSG, headers=headers)
            assert status == 403 and doc["type"] == "error", doc
            assert doc["error"]["type"] == "permission_error"
        assert len(fake.posts()) == reached
    finally:
        running.stop()


def test_messages_a_claude_code_request_is_accepted(gateway, fake):
    """What Claude Code sends (shared/CLIENT_NOTES.md): fields llmhost cannot honour are left
    out, never a 400; its tools reach the model (not Anthropic's server tools)."""
    body = {
        "model": "fake-model", "max_tokens": 32000, "stream": True,
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": "user_1_account_2_session_3"},
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
                   {"type": "text", "text": "You are Claude Code.",
                    "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be helpful.",
                    "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Today is Monday."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                {"type": "text", "text": "list files", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{"name": "Bash", "description": "Runs a command.", "input_schema": {
            "type": "object", "properties": {"command": {"type": "string"}}}},
            {"name": "WebFetch", "description": "Fetches.", "defer_loading": True,
             "input_schema": {"type": "object", "properties": {"url": {"type": "string"}}}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}
    status, headers, raw = post(gateway.port, "/v1/messages?beta=true", body, headers={
        "x-api-key": "anything", "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                          "context-management-2025-06-27"})
    assert status == 200, raw
    events = named_events(raw)
    assert [name for name, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert events[2][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "Bash",
                                             "input": {}}
    assert json.loads(events[3][1]["delta"]["partial_json"]) == {"city": "Paris",
                                                                 "unit": "celsius"}
    assert events[5][1]["delta"]["stop_reason"] == "tool_use"
    sent = sent_body(fake)
    assert [t["function"]["name"] for t in sent["tools"]] == ["Bash", "WebFetch"]
    assert sent["max_tokens"] == 32000 and sent["messages"][0] == {
        "role": "system", "content": "x-anthropic-billing-header: cc_version=2.1.332;\n\n"
                                     "You are Claude Code.\n\nBe helpful.\n\nToday is Monday."}
    assert sent["messages"][1]["content"] == [
        {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
        {"type": "text", "text": "list files"}]
    assert not {"thinking", "output_config", "context_management", "metadata", "system",
                "stop_sequences"} & set(sent)
    status, _, doc = mpost(gateway.port, dict(body, stream=False, tools=[]),
                           path="/v1/messages?beta=true")
    assert status == 200 and doc["content"] == [{"type": "text", "text": (
        "echo: <system-reminder>ctx</system-reminder> list files [0 images]")}]
    assert "tools" not in sent_body(fake) and "tool_choice" not in sent_body(fake)


def test_messages_count_tokens_is_an_estimate_that_says_so(gateway, fake):
    status, headers, doc = mpost(gateway.port, {k: v for k, v in MSG.items()
                                                if k != "max_tokens"},
                                 path="/v1/messages/count_tokens")
    assert status == 200 and headers["x-llmhost-token-count"] == "estimate"
    assert doc["estimate"] is True and 0 < doc["input_tokens"] < 20
    longer = dict(MSG, system="word " * 400, tools=[WEATHER_TOOL])
    status, _, more = mpost(gateway.port, longer, path="/v1/messages/count_tokens")
    assert more["input_tokens"] > doc["input_tokens"] + 500
    image = dict(MSG, messages=[{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": PNG_1PX}}]}])
    status, _, pic = mpost(gateway.port, image, path="/v1/messages/count_tokens")
    assert pic["input_tokens"] >= llmhost.IMAGE_TOKENS_ANTHROPIC
    status, _, doc = mpost(gateway.port, dict(MSG, model="nope"),
                           path="/v1/messages/count_tokens")
    assert status == 404 and doc["error"]["type"] == "not_found_error"
    assert fake.posts() == []  # an estimate: no upstream is asked


# =============================================================================
# Native pass-through: entries that get the Responses or Messages API as it came
# =============================================================================

NATIVE_BODIES = {"responses": {"input": "hi there", "metadata": {"k": "v"}},
                 "messages": {"max_tokens": 64, "metadata": {"user_id": "u1"},
                              "messages": [{"role": "user", "content": "hi there"}]}}


def native_registry(tmp_path, fake, own=None, plain=None):
    """`own`: an entry opted in to both APIs, with a key; `plain`: one that is not."""
    return write_registry(tmp_path / "servers.json", [
        dict({"name": "plain", "url": fake.url, "models": ["fake-model"]}, **plain or {}),
        dict({"name": "own", "url": fake.url, "models": ["fake-model"], "alias": "own-api",
              "api_key": "sk-up", "native": ["responses", "messages"]}, **own or {})])


@pytest.fixture
def native_gateway(fake, tmp_path):
    running = Running(native_registry(tmp_path, fake))
    yield running
    running.stop()


def face_text(api, raw, stream):
    """The text of an answer of the API `api`, checking a stream's shape on the way."""
    if not stream:
        doc = json.loads(raw)
        if api == "responses":
            return doc, "".join(p["text"] for item in output_of(doc, "message")
                                for p in item["content"])
        return doc, "".join(b["text"] for b in doc["content"] if b["type"] == "text")
    if api == "responses":
        events = response_events(raw)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["type"] == "response.completed"
        return events, "".join(e["delta"] for e in events
                               if e["type"] == "response.output_text.delta")
    events = named_events(raw)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    return events, "".join(d["delta"]["text"] for name, d in events
                           if name == "content_block_delta")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["responses", "messages"])
def test_native_an_opted_in_entry_gets_the_request_as_it_came_and_its_answer_as_it_came(
        native_gateway, fake, api, stream):
    body = dict(NATIVE_BODIES[api], model="own-api", stream=stream)
    query = "?beta=true" if api == "messages" else ""  # (Claude Code's)
    status, headers, raw = post(native_gateway.port, f"/v1/{api}{query}", body, headers={
        "anthropic-version": "2023-06-01", "anthropic-beta": "b-1,b-2"})
    assert status == 200 and headers["x-llmhost-server"] == "own", raw
    (sent,) = fake.posts()
    assert sent["path"] == f"/v1/{api}{query}"
    assert json.loads(sent["body"]) == dict(body, model="fake-model")  # (the alias' model)
    assert sent["headers"]["authorization"] == "Bearer sk-up"
    if api == "messages":  # (both key forms: Anthropic reads x-api-key, vLLM the Bearer)
        assert sent["headers"]["x-api-key"] == "sk-up"
        assert sent["headers"]["anthropic-version"] == "2023-06-01"
        assert sent["headers"]["anthropic-beta"] == "b-1,b-2"
    else:
        assert not {"x-api-key", "anthropic-version", "anthropic-beta"} & set(sent["headers"])
    got, text = face_text(api, raw, stream)
    assert text == "native: hi there"
    if not stream:  # the upstream's own object, its id too: nothing was made anew
        assert got["id"] == ("resp_up" if api == "responses" else "msg_up")
    # The same request for the model of the entry that is not opted in: translated.
    fake.requests.clear()
    status, headers, raw = post(native_gateway.port, f"/v1/{api}{query}",
                                dict(body, model="fake-model"))
    assert status == 200 and headers["x-llmhost-server"] == "plain"
    assert [r["path"] for r in fake.posts()] == ["/v1/chat/completions"]
    got, text = face_text(api, raw, stream)
    assert text == "echo: hi there"


def test_native_a_messages_request_without_anthropic_version_gets_the_sdks_and_anthropic_only_x_api_key(
        tmp_path):
    up = llmhost.Upstream({"name": "a", "url": "https://api.anthropic.com/v1"}, "sk-ant")
    head = up.head("POST", "/v1/messages", 2, None, "messages",
                   llmhost.MESSAGES_FACE.native_fields({})).decode()
    assert "x-api-key: sk-ant\r\n" in head and "Authorization" not in head
    assert "anthropic-version: 2023-06-01\r\n" in head and "anthropic-beta" not in head
    chat = up.head("POST", "/v1/chat/completions", 2).decode()
    assert "Authorization: Bearer sk-ant\r\n" in chat and "x-api-key" not in chat


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["responses", "messages"])
@pytest.mark.parametrize("first", ["own", "plain"])
def test_native_failover_between_a_native_and_a_translating_entry_keeps_the_faces_shapes(
        fake, tmp_path, api, stream, first):
    """One model, two entries: the first refuses (503), the other answers, each in its way,
    and the client sees its API's shape either way."""
    running = Running(native_registry(tmp_path, fake, own={"alias": None, "priority": 0 if
                                                           first == "own" else 1}))
    try:
        fake.script({"status": 503})
        status, headers, raw = post(running.port, f"/v1/{api}", dict(
            NATIVE_BODIES[api], model="fake-model", stream=stream))
        assert status == 200, raw
        second = "plain" if first == "own" else "own"
        assert headers["x-llmhost-server"] == second
        paths = {"own": f"/v1/{api}", "plain": "/v1/chat/completions"}
        assert [r["path"] for r in fake.posts()] == [paths[first], paths[second]]
        got, text = face_text(api, raw, stream)
        assert text == ("native: hi there" if second == "own" else "echo: hi there")
        if not stream and api == "responses":
            assert got["object"] == "response" and got["status"] == "completed"
        elif not stream:
            assert got["type"] == "message" and got["stop_reason"] == "end_turn"
    finally:
        running.stop()


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_native_a_stream_that_dies_ends_with_the_faces_error_event(native_gateway, fake, api):
    fake.script({"drop_after": 1})
    status, _, raw = post(native_gateway.port, f"/v1/{api}", dict(
        NATIVE_BODIES[api], model="own-api", stream=True))
    assert status == 200
    if api == "responses":
        events = response_events(raw)
        assert [e["type"] for e in events] == ["response.created", "response.output_text.delta",
                                               "error"]
        assert events[-1]["sequence_number"] == 2  # numbered after the last relayed
        assert events[-1]["code"] and "upstream" in events[-1]["message"]
    else:
        events = named_events(raw)
        assert [name for name, _ in events] == ["message_start", "content_block_start",
                                                "content_block_delta", "error"]
        assert events[-1][1]["error"]["type"] == "api_error"
    assert server_status(native_gateway.port, "own")["errors"] == 1


ANTHROPIC_ERROR = {"type": "error", "error": {"type": "invalid_request_error",
                                              "message": "max_tokens: 32000 > 8192"}}
OPENAI_ERROR = {"error": {"message": "max_tokens is too large", "type": "invalid_request_error",
                          "param": None, "code": None}}


@pytest.mark.parametrize("api, given, expected", [
    ("messages", ANTHROPIC_ERROR, ANTHROPIC_ERROR),  # an Anthropic server's: as it is
    ("messages", OPENAI_ERROR, {"type": "error", "error": {  # llama.cpp's: in Anthropic's
        "type": "invalid_request_error", "message": "upstream: max_tokens is too large"}}),
    ("responses", OPENAI_ERROR, OPENAI_ERROR),
])
@pytest.mark.parametrize("stream", [False, True])
def test_native_an_upstream_error_comes_back_in_the_faces_envelope(native_gateway, fake, api,
                                                                    given, expected, stream):
    fake.script({"status": 400, "body": given})
    status, headers, raw = post(native_gateway.port, f"/v1/{api}", dict(
        NATIVE_BODIES[api], model="own-api", stream=stream))
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(raw) == expected
    assert [r["path"] for r in fake.posts()] == [f"/v1/{api}"]


def test_native_responses_state_an_upstream_holds_is_its_and_llmhosts_own_is_translated(
        fake, tmp_path):
    """A relayed response is stored by the upstream, not by llmhost: a previous_response_id
    llmhost does not know goes to the native entries only (even ranked after another); one of
    llmhost's own continues translated."""
    running = Running(native_registry(tmp_path, fake, own={"alias": None, "priority": 1}))
    try:
        status, doc = rpost(running.port, {"model": "fake-model", "input": "hi there"})
        assert status == 200 and fake.posts()[-1]["path"] == "/v1/chat/completions"
        ours = doc["id"]
        status, doc = rpost(running.port, {"model": "fake-model", "input": "more",
                                           "previous_response_id": ours})
        assert status == 200 and fake.posts()[-1]["path"] == "/v1/chat/completions"
        sent = json.loads(fake.posts()[-1]["body"])
        assert [m["content"] for m in sent["messages"]] == ["hi there", "echo: hi there", "more"]
        status, doc = rpost(running.port, {"model": "fake-model", "input": "more",
                                           "previous_response_id": "resp_up"})
        assert status == 200 and doc["id"] == "resp_up"
        assert fake.posts()[-1]["path"] == "/v1/responses"
        assert json.loads(fake.posts()[-1]["body"])["previous_response_id"] == "resp_up"
        status, headers, raw = request(running.port, "GET", "/v1/responses/resp_up")
        assert status == 404  # (llmhost keeps no relayed response: the upstream has it)
    finally:
        running.stop()


def mcp_ready(port, name="t"):
    """Whether MCP server `name` is connected: a request waits only MCP_ATTACHED_WAIT for an
    attached server still starting (a slow start under load), then goes on without it."""
    servers = json.loads(request(port, "GET", "/v1/mcp/servers")[2])["data"]
    return any(s["name"] == name and s["state"] == "ready" for s in servers)


def messages_agent(port, fake, steps, stream=False, **extra):
    assert wait_until(lambda: mcp_ready(port), TIMEOUT * 3)
    fake.steps.clear()
    fake.requests.clear()
    fake.script(*steps)
    body = dict(dict(MSG, model="agent", messages=[{"role": "user", "content": "go"}]), **extra)
    if stream:
        body["stream"] = True
    return post(port, "/v1/messages", body, timeout=TIMEOUT * 3)


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_native_an_opted_in_entry_is_translated_when_llmhost_runs_tools(mcp_env, api):
    """MCP tools attached to the entry, or named by the request (an mcp tool, mcp_servers):
    llmhost runs them, so the request goes the translated way; without them it is relayed."""
    running, fake = mcp_env
    assert wait_until(lambda: mcp_ready(running.port), TIMEOUT * 3)
    named = {"responses": {"tools": [RESPONSES_MCP]},
             "messages": {"mcp_servers": [{"type": "url", "name": "t"}]}}[api]
    for model, extra in (("native-agent", {}), ("native-bare", named)):
        fake.steps.clear()
        fake.requests.clear()
        fake.script({"calls": [("t__echo", {"text": "hi"})]})
        status, _, raw = post(running.port, f"/v1/{api}", dict(
            NATIVE_BODIES[api], model=model, **extra), timeout=TIMEOUT * 3)
        doc = json.loads(raw)
        assert status == 200, doc
        assert [r["path"] for r in fake.posts()] == ["/v1/chat/completions"] * 2
        if api == "responses":
            assert output_of(doc, "mcp_call")[0]["output"] == "hi"
        else:
            assert [b["content"] for b in doc["content"] if b["type"] == "mcp_tool_result"] == [
                [{"type": "text", "text": "hi"}]]
    fake.requests.clear()
    status, _, raw = post(running.port, f"/v1/{api}", dict(NATIVE_BODIES[api],
                                                           model="native-bare"))
    assert status == 200 and [r["path"] for r in fake.posts()] == [f"/v1/{api}"]


MCP_ECHO_BLOCKS = [
    {"type": "mcp_tool_use", "id": "call_0", "name": "echo", "server_name": "t",
     "input": {"text": "hi"}},
    {"type": "mcp_tool_result", "tool_use_id": "call_0", "is_error": False,
     "content": [{"type": "text", "text": "hi"}]}]


def test_messages_mcp_tools_run_by_llmhost_show_as_mcp_blocks(mcp_env):
    running, fake = mcp_env
    status, _, raw = messages_agent(running.port, fake, [
        {"calls": [("t__echo", {"text": "hi"})], "say": "Let me check."}])
    doc = json.loads(raw)
    assert status == 200, doc
    assert doc["content"] == [{"type": "text", "text": "Let me check."}] + MCP_ECHO_BLOCKS + [
        {"type": "text", "text": "tool result: hi"}]
    assert doc["stop_reason"] == "end_turn"
    assert doc["usage"]["input_tokens"] == 5 + 7 and doc["usage"]["output_tokens"] == 1 + 3
    # the answer given back (as clients replay a turn) reads as the calls llmhost ran
    status, _, raw = messages_agent(running.port, fake, [{}], model="fake-model", messages=[
        {"role": "user", "content": "go"}, {"role": "assistant", "content": doc["content"]},
        {"role": "user", "content": "thanks"}])
    assert status == 200
    assert sent_body(fake)["messages"][1:] == [
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {
                "name": "t__echo", "arguments": '{"text":"hi"}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "hi"},
        {"role": "assistant", "content": "tool result: hi"},
        {"role": "user", "content": "thanks"}]


def test_messages_mcp_stream_has_mcp_blocks_between_the_rounds_text(mcp_env):
    running, fake = mcp_env
    status, _, raw = messages_agent(running.port, fake, [
        {"calls": [("t__echo", {"text": "hi"})], "say": "Let me check."}], stream=True)
    assert status == 200
    events = named_events(raw)
    assert [(name, data.get("index")) for name, data in events] == [
        ("message_start", None), ("ping", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_stop", 2),
        ("content_block_start", 3), ("content_block_delta", 3), ("content_block_delta", 3),
        ("content_block_delta", 3), ("content_block_stop", 3),
        ("message_delta", None), ("message_stop", None)]
    assert events[5][1]["content_block"] == dict(MCP_ECHO_BLOCKS[0], input={})
    assert json.loads(events[6][1]["delta"]["partial_json"]) == {"text": "hi"}
    assert events[8][1]["content_block"] == MCP_ECHO_BLOCKS[1]
    texts = ["".join(d["delta"]["text"] for n, d in events if n == "content_block_delta" and
                     d["index"] == i) for i in (0, 3)]
    assert texts == ["Let me check.", "tool result: hi"]  # (no round separator: blocks part)
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_messages_mcp_servers_parameter_under_the_chat_rules(mcp_env):
    """`mcp_servers` names a registered server (no url) or a url under --mcp-allow-url (none
    here: refused); tool_configuration chooses its tools, or leaves the server out."""
    running, fake = mcp_env
    server = {"type": "url", "name": "t", "tool_configuration": {"allowed_tools": ["echo"]}}
    status, _, raw = messages_agent(running.port, fake, [
        {"calls": [("t__echo", {"text": "sel"})]}], model="fake-model", mcp_servers=[server])
    doc = json.loads(raw)
    assert status == 200 and doc["content"][-1] == {"type": "text", "text": "tool result: sel"}
    assert [t["function"]["name"] for t in sent_body(fake, 0)["tools"]] == ["t__echo"]
    status, _, raw = messages_agent(running.port, fake, [{}], model="fake-model", mcp_servers=[
        dict(server, tool_configuration={"enabled": False})])
    assert status == 200 and "tools" not in sent_body(fake)
    # the newer beta's mcp_toolset: tools enabled one by one (an allow-list) are offered
    toolset = {"type": "mcp_toolset", "mcp_server_name": "t", "default_config": {
        "enabled": False}, "configs": {"weather": {"enabled": True}}}
    status, _, raw = messages_agent(running.port, fake, [{}], model="fake-model", mcp_servers=[
        {"type": "url", "name": "t"}], tools=[toolset])
    assert status == 200 and [t["function"]["name"] for t in sent_body(fake, 0)["tools"]] == \
        ["t__weather"]
    disabling = dict(toolset, default_config={}, configs={"echo": {"enabled": False}})
    for servers, tools in [([{"type": "url", "name": "t"}], [disabling]),
                           ([dict(server, tool_configuration={"allowed_tools": "echo"})], [])]:
        status, _, raw = messages_agent(running.port, fake, [], model="fake-model",
                                        mcp_servers=servers, tools=tools)
        assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, _, raw = messages_agent(running.port, fake, [{}], model="fake-model", mcp_servers=[
        {"type": "url", "name": "web", "url": "http://169.254.169.254/mcp",
         "authorization_token": "tok"}])
    doc = json.loads(raw)
    assert status == 400 and doc["error"]["type"] == "invalid_request_error", doc
    assert "--mcp-allow-url" in doc["error"]["message"] and "tok" not in doc["error"]["message"]
    assert fake.posts() == []


# =============================================================================
# MCP: a real MCP server (the SDK's MCPServer) and the tool loop through llmhost
# =============================================================================

PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAA"
           "AABJRU5ErkJggg==")


def mcp_test_listener(port):
    """A listening socket on 127.0.0.1 for uvicorn, made as uvicorn makes its own: with proto
    IPPROTO_TCP, for asyncio disables Nagle's algorithm only on sockets that say so. A
    `socket.socket()` (proto 0) kept it on: a JSON answer's body (sent after its headers) then
    waited for the client's delayed ACK, 40 ms on every call of a kept-alive connection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def run_mcp_test_server(argv):
    """`python3 test_llmhost.py mcp-server stdio|http|sse|http-oauth ISSUER|sse-oauth ISSUER`:
    tools returning text, structured content, an image, an error; a slow one; one that samples,
    two that elicit; one that dies; one that adds a tool (list_changed). HTTP binds 127.0.0.1
    and prints "PORT n". The -oauth kinds take only tokens of the authorization server ISSUER
    (see mcp_oauth_settings), and their tool `secret` only those with scope admin."""
    from typing import Annotated

    import anyio
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.resolve import Elicit, ListRoots, Resolve, Sample
    from mcp.server.mcpserver.utilities.types import Image
    from mcp_types import CreateMessageResult, ListRootsResult, SamplingMessage, TextContent
    from pydantic import BaseModel, Field

    sock, protection = None, {}
    if argv[0] != "stdio":  # (listening before PORT is said: a client may connect while
        # uvicorn starts)
        sock = mcp_test_listener(int(argv[1]) if argv[1:] and not argv[0].endswith("-oauth")
                                 else 0)
    path = "/sse" if argv[0].startswith("sse") else "/mcp"  # (what clients connect to)
    if argv[0].endswith("-oauth"):
        protection = mcp_oauth_settings(argv[1], sock.getsockname()[1], path)
    srv = MCPServer("llmhost-test", version="1.0", **protection)

    class Weather(BaseModel):
        city: str
        temp_c: float

    class Prefs(BaseModel):
        colour: str = Field(default="blue")
        count: int = Field(default=3)

    class NeedsName(BaseModel):
        name: str

    @srv.tool(description="Echo text back.")
    def echo(text: str) -> str:
        return text

    @srv.tool(description="Structured weather.")
    def weather(city: str) -> Weather:
        return Weather(city=city, temp_c=21.5)

    @srv.tool(description="Return a 1x1 image.")
    def pixel() -> Image:
        return Image(data=base64.b64decode(PNG_1PX), format="png")

    @srv.tool(description="Always fails.")
    def boom() -> str:
        raise ValueError("kaboom")

    async def pause(seconds, until):
        """`seconds`; with `until` (a path), till the test makes that file (at most
        `seconds`) -> whether it did: a state held as long as the test needs, not longer."""
        if not until:
            await anyio.sleep(seconds)
            return False
        with anyio.move_on_after(seconds):
            while not os.path.exists(until):
                await anyio.sleep(0.01)
        return os.path.exists(until)

    @srv.tool(description="Sleeps.")
    async def slow(seconds: float, note: str = "", until: str = "") -> str:
        if note:  # a file a test waits for: the call is under way
            with open(note, "a") as f:
                f.write("started\n")
        if await pause(seconds, until):
            return "released"
        return f"slept {seconds}"

    @srv.tool(description="Exits the server process.")
    def die() -> str:
        os._exit(3)

    @srv.tool(description="The server's process id.")
    def pid() -> str:
        return str(os.getpid())

    @srv.tool(description="Answers with a JSON-RPC error in the servers' own range.")
    def quota() -> str:
        from mcp.shared.exceptions import MCPError
        raise MCPError(-32000, "quota exceeded")

    @srv.tool(description="Notes the call in a file, then fails with a JSON-RPC error.")
    def tally(path: str) -> str:
        from mcp.shared.exceptions import MCPError
        with open(path, "a") as f:
            f.write("ran\n")
        raise MCPError(-32603, "the tool ran, but saving the session log failed")

    @srv.tool(description="Returns one HTTP request header (empty on stdio).")
    def header(name: str, ctx: Context) -> str:
        return (ctx.headers or {}).get(name.lower(), "")

    def ask_model(topic: str) -> Sample:
        return Sample([SamplingMessage(role="user", content=TextContent(
            text=f"Write about {topic}"))], max_tokens=42, system_prompt="Be brief.",
            stop_sequences=["END"])

    @srv.tool(description="Asks the client's model (sampling).")
    def summarize(topic: str, answer: Annotated[CreateMessageResult, Resolve(ask_model)]) -> str:
        return f"model={answer.model} text={answer.content.text}"

    async def ask_model_later(topic: str, seconds: float, until: str = "") -> Sample:
        await pause(seconds, until)
        return ask_model(topic)

    @srv.tool(description="Waits, then asks the client's model (sampling).")
    def summarize_later(topic: str, seconds: float,
                        answer: Annotated[CreateMessageResult, Resolve(ask_model_later)],
                        until: str = "") -> str:
        return f"model={answer.model} text={answer.content.text}"

    @srv.tool(description="Elicits a form where every field has a default.")
    def prefs(p: Annotated[Prefs, Resolve(lambda: Elicit("Preferences?", Prefs))]) -> str:
        return f"colour={p.colour} count={p.count}"

    @srv.tool(description="Elicits a required field without a default.")
    def name(p: Annotated[NeedsName, Resolve(lambda: Elicit("Your name?", NeedsName))]) -> str:
        return f"name={p.name}"

    @srv.tool(description="Adds a tool at runtime and announces it.")
    async def grow(ctx: Context) -> str:
        srv.add_tool(lambda: "extra ok", name="extra", description="Added at runtime.")
        await ctx.notify_tools_changed()
        return "grown"

    if os.environ.get("LLMHOST_TEST_MCP_LATER"):  # a later version of this server
        @srv.tool(description="Only in the later version.")
        def later() -> str:
            return "later ok"

    @srv.tool(description="Removes every tool and announces it.")
    async def shrink(ctx: Context) -> str:
        for tool in await srv.list_tools():
            srv.remove_tool(tool.name)
        await ctx.notify_tools_changed()
        return "shrunk"

    @srv.tool(description="The client's roots.")
    def roots(listed: Annotated[ListRootsResult, Resolve(lambda: ListRoots())]) -> str:
        return " ".join(str(root.uri) for root in listed.roots)

    @srv.tool(description="Reports progress and logs while it works.")
    async def chatty(ctx: Context) -> str:
        await ctx.report_progress(1, 2, "half way")
        await ctx.info("chatty is working")
        return "chatty done"

    @srv.tool(description="Sends the user to a page (URL-mode elicitation; legacy era only).")
    async def visit(ctx: Context) -> str:
        answer = await ctx.elicit_url("Sign in there", "https://example.com/sign-in", "e-1")
        return f"visit {answer.action}"

    @srv.tool(description="Needs the scope admin (on the http-oauth server).")
    def secret() -> str:
        return "secret ok"

    @srv.resource("test://hello", description="A greeting.")
    def hello() -> str:
        return "hello resource"

    @srv.prompt(description="A prompt.")
    def greet(who: str) -> str:
        return f"Say hello to {who}"

    if argv[0] == "stdio":
        srv.run("stdio")
        return
    import uvicorn
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    app = srv.sse_app() if argv[0].startswith("sse") else srv.streamable_http_app()
    if argv[0] == "http-legacy":
        app = legacy_only(app)
    if argv[0].endswith("-oauth"):
        app = scope_for_tool(app, argv[1], f"http://127.0.0.1:{sock.getsockname()[1]}"
                             f"/.well-known/oauth-protected-resource{path}", "secret", "admin")
    if os.environ.get("LLMHOST_TEST_MCP_NO_RESULT_TYPE"):
        app = without_result_type(app)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    anyio.run(uvicorn.Server(config).serve, [sock])


# A 44-byte WAV file: RIFF header, 8 kHz mono 8-bit, no samples (the suite checks only its shape).
WAV_EMPTY = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA="
CONFORMANCE_ENUMS = {
    "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
    "titledSingle": {"type": "string", "oneOf": [
        {"const": "value1", "title": "First Option"}, {"const": "value2", "title": "Second Option"},
        {"const": "value3", "title": "Third Option"}]},
    "legacyEnum": {"type": "string", "enum": ["opt1", "opt2", "opt3"],
                   "enumNames": ["Option One", "Option Two", "Option Three"]},
    "untitledMulti": {"type": "array", "items": {"type": "string",
                                                 "enum": ["option1", "option2", "option3"]}},
    "titledMulti": {"type": "array", "items": {"anyOf": [
        {"const": "value1", "title": "First Choice"}, {"const": "value2", "title": "Second Choice"},
        {"const": "value3", "title": "Third Choice"}]}},
}
CONFORMANCE_DEFAULTS = {
    "name": {"type": "string", "default": "John Doe"},
    "age": {"type": "integer", "default": 30},
    "score": {"type": "number", "default": 95.5},
    "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
    "verified": {"type": "boolean", "default": True},
}


def conformance_form(message, properties, required=()):
    return {"method": "elicitation/create", "params": {"message": message, "requestedSchema": {
        "type": "object", "properties": properties, "required": list(required)}}}


def conformance_sample(text, max_tokens):
    return {"method": "sampling/createMessage", "params": {"messages": [{
        "role": "user", "content": {"type": "text", "text": text}}], "maxTokens": max_tokens}}


ROOTS_LIST = {"method": "roots/list", "params": {}}


def run_mcp_conformance_fixture(argv):
    """`python3 test_llmhost.py mcp-fixture [legacy] [PORT]`: the server fixture of the MCP
    conformance suite (npm @modelcontextprotocol/conformance 0.2.0-alpha.12): the tools,
    resources and prompts its server scenarios call for at 2025-11-25 and 2026-07-28, over
    streamable HTTP on 127.0.0.1 (prints "PORT n"); `legacy`: at 2025-11-25 only (see
    legacy_only). Built on the SDK's low-level Server, whose results are the wire's: a
    2026-07-28 client gets InputRequiredResults (requestState sealed by the SDK's
    RequestStateBoundary), a 2025-11-25 one the same questions as requests of the server's.
    Besides, for llmhost's own tests: test_trigger_resource_update (an update of
    test://watched-resource, to its subscribers), and resources listed
    $LLMHOST_TEST_MCP_PAGE a page if that is set (cursors "at:N")."""
    import anyio
    import mcp_types as T
    import uvicorn
    from mcp.server.lowlevel import Server
    from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity
    from mcp.server.subscriptions import (InMemorySubscriptionBus, ListenHandler,
                                          PromptsListChanged, ResourceUpdated,
                                          ToolsListChanged)
    from mcp.shared.exceptions import MCPError
    from mcp_types.version import MODERN_PROTOCOL_VERSIONS

    bus = InMemorySubscriptionBus()
    legacy = argv[:1] == ["legacy"]
    argv = argv[legacy:]

    def text(t):
        return {"content": [{"type": "text", "text": t}]}

    def dump(model):
        return model.model_dump(by_alias=True, mode="json", exclude_none=True)

    async def ask_now(ctx, request):
        """A question as a request of the server's (2025-11-25) -> the answer as JSON."""
        p, session = request["params"], ctx.session
        if request["method"] == "elicitation/create":
            return dump(await session.elicit_form(p["message"], p["requestedSchema"],
                                                  related_request_id=ctx.request_id))
        if request["method"] == "roots/list":
            return dump(await session.list_roots())
        return dump(await session.create_message(
            [T.SamplingMessage.model_validate(m) for m in p["messages"]],
            max_tokens=p["maxTokens"], related_request_id=ctx.request_id))

    async def answers(ctx, params, questions, state=None):
        """{key: answer} for `questions` ({key: request}), or the InputRequiredResult that asks
        a 2026-07-28 client what it has not answered (an answer that is no object is none)."""
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            return {key: await ask_now(ctx, q) for key, q in questions.items()}
        given = params.input_responses or {}
        given = {k: dump(v) if hasattr(v, "model_dump") else v for k, v in given.items()}
        missing = {k: q for k, q in questions.items() if not isinstance(given.get(k), dict)}
        if missing or (state is not None and params.request_state != state):
            return T.InputRequiredResult(input_requests=missing or questions,
                                         request_state=state)
        return {k: given[k] for k in questions}

    def answered(make):
        """A tool that asks `questions` first: make(ctx, args) -> (questions, state, finish),
        finish(answers) -> the tool's result."""
        async def tool(ctx, args, params):
            questions, state, finish = make(ctx, args)
            got = await answers(ctx, params, questions, state)
            return got if isinstance(got, T.InputRequiredResult) else text(finish(got))
        return tool

    def said(answer):
        return f"action={answer.get('action')}, content={json.dumps(answer.get('content'))}"

    async def with_logging(ctx, args, params):
        for i, line in enumerate(("Tool execution started", "Tool processing data",
                                  "Tool execution completed")):
            if i:
                await anyio.sleep(0.05)
            await ctx.session.send_log_message("info", line, related_request_id=ctx.request_id)
        return text("Logging test completed")

    async def with_progress(ctx, args, params):
        for i, done in enumerate((0, 50, 100)):  # (none is sent if the call gave no token)
            if i:
                await anyio.sleep(0.05)
            await ctx.session.report_progress(done, 100)
        return text("Progress test completed")

    step1 = {"step1": conformance_form("Step 1: What is your name?",
                                       {"name": {"type": "string"}}, ["name"])}
    step2 = {"step2": conformance_form("Step 2: What is your favorite color?",
                                       {"color": {"type": "string"}}, ["color"])}

    async def multi_round(ctx, args, params):
        """Step 1's question, then (its answer in hand) step 2's, each round its own state."""
        if params.request_state != "round-2":
            got = await answers(ctx, params, step1, "round-1")
            if isinstance(got, T.InputRequiredResult):
                return got
            if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
                return T.InputRequiredResult(input_requests=step2, request_state="round-2")
        got = await answers(ctx, params, step2, "round-2")
        if isinstance(got, T.InputRequiredResult):
            return got
        return text(f"Both steps done: color={(got['step2'].get('content') or {}).get('color')}")

    def client_caps(ctx):
        caps = ctx.meta.get("io.modelcontextprotocol/clientCapabilities") if ctx.meta else None
        return caps if isinstance(caps, dict) else {}

    async def needs_sampling(ctx, args, params):
        if "sampling" not in client_caps(ctx):
            raise MCPError(T.MISSING_REQUIRED_CLIENT_CAPABILITY, "This tool needs sampling",
                           {"requiredCapabilities": {"sampling": {}}})
        return text("sampling is declared")

    def changes(event, legacy):
        async def tool(ctx, args, params):
            if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
                await bus.publish(event())
            else:
                await legacy(ctx.session)()
            return text("list changed")
        return tool

    def capabilities(ctx, args):
        caps = client_caps(ctx)
        questions = {}
        if "sampling" in caps:
            questions["question"] = conformance_sample("What is 2+2?", 10)
        if "elicitation" in caps:
            questions["user_name"] = conformance_form("What is your name?",
                                                      {"name": {"type": "string"}}, ["name"])
        return questions, None, lambda got: f"answered: {', '.join(sorted(got))}"

    name_form = conformance_form("What is your name?", {"name": {"type": "string"}}, ["name"])
    tools_elicit = answered(lambda ctx, a: ({"user_name": name_form}, None, lambda got:
                                           f"Hello, {(got['user_name'].get('content') or {}).get('name')}!"))
    tools = {
        "test_simple_text": lambda ctx, a, p: text("This is a simple text response for testing."),
        "test_image_content": lambda ctx, a, p: {"content": [
            {"type": "image", "data": PNG_1PX, "mimeType": "image/png"}]},
        "test_audio_content": lambda ctx, a, p: {"content": [
            {"type": "audio", "data": WAV_EMPTY, "mimeType": "audio/wav"}]},
        "test_embedded_resource": lambda ctx, a, p: {"content": [{"type": "resource", "resource": {
            "uri": "test://embedded-resource", "mimeType": "text/plain",
            "text": "This is an embedded resource content."}}]},
        "test_multiple_content_types": lambda ctx, a, p: {"content": [
            {"type": "text", "text": "Multiple content types test:"},
            {"type": "image", "data": PNG_1PX, "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "test://mixed-content-resource",
                                              "mimeType": "application/json",
                                              "text": '{"test":"data","value":123}'}}]},
        "test_tool_with_logging": with_logging,
        "test_tool_with_progress": with_progress,
        "test_error_handling": lambda ctx, a, p: dict(
            text("This tool intentionally returns an error for testing"), isError=True),
        "test_sampling": answered(lambda ctx, a: (
            {"sample": conformance_sample(a.get("prompt", ""), 100)}, None,
            lambda got: f"LLM response: {(got['sample'].get('content') or {}).get('text')}")),
        "test_elicitation": answered(lambda ctx, a: (
            {"form": conformance_form(a.get("message", ""), {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"}},
                ["username", "email"])}, None,
            lambda got: f"User response: {said(got['form'])}")),
        "test_elicitation_sep1034_defaults": answered(lambda ctx, a: (
            {"form": conformance_form("Please review and update the form fields with defaults",
                                      CONFORMANCE_DEFAULTS)}, None,
            lambda got: f"Elicitation completed: {said(got['form'])}")),
        "test_elicitation_sep1330_enums": answered(lambda ctx, a: (
            {"form": conformance_form("Please select options from the enum fields",
                                      CONFORMANCE_ENUMS)}, None,
            lambda got: f"Elicitation completed: {said(got['form'])}")),
        "test_input_required_result_elicitation": tools_elicit,
        "test_input_required_result_sampling": answered(lambda ctx, a: (
            {"capital_question": conformance_sample("What is the capital of France?", 100)},
            None, lambda got: f"Sampled: {(got['capital_question'].get('content') or {}).get('text')}")),
        "test_input_required_result_list_roots": answered(lambda ctx, a: (
            {"client_roots": ROOTS_LIST}, None,
            lambda got: "Roots: " + " ".join(r.get("uri", "?") for r in
                                             got["client_roots"].get("roots") or []))),
        "test_input_required_result_request_state": answered(lambda ctx, a: (
            {"confirm": conformance_form("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])},
            "confirm-pending", lambda got: "state-ok: confirmed")),
        "test_input_required_result_multiple_inputs": answered(lambda ctx, a: (
            {"user_name": name_form, "greeting": conformance_sample("Generate a greeting", 50),
             "client_roots": ROOTS_LIST}, "all-three", lambda got: "state-ok: all answered")),
        "test_input_required_result_multi_round": multi_round,
        "test_input_required_result_tampered_state": answered(lambda ctx, a: (
            {"user_name": name_form}, "sealed", lambda got: "state-ok")),
        "test_input_required_result_capabilities": answered(capabilities),
        # the diagnostic tools of the server-stateless scenario (2026-07-28)
        "test_missing_capability": needs_sampling,
        "test_streaming_elicitation": tools_elicit,
        "test_logging_tool": with_logging,
        "test_trigger_tool_change": changes(ToolsListChanged,
                                            lambda s: s.send_tool_list_changed),
        "test_trigger_prompt_change": changes(PromptsListChanged,
                                              lambda s: s.send_prompt_list_changed),
        "test_trigger_resource_update": changes(
            lambda: ResourceUpdated(uri="test://watched-resource"),
            lambda s: lambda: s.send_resource_updated("test://watched-resource")),
    }
    schemas = {"test_sampling": ("prompt",), "test_elicitation": ("message",)}

    async def list_tools(ctx, params):
        return T.ListToolsResult(tools=[T.Tool(
            name=name, description=f"Conformance fixture: {name}", input_schema={
                "type": "object", "properties": {a: {"type": "string"} for a in
                                                 schemas.get(name, ())},
                "required": list(schemas.get(name, ()))}) for name in tools])

    async def call_tool(ctx, params):
        tool = tools.get(params.name)
        if tool is None:
            raise MCPError(T.INVALID_PARAMS, f"Unknown tool: {params.name}")
        out = tool(ctx, params.arguments or {}, params)
        out = await out if hasattr(out, "__await__") else out
        return out if isinstance(out, T.InputRequiredResult) else \
            T.CallToolResult.model_validate(out)

    resources = {
        "test://static-text": ("Static text", {"mimeType": "text/plain",
                               "text": "This is the content of the static text resource."}),
        "test://static-binary": ("Static binary", {"mimeType": "image/png", "blob": PNG_1PX}),
        "test://watched-resource": ("Watched", {"mimeType": "text/plain", "text": "watched"}),
    }

    page = int(os.environ.get("LLMHOST_TEST_MCP_PAGE") or 0)  # resources a page (0: all)

    async def list_resources(ctx, params):
        listed = [T.Resource(uri=uri, name=name, description=f"Conformance fixture: {name}",
                             mime_type=body["mimeType"]) for uri, (name, body) in
                  resources.items()]
        if not page:
            return T.ListResourcesResult(resources=listed)
        at = int(((params.cursor if params else None) or "at:0")[3:])
        more = at + page < len(listed)
        return T.ListResourcesResult(resources=listed[at:at + page],
                                     next_cursor=f"at:{at + page}" if more else None)

    async def list_templates(ctx, params):
        return T.ListResourceTemplatesResult(resource_templates=[T.ResourceTemplate(
            uri_template="test://template/{id}/data", name="Template",
            description="Conformance fixture: a template", mime_type="application/json")])

    async def read_resource(ctx, params):
        uri = str(params.uri)
        found = re.fullmatch(r"test://template/([^/]+)/data", uri)
        if found:
            body = {"mimeType": "application/json", "text": json.dumps(
                {"id": found[1], "templateTest": True, "data": f"Data for ID: {found[1]}"})}
        elif uri in resources:
            body = resources[uri][1]
        else:
            raise MCPError(T.INVALID_PARAMS, "Resource not found", {"uri": uri})
        return T.ReadResourceResult.model_validate({"contents": [dict(body, uri=uri)]})

    async def nothing(ctx, params):
        return T.EmptyResult()

    def user(content):
        return {"role": "user", "content": content}

    prompts = {
        "test_simple_prompt": ((), lambda a: [user(
            {"type": "text", "text": "This is a simple prompt for testing."})]),
        "test_prompt_with_arguments": (("arg1", "arg2"), lambda a: [user({
            "type": "text", "text": f"Prompt with arguments: arg1='{a.get('arg1')}', "
                                    f"arg2='{a.get('arg2')}'"})]),
        "test_prompt_with_embedded_resource": (("resourceUri",), lambda a: [
            user({"type": "resource", "resource": {"uri": a.get("resourceUri"),
                  "mimeType": "text/plain", "text": "Embedded resource content for testing."}}),
            user({"type": "text", "text": "Please process the embedded resource above."})]),
        "test_prompt_with_image": ((), lambda a: [
            user({"type": "image", "data": PNG_1PX, "mimeType": "image/png"}),
            user({"type": "text", "text": "Please analyze the image above."})]),
        "test_input_required_result_prompt": ((), None),
    }

    async def list_prompts(ctx, params):
        return T.ListPromptsResult(prompts=[T.Prompt(
            name=name, description=f"Conformance fixture: {name}",
            arguments=[T.PromptArgument(name=a, required=True) for a in args])
            for name, (args, _) in prompts.items()])

    async def get_prompt(ctx, params):
        if params.name not in prompts:
            raise MCPError(T.INVALID_PARAMS, f"Unknown prompt: {params.name}")
        make = prompts[params.name][1]
        if make is None:
            got = await answers(ctx, params, {"user_context": conformance_form(
                "What context should the prompt use?", {"context": {"type": "string"}},
                ["context"])})
            if isinstance(got, T.InputRequiredResult):
                return got
            context = (got["user_context"].get("content") or {}).get("context")
            make = lambda a: [user({"type": "text", "text": f"Context: {context}"})]  # noqa: E731
        return T.GetPromptResult.model_validate({"messages": make(params.arguments or {})})

    async def complete(ctx, params):
        return T.CompleteResult(completion=T.Completion(values=["paris", "park", "party"],
                                                        total=3, has_more=False))

    server = Server("conformance-fixture", version="1.0", on_list_tools=list_tools,
                    on_call_tool=call_tool, on_list_resources=list_resources,
                    on_list_resource_templates=list_templates, on_read_resource=read_resource,
                    on_subscribe_resource=nothing, on_unsubscribe_resource=nothing,
                    on_list_prompts=list_prompts, on_get_prompt=get_prompt,
                    on_completion=complete, on_set_logging_level=nothing,
                    on_subscriptions_listen=ListenHandler(bus))
    server.middleware.append(RequestStateBoundary(RequestStateSecurity.ephemeral(),
                                                  default_audience="conformance-fixture"))
    sock = mcp_test_listener(int(argv[0]) if argv else 0)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    app = server.streamable_http_app()
    config = uvicorn.Config(legacy_only(app) if legacy else app, log_level="warning",
                            lifespan="on")
    anyio.run(uvicorn.Server(config).serve, [sock])


def mcp_oauth_settings(issuer, port, path):
    """MCPServer keyword arguments that make it take only tokens of the authorization server
    `issuer` with scope mcp, checked by introspection (RFC 7662), with the SDK's server auth: a
    401 naming its protected resource metadata, which it serves (RFC 9728)."""
    import httpx2
    from mcp.server.auth.provider import AccessToken
    from mcp.server.auth.settings import AuthSettings

    class Introspection:
        async def verify_token(self, token):
            async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
                answer = (await http.post(f"{issuer}/introspect", data={"token": token})).json()
            if not answer.get("active"):
                return None
            return AccessToken(token=token, client_id=answer["client_id"],
                               scopes=answer["scope"].split(), expires_at=answer.get("exp"))

    return {"token_verifier": Introspection(), "auth": AuthSettings(
        issuer_url=issuer, resource_server_url=f"http://127.0.0.1:{port}{path}",
        required_scopes=["mcp"], validate_token_resource=False)}


async def asgi_body(receive):
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


def asgi_replay(receive, body):
    """A `receive` that gives `body` (already read) first, then what `receive` gives."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


def scope_for_tool(app, issuer, metadata, tool, scope):
    """An ASGI wrapper: a call of `tool` with a token without `scope` is refused with 403
    insufficient_scope naming the scopes it takes (RFC 6750 §3.1), as a server asks for a
    step-up."""
    import httpx2

    async def guarded(s, receive, send):
        if s["type"] != "http" or s["method"] != "POST":
            return await app(s, receive, send)
        body = await asgi_body(receive)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("method") == "tools/call" and \
                (doc.get("params") or {}).get("name") == tool:
            token = dict(s["headers"]).get(b"authorization", b"")[7:].decode()
            async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
                answer = (await http.post(f"{issuer}/introspect", data={"token": token})).json()
            if scope not in (answer.get("scope") or "").split():
                challenge = (f'Bearer error="insufficient_scope", scope="mcp {scope}", '
                             f'resource_metadata="{metadata}"')
                await send({"type": "http.response.start", "status": 403, "headers": [
                    (b"www-authenticate", challenge.encode()), (b"content-length", b"0")]})
                return await send({"type": "http.response.body", "body": b""})
        return await app(s, asgi_replay(receive, body), send)
    return guarded


def without_result_type(app):
    """An ASGI wrapper that drops `resultType` from the results a 2026-07-28 server sends, as
    servers written before SEP-2322 made it required do (absent means complete)."""
    async def stripped(s, receive, send):
        async def sending(message):
            if message["type"] == "http.response.body":
                message = dict(message, body=re.sub(rb',"resultType":"complete"|"resultType":'
                                                    rb'"complete",?', b"", message["body"]))
            elif message["type"] == "http.response.start":
                message = dict(message, headers=[(k, v) for k, v in message["headers"]
                                                 if k.lower() != b"content-length"])
            await send(message)
        return await app(s, receive, sending)
    return stripped


def legacy_only(app):
    """An ASGI wrapper that makes a streamable-HTTP server speak only the session era (before
    2026-07-28): `server/discover` is "method not found", so clients use `initialize`."""
    async def legacy(scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await app(scope, receive, send)
        body = await asgi_body(receive)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("method") == "server/discover":
            out = json.dumps({"jsonrpc": "2.0", "id": doc.get("id"), "error": {
                "code": -32601, "message": "Method not found"}}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(out)).encode())]})
            return await send({"type": "http.response.body", "body": out})
        return await app(scope, asgi_replay(receive, body), send)
    return legacy


MCP_STDIO = {"command": sys.executable, "args": [TESTS_PY, "mcp-server", "stdio"]}


@pytest.fixture(scope="module")
def mcp_env(tmp_path_factory):
    """A fake upstream with model `fake-model` (plain) and alias `agent` (with MCP server `t`
    attached), llmhost in-process. The stdio MCP server starts with it, once."""
    fake = FakeUpstream()
    path = write_registry(tmp_path_factory.mktemp("mcp") / "servers.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]},
        {"name": "agent", "url": fake.url, "models": ["fake-model"], "alias": "agent",
         "mcp": ["t"]},
        {"name": "eyes", "url": fake.url, "models": ["fake-model"], "alias": "eyes",
         "mcp": ["t"], "vision": True},
        {"name": "shaky", "url": fake.url, "models": ["fake-model"], "alias": "shaky",
         "mcp": ["t", "broken"]},
        {"name": "native-agent", "url": fake.url, "models": ["fake-model"],
         "alias": "native-agent", "mcp": ["t"], "native": ["responses", "messages"]},
        {"name": "native-bare", "url": fake.url, "models": ["fake-model"],
         "alias": "native-bare", "native": ["responses", "messages"]}],
        mcp={"t": MCP_STDIO, "broken": {"command": "/nonexistent/mcp-server"}})
    running = Running(path)
    yield running, fake
    running.stop(timeout=5)
    fake.close()


def agent_chat(port, calls_script, fake, stream=False, **extra):
    fake.steps.clear()
    fake.requests.clear()
    fake.script(*calls_script)
    body = dict({"model": "agent", "messages": [{"role": "user", "content": "go"}]}, **extra)
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    status, headers, raw = post(port, "/v1/chat/completions", body, timeout=TIMEOUT * 3)
    return status, headers, raw


def start_mcp_server(running, name="t"):
    """Start MCP server `name` and wait until it is up (GET /v1/mcp/tools?model= lists its
    tools): under load a stdio server's start can take longer than a chat request waits for
    an attached one (MCP_ATTACHED_WAIT), which then goes without its tools."""
    def ready():
        servers = json.loads(request(running.port, "GET", "/v1/mcp/servers")[2])["data"]
        return any(s["name"] == name and s["state"] == "ready" for s in servers)
    if not ready():
        model = next(m for m in running.gateway.router.table if any(
            name in up.entry.get("mcp", ()) for up, _ in running.gateway.router.table[m]))
        request(running.port, "GET", "/v1/mcp/tools?model=" + model, timeout=TIMEOUT * 3)
        assert wait_until(ready, TIMEOUT * 3)


def test_mcp_one_round_non_stream(mcp_env):
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [{"calls": [("t__echo", {"text": "hi"})]}], fake)
    doc = json.loads(raw)
    assert status == 200, doc
    assert doc["choices"][0]["message"]["content"] == "tool result: hi"
    (call,) = doc["mcp_calls"]
    assert (call["server"], call["tool"], call["arguments"], call["ok"]) == \
        ("t", "echo", {"text": "hi"}, True)
    assert doc["usage"]["total_tokens"] == 6 + 10  # both rounds
    first, second = [json.loads(r["body"]) for r in fake.posts()]
    names = [t["function"]["name"] for t in first["tools"]]
    assert "t__echo" in names and "t__weather" in names
    echo = next(t for t in first["tools"] if t["function"]["name"] == "t__echo")["function"]
    assert echo["description"] == "Echo text back."
    assert echo["parameters"]["properties"]["text"]["type"] == "string"
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "t__echo"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_0", "content": "hi"}


def test_metrics_count_mcp_calls_by_server_tool_and_outcome(mcp_env):
    running, fake = mcp_env

    start_mcp_server(running)
    _, before = scrape(running.port)  # (the module's server has run other tests' calls)
    status, _, raw = agent_chat(running.port, [{"calls": [("t__echo", {"text": "hi"}),
                                                          ("made_up", {})]}], fake)
    assert status == 200, raw
    _, after = scrape(running.port)

    def delta(name, **labels):
        return (series(after, name, **labels) or 0) - (series(before, name, **labels) or 0)
    assert delta("llmhost_mcp_calls_total", server="t", tool="echo", outcome="ok") == 1
    assert delta("llmhost_mcp_calls_total", server="none", tool="unknown", outcome="error") == 1
    assert delta("llmhost_mcp_call_duration_seconds_count", server="t", tool="echo") == 1
    assert delta("llmhost_requests_total", route="/v1/chat/completions", model="agent",
                 status="200") == 1
    assert delta("llmhost_tokens_total", model="agent", kind="prompt") + delta(
        "llmhost_tokens_total", model="agent", kind="completion") == 6 + 10  # both rounds


def test_mcp_stream_is_a_valid_chunk_stream(mcp_env):
    running, fake = mcp_env
    status, headers, raw = agent_chat(running.port, [{"calls": [("t__echo", {"text": "yo"})]}],
                                      fake, stream=True)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "tool result: yo"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    assert finals[0]["mcp_calls"][0]["tool"] == "echo"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 16
    assert not any("tool_calls" in (c["choices"][0]["delta"] if c["choices"] else {})
                   for c in chunks)  # MCP calls are llmhost's business, not the client's
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}  # one completion across the rounds


@pytest.mark.parametrize("arguments", ['{"text": "hey"}', {"text": "hey"}])
def test_mcp_stream_from_a_server_that_ignores_stream(mcp_env, arguments):
    """A server that answers a stream request with a whole JSON completion (its tool call
    arguments a string, or an object as some servers send): its tool calls still run and the
    client still gets a stream."""
    running, fake = mcp_env
    calls = {"status": 200, "body": {"id": "c1", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [{
                "id": "k1", "type": "function",
                "function": {"name": "t__echo", "arguments": arguments}}]}}]}}
    answer = {"status": 200, "body": {"id": "c2", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                          "content": "done"}}]}}
    status, headers, raw = agent_chat(running.port, [calls, answer], fake, stream=True)
    assert status == 200 and headers["content-type"] == "text/event-stream", raw
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == "done"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals[0]["mcp_calls"][0]["tool"] == "echo" and finals[0]["mcp_calls"][0]["ok"]
    assert {c["id"] for c in chunks} == {"c1"}
    messages = json.loads(fake.posts()[1]["body"])["messages"]
    assert messages[-1] == {"role": "tool", "tool_call_id": "k1", "content": "hey"}


@pytest.mark.parametrize("step", [
    {"status": 200, "body": {"error": {"message": "model overloaded"}}},
    {"status": 200, "body": {"choices": []}},
    {"status": 200, "raw": b"not json"},
])
@pytest.mark.parametrize("stream", [False, True])
def test_mcp_answer_that_is_no_completion_is_relayed(mcp_env, caplog, step, stream):
    """What a plain request would get, unchanged: not a 500 with a traceback."""
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [step], fake, stream=stream)
    assert status == 200
    assert raw == (step["raw"] if "raw" in step else json.dumps(step["body"]).encode())
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("stream", [False, True])
def test_mcp_loop_reads_answers_an_upstream_compressed_anyway(mcp_env, stream):
    """The tool loop reads each round: gzip and deflate are decoded, whole or as a stream
    (before: a stream ended with an error, a whole answer was relayed compressed without
    its field); br is a 502 that names it (before: relayed as garbage)."""
    running, fake = mcp_env
    status, headers, raw = agent_chat(running.port, [
        {"calls": [("t__echo", {"text": "hi"})], "encoding": "gzip"}, {"encoding": "deflate"}],
        fake, stream=stream)
    assert status == 200 and "content-encoding" not in headers, raw[:300]
    if stream:
        events = sse_events(raw)
        assert events[-1] == "[DONE]", raw[-300:]
        assert not any("error" in json.loads(e) for e in events[:-1]), raw[-300:]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in map(
            json.loads, events[:-1]) if c.get("choices"))
    else:
        text = json.loads(raw)["choices"][0]["message"]["content"]
    assert text == "tool result: hi"
    status, _, raw = agent_chat(running.port, [{"encoding": "br"}], fake, stream=stream)
    assert status == 502 and "encoded as 'br'" in json.loads(raw)["error"]["message"], raw


def test_mcp_with_no_tools_sends_none_upstream(mcp_env):
    """allowed_tools that match nothing: OpenAI refuses "tools": [], so none is sent (and no
    tool_choice without tools)."""
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [{}], fake, model="fake-model", tool_choice="auto",
                                tools=[{"type": "mcp", "server_label": "t",
                                        "allowed_tools": []}])
    assert status == 200, raw
    sent = json.loads(fake.posts()[0]["body"])
    assert "tools" not in sent and "tool_choice" not in sent


def test_mcp_parallel_calls_and_result_kinds(mcp_env):
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [{"calls": [
        ("t__echo", {"text": "a"}), ("t__weather", {"city": "Oslo"}), ("t__pixel", {}),
        ("t__boom", {})]}], fake)
    doc = json.loads(raw)
    content = doc["choices"][0]["message"]["content"]
    parts = content[len("tool result: "):].split(" | ")
    assert parts[0] == "a"
    assert json.loads(parts[1]) == {"city": "Oslo", "temp_c": 21.5}  # structuredContent
    assert parts[2].startswith("[image: image/png, ")
    assert "Error executing tool boom" in parts[3]  # isError: given to the model as text
    assert [c["ok"] for c in doc["mcp_calls"]] == [True, True, True, False]


def test_mcp_images_reach_vision_models_as_parts(mcp_env):
    running, fake = mcp_env
    for model, expect_image in (("agent", False), ("eyes", True)):
        agent_chat(running.port, [{"calls": [("t__pixel", {})]}], fake, model=model)
        messages = json.loads(fake.posts()[1]["body"])["messages"]
        assert messages[-2 if expect_image else -1]["content"].startswith("[image: image/png")
        if expect_image:
            parts = messages[-1]["content"]
            assert messages[-1]["role"] == "user" and parts[1]["type"] == "image_url"
            assert parts[1]["image_url"]["url"] == "data:image/png;base64," + PNG_1PX


def test_mcp_bad_arguments_go_back_to_the_model(mcp_env):
    running, fake = mcp_env
    fake.steps.clear()
    fake.script({"calls": [("t__echo", {"wrong": 1})]}, {})
    status, _, raw = agent_chat(running.port, [{"calls": [("t__echo", {"wrong": 1})]}], fake)
    doc = json.loads(raw)
    assert status == 200 and doc["mcp_calls"][0]["ok"] is False
    assert doc["choices"][0]["message"]["content"].startswith("tool result: ")


def test_mcp_max_rounds(mcp_env):
    running, fake = mcp_env
    running.gateway.app.mcp_max_rounds = 2
    try:
        call = {"calls": [("t__echo", {"text": "again"})]}
        status, _, raw = agent_chat(running.port, [call, call, call], fake)
    finally:
        running.gateway.app.mcp_max_rounds = llmhost.MCP_MAX_ROUNDS
    doc = json.loads(raw)
    assert doc["mcp_rounds_exhausted"] is True and len(doc["mcp_calls"]) == 2
    assert "stopped after 2 rounds" in doc["choices"][0]["message"]["content"]
    assert json.loads(fake.posts()[-1]["body"])["tool_choice"] == "none"
    assert len(fake.posts()) == 3


def test_mcp_client_tools_go_back_to_the_client(mcp_env):
    running, fake = mcp_env
    client_tool = {"type": "function", "function": {"name": "lookup", "parameters": {}}}
    for stream in (False, True):
        status, _, raw = agent_chat(running.port, [{"calls": [
            ("lookup", {"q": 1}), ("t__echo", {"text": "x"})]}], fake, stream=stream,
            tools=[client_tool])
        if stream:
            chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
            calls = [tc for c in chunks if c["choices"] for tc in
                     c["choices"][0]["delta"].get("tool_calls") or ()]
            finish = [c["choices"][0]["finish_reason"] for c in chunks
                      if c["choices"] and c["choices"][0]["finish_reason"]]
            report = [c for c in chunks if "mcp_calls" in c][0]["mcp_calls"]
        else:
            doc = json.loads(raw)
            calls = doc["choices"][0]["message"]["tool_calls"]
            finish = [doc["choices"][0]["finish_reason"]]
            report = doc["mcp_calls"]
        assert [c["function"]["name"] for c in calls] == ["lookup"]
        assert json.loads(calls[0]["function"]["arguments"]) == {"q": 1}
        assert finish == ["tool_calls"]
        # not run: the conversation the client sends back holds only its own call, so the
        assert report == []  # model asks for echo again then, and nothing runs twice
        assert len(fake.posts()) == 1
        tools = [t["function"]["name"] for t in json.loads(fake.posts()[0]["body"])["tools"]]
        assert tools[0] == "lookup" and "t__echo" in tools  # the client's own kept beside
    status, doc = jpost(running.port, "/v1/chat/completions", {
        "model": "agent", "messages": [{"role": "user", "content": "go"}],
        "tools": [{"type": "function", "function": {"name": "t__echo", "parameters": {}}}]})
    assert status == 400 and doc["error"]["code"] == "tool_name_conflict"


ALLOWED = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
    {"type": "function", "function": {"name": "t__echo"}}]}}


@pytest.mark.parametrize("choice, later", [
    ("required", "auto"),
    ({"type": "function", "function": {"name": "t__echo"}}, "auto"),
    (ALLOWED, dict(ALLOWED, allowed_tools=dict(ALLOWED["allowed_tools"], mode="auto"))),
    (dict(ALLOWED, allowed_tools=dict(ALLOWED["allowed_tools"], mode="auto")), None),  # kept
])
def test_mcp_a_forced_tool_choice_holds_for_the_first_round_only(mcp_env, choice, later):
    """Else a model that obeys it calls a tool again every round, up to the limit; a list of
    allowed tools stays a limit."""
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [{"calls": [("t__echo", {"text": "x"})]}], fake,
                                tool_choice=choice)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == \
        "tool result: x"
    first, second = [json.loads(r["body"]) for r in fake.posts()]
    assert first["tool_choice"] == choice and second["tool_choice"] == (later or choice)


def test_mcp_a_tool_name_nobody_gave_goes_back_to_the_model_as_an_error(mcp_env):
    """Small models make names up: the model is told (as for bad arguments), the real calls
    of the round run, and the client, which offered no tools, gets no tool call; calls
    without an id (some servers omit it) get one, as their tool messages must name it."""
    running, fake = mcp_env
    for stream in (False, True):
        status, _, raw = agent_chat(running.port, [{"calls": [
            ("t__nosuch", {}), ("t__echo", {"text": "x"})], "no_ids": not stream}], fake,
            stream=stream)
        assert status == 200
        if stream:
            chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                           if c["choices"])
            assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks
                           if c["choices"])
            report = [c for c in chunks if "mcp_calls" in c][0]["mcp_calls"]
        else:
            message = json.loads(raw)["choices"][0]["message"]
            text, report = message["content"], json.loads(raw)["mcp_calls"]
            assert "tool_calls" not in message
        assert text.startswith("tool result: Error: there is no tool named 't__nosuch'")
        assert text.endswith(" | x")
        assert [(r["tool"], r["ok"], r["error"]) for r in report] == \
            [("t__nosuch", False, "unknown tool"), ("echo", True, None)]
        second = json.loads(fake.posts()[1]["body"])["messages"]
        ids = [m["tool_call_id"] for m in second if m["role"] == "tool"]
        assert len(ids) == 2 and all(isinstance(i, str) and i for i in ids)
        assert [c["id"] for c in second[-3]["tool_calls"]] == ids


def test_mcp_the_clients_calls_of_other_kinds_and_without_ids_go_back_to_it(mcp_env):
    """A custom tool call (no "function") is the client's, passed on as it came but for the
    id it lacked; a model told of a made-up name hears of the client's tools too."""
    running, fake = mcp_env
    custom = {"type": "custom", "custom": {"name": "grammar", "input": "x + 1"}}
    status, _, raw = agent_chat(running.port, [{"calls": [("-", {})], "raw_calls": [
        custom, {"type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}],
        fake, tools=[{"type": "custom", "custom": {"name": "grammar"}},
                     {"type": "function", "function": {"name": "lookup", "parameters": {}}}])
    calls = json.loads(raw)["choices"][0]["message"]["tool_calls"]
    assert status == 200 and [c.get("type") for c in calls] == ["custom", "function"]
    assert calls[0]["custom"] == custom["custom"] and all(c["id"] for c in calls)
    status, _, raw = agent_chat(running.port, [{"calls": [("t__nosuch", {})]}], fake,
                                tools=[{"type": "function", "function": {"name": "lookup"}}])
    told = json.loads(fake.posts()[1]["body"])["messages"][-1]["content"]
    assert status == 200 and told.startswith("Error: there is no tool named 't__nosuch'")
    assert "lookup" in told and "t__echo" in told


def test_mcp_an_attached_server_that_fails_is_left_out(mcp_env, caplog):
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [{"calls": [("t__echo", {"text": "still"})]}],
                                fake, model="shaky")  # its "broken" server cannot start
    doc = json.loads(raw)
    assert status == 200 and doc["choices"][0]["message"]["content"] == "tool result: still"
    assert any("MCP server broken left out of this request" in r.getMessage()
               for r in caplog.records)


def test_mcp_an_attached_server_that_hangs_delays_one_request_not_each(fake, tmp_path, caplog,
                                                                      monkeypatch):
    monkeypatch.setattr(llmhost, "MCP_ATTACHED_WAIT", 2.5)  # (5 s in serve)
    mcp = {"t": MCP_STDIO, "stuck": {"command": "sleep", "args": ["60"]}}  # `stuck` never answers
    servers = [{"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["t"]}]
    registry = write_registry(tmp_path / "s.json", servers, mcp=mcp)
    running = Running(registry)
    took = []
    try:
        start_mcp_server(running)  # `t` is up first (its start can take seconds on a busy
        fake.script({"calls": [("t__echo", {"text": "x"})]})  # CPU)
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT, timeout=60)
        assert doc["choices"][0]["message"]["content"] == "tool result: x", doc
        running.gateway.app.mcp._connect_timeout = 3.5  # what is timed below is `stuck`'s
        servers[0]["mcp"].append("stuck")  # connect, cut to 3.5 s (30 s in serve)
        write_registry(registry, servers, mcp=mcp)
        running.call(running.gateway.reload())
        for _ in range(3):
            fake.script({"calls": [("t__echo", {"text": "x"})]})
            started = time.monotonic()
            status, doc = jpost(running.port, "/v1/chat/completions", CHAT, timeout=30)
            took.append(time.monotonic() - started)
            assert doc["choices"][0]["message"]["content"] == "tool result: x", doc
        # the first waits for the start the reload began until MCP_ATTACHED_WAIT (2.5 s) after
        # it began, not all of the connect timeout; the next do not wait: it is still starting
        assert 1.0 <= took[0] < 3.4 and max(took[1:]) < 1.5, took  # (then retried aside)
    finally:
        running.stop(timeout=5)
    # the shutdown cut `stuck`'s start: it stays closed (before: the cut start marked it idle
    # after aclose() had marked it closed, a move the state table does not allow)
    assert "bug: state" not in caplog.text


def test_mcp_a_start_whose_caller_left_is_no_failure():
    """Two requests need a server that is starting; the one that started it leaves (its
    client went away): the other gets the server, not the first one's cancellation as an
    error, and no failure is counted against the server."""
    async def until(predicate):
        while not predicate():
            await asyncio.sleep(0.01)

    def awaits(task, name):  # whether the task waits somewhere inside coroutine `name`
        coro = task.get_coro()
        while coro is not None and getattr(coro, "__name__", None) != name:
            coro = getattr(coro, "cr_await", None)
        return coro is not None

    def in_start():  # tasks inside the hub's start of a server: starting it, or waiting for it
        return sum(awaits(task, "_ensure") for task in asyncio.all_tasks())

    async def main():
        hub = llmhost.MCPHub({"t": MCP_STDIO}, environ={})

        def starting():  # as GET /v1/mcp/servers shows it
            return [s["state"] for s in hub.status() if s["name"] == "t"] == ["connecting"]
        try:
            first = asyncio.ensure_future(hub.tools(["t"]))
            await asyncio.wait_for(until(starting), TIMEOUT)
            second = asyncio.ensure_future(hub.tools(["t"]))  # waits for the same start
            await asyncio.wait_for(until(lambda: in_start() == 2), TIMEOUT)
            assert starting()  # (still the first one's)
            first.cancel()
            names = [b["tool"] for b in await asyncio.wait_for(second, 60)]
            return names, hub._conns["t"].failures
        finally:
            await hub.aclose()
    names, failures = asyncio.run(main())
    assert "echo" in names and failures == 0


def check_state_move(thing, path, after, allowed, caplog):
    """Take `thing` to its state `path[-1]` by `path`'s moves, then try `after`: made either
    way, and logged as an error (naming both states and the reason) only if it is not one of
    the `allowed` pairs."""
    before = path[-1]
    for state in path[1:]:
        thing.move(state, "on the way")
    assert thing.state == before and not [r for r in caplog.records if r.levelname == "ERROR"]
    thing.move(after, "the move under test")
    assert thing.state == after  # logged, never refused: the code that moved has acted already
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    if (before, after) in allowed:
        assert errors == []
    else:
        assert len(errors) == 1 and f"{before} -> {after}" in errors[0] and \
            "the move under test" in errors[0], errors
    with pytest.raises(ValueError):  # a state no table knows is a typo: refused, state kept
        thing.move("stoped", "a typo")
    assert thing.state == after


# The moves the MCP bridge makes, read from the code; any other is a bug. The strings are
# what /v1/mcp/servers shows.
MCP_STATE_MOVES = {
    ("idle", "connecting"), ("idle", "closed"),
    ("connecting", "ready"), ("connecting", "failed"), ("connecting", "closed"),
    ("ready", "idle"), ("ready", "closed"),
    ("failed", "connecting"), ("failed", "failed"), ("failed", "idle"), ("failed", "closed"),
    ("closed", "closed")}
MCP_STATE_PATHS = {"idle": ["idle"], "connecting": ["idle", "connecting"],
                   "ready": ["idle", "connecting", "ready"],
                   "failed": ["idle", "connecting", "failed"], "closed": ["idle", "closed"]}


@pytest.mark.parametrize("before", MCP_STATE_PATHS)
@pytest.mark.parametrize("after", MCP_STATE_PATHS)
def test_mcp_state_moves_outside_the_table_are_logged_as_bugs(before, after, caplog):
    check_state_move(llmhost._MCPConn("t", MCP_STDIO), MCP_STATE_PATHS[before], after,
                     MCP_STATE_MOVES, caplog)


def test_mcp_editing_a_server_lets_its_running_calls_finish(fake, tmp_path):
    servers = [{"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["t"]}]
    registry = write_registry(tmp_path / "s.json", servers, mcp={"t": MCP_STDIO})
    running = Running(registry)
    try:
        fake.script({"calls": [("t__pid", {})]})  # started, and its pid noted
        before = jpost(running.port, "/v1/chat/completions", CHAT)[1]["choices"][0]
        # held until the edited entry's new process has answered (over a second on a slow box)
        started, release = tmp_path / "slow-started", tmp_path / "release"
        fake.script({"calls": [("t__slow", {"seconds": 60, "note": str(started),
                                            "until": str(release)})]})
        threads, results = held_requests(running.port, 1)
        assert wait_until(started.exists)  # the model asked for the call, which is running
        write_registry(registry, servers, mcp={"t": dict(MCP_STDIO, timeout=90)})
        running.call(running.gateway.reload())
        fake.script({"calls": [("t__pid", {})]})  # a new call goes to the edited entry at once
        after = jpost(running.port, "/v1/chat/completions", CHAT)[1]["choices"][0]
        assert after["message"]["content"] != before["message"]["content"]  # a new process
        assert results == []
        release.touch()
        threads[0].join(TIMEOUT)
        status, raw = results[0][0], results[0][2]
        assert status == 200  # the old process finished the call it had: nothing was cut
        assert json.loads(raw)["choices"][0]["message"]["content"] == "tool result: released"
        old_pid = int(before["message"]["content"].split(": ")[1])
        assert wait_until(lambda: not pid_alive(old_pid))  # ... and then it was stopped
    finally:
        running.stop(timeout=5)


def test_mcp_a_huge_tool_result_is_cut_and_the_model_told(mcp_env):
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [{"calls": [("t__echo", {"text": "x" * 150_000})]}],
                                fake)
    content = json.loads(raw)["choices"][0]["message"]["content"]
    assert content.endswith("x\n[llmhost: the result was cut to 100000 of 150000 characters]")
    assert len(content) < 100_200


@pytest.mark.parametrize("stream", [False, True])
def test_mcp_text_written_beside_tool_calls_is_in_the_answer_both_ways(mcp_env, stream):
    """The stream passes each round's text as it comes (it cannot know which round is the last
    one); the whole answer holds the same, rounds set apart by a blank line."""
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [
        {"calls": [("t__echo", {"text": "hi"})], "say": "Let me check."},
        {"calls": [("t__echo", {"text": "again"})]}, {}], fake, stream=stream)
    assert status == 200
    events = [json.loads(e) for e in sse_events(raw) if e != "[DONE]"]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in
                      events if e.get("choices")) if stream else \
        json.loads(raw)["choices"][0]["message"]["content"]
    assert content == "Let me check.\n\ntool result: again"
    second, third = [json.loads(r["body"])["messages"][-2:] for r in fake.posts()[1:]]
    assert second[0]["content"] == "Let me check."  # the model's own words, as it wrote them
    assert third[0]["content"] is None


@pytest.mark.parametrize("stream", [False, True])
def test_mcp_a_tool_list_changed_by_a_call_is_offered_in_the_next_round(fake, tmp_path, stream):
    """A tool that unlocks others (tools/list_changed): the request's next round may call
    them (before: only the next request was offered them); a list that became empty is no
    "tools": [] (which OpenAI refuses), nor a tool_choice without tools."""
    running = Running(write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["g"]}],
        mcp={"g": MCP_STDIO}))
    try:
        fake.script({"calls": [("g__grow", {})]}, {"calls": [("g__extra", {})]},
                    {"calls": [("g__shrink", {})]}, {})
        body = dict(CHAT, stream=stream, tool_choice="auto")
        status, _, raw = post(running.port, "/v1/chat/completions", body, timeout=TIMEOUT * 3)
        sent = [json.loads(r["body"]) for r in fake.posts()]
        first, second = [[t["function"]["name"] for t in b["tools"]] for b in sent[:2]]
        assert "g__extra" not in first and "g__extra" in second
        assert "tools" not in sent[3] and "tool_choice" not in sent[3]
        docs = [json.loads(e) for e in sse_events(raw) if e != "[DONE]"] if stream else \
            [json.loads(raw)]
        calls = next(d["mcp_calls"] for d in docs if "mcp_calls" in d)
        assert [(c["tool"], c["ok"]) for c in calls] == \
            [("grow", True), ("extra", True), ("shrink", True)]
    finally:
        running.stop(timeout=5)


def test_mcp_tools_are_for_one_answer_so_n_above_1_goes_without_them(mcp_env):
    """The loop runs the calls of one answer (before: with n=2 the stream ended choice 1
    without a finish_reason, and choice 1's MCP calls went to the client)."""
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [{}], fake, n=2)
    assert status == 200 and "tools" not in json.loads(fake.posts()[0]["body"])
    tool = {"type": "mcp", "server_label": "t", "require_approval": "never"}
    status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, n=2, tools=[tool]))
    assert status == 400 and doc["error"]["param"] == "n", doc


@pytest.mark.parametrize("stream", [False, True])
def test_mcp_loop_passes_on_an_upstream_refusal_with_its_retry_after(mcp_env, stream):
    running, fake = mcp_env  # (the openai client waits as long as Retry-After says)
    status, headers, raw = agent_chat(running.port, [
        {"status": 429, "headers": [("Retry-After", "7")]}], fake, stream=stream)
    assert status == 429 and headers.get("retry-after") == "7", headers


def test_mcp_sampling_served_by_our_model(mcp_env):
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [
        {"calls": [("t__summarize", {"topic": "cats"})]}, {}, {}], fake)
    doc = json.loads(raw)
    assert doc["mcp_calls"][0]["ok"] is True, doc
    assert doc["choices"][0]["message"]["content"] == \
        "tool result: model=fake-model text=echo: Write about cats"
    sampling = json.loads(fake.posts()[1]["body"])  # the MCP server's request, via the router
    assert sampling["model"] == "fake-model" and sampling["max_tokens"] == 42
    assert sampling["stop"] == ["END"]
    assert sampling["messages"][0] == {"role": "system", "content": "Be brief."}


def test_mcp_sampling_goes_to_the_model_of_the_calling_request_not_the_last_caller(tmp_path):
    """A sampling request does not say which tool call it is for: the model is that of the
    requests whose calls run on the server then; with two models' calls running, neither gets
    the prompt (it may hold one client's data)."""
    fake = FakeUpstream()
    running = Running(write_registry(tmp_path / "s.json", [
        {"name": "a", "url": fake.url, "models": ["model-a"], "mcp": ["t"]},
        {"name": "b", "url": fake.url, "models": ["model-b"], "mcp": ["t"]}], mcp={"t": MCP_STDIO}))
    try:
        start_mcp_server(running)

        def chat(model, results):
            body = {"model": model, "messages": [{"role": "user", "content": "go"}]}
            results[model] = post(running.port, "/v1/chat/completions", body, timeout=TIMEOUT * 3)

        # a's sampling request waits for a release, made when b's call is done, or under way
        b_started, b_release = tmp_path / "b-started", tmp_path / "b-release"
        for b_call, expected in [(("t__echo", {"text": "b"}), "model-a"),  # b's done by then
                                 (("t__slow", {"seconds": 60, "note": str(b_started),
                                               "until": str(b_release)}), None)]:  # running
            a_release = tmp_path / f"a-release-{expected}"
            fake.steps.clear()
            fake.requests.clear()
            fake.script({"calls": [("t__summarize_later", {"topic": "cats", "seconds": 60,
                                                           "until": str(a_release)})]},
                        {"calls": [b_call]}, {}, {}, {})
            results = {}
            a = threading.Thread(target=chat, args=("model-a", results))
            a.start()
            assert wait_until(fake.posts)  # a has taken the first step
            if expected:
                chat("model-b", results)
            else:
                threading.Thread(target=chat, args=("model-b", results)).start()
                assert wait_until(b_started.exists, TIMEOUT * 3)
            a_release.touch()
            a.join(TIMEOUT * 3)
            content = json.loads(results["model-a"][2])["choices"][0]["message"]["content"]
            sampled = [json.loads(r["body"])["model"] for r in fake.posts()
                       if b"Be brief." in r["body"]]  # the sampling request
            if expected:
                assert sampled == [expected]
                assert content == "tool result: model=model-a text=echo: Write about cats"
            else:
                assert sampled == [], fake.posts()
                assert "requests for 2 models are calling its tools; set sampling_model" in \
                    content, content
                b_release.touch()
                assert wait_until(lambda: "model-b" in results)
    finally:
        running.stop(timeout=5)
        fake.close()


def test_mcp_elicitation_defaults_or_decline(mcp_env):
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [{"calls": [("t__prefs", {}), ("t__name", {})]}],
                                fake)
    doc = json.loads(raw)
    results = doc["choices"][0]["message"]["content"][len("tool result: "):].split(" | ")
    assert results[0] == "colour=blue count=3"
    assert [c["ok"] for c in doc["mcp_calls"]] == [True, False]  # no default: declined


def test_mcp_url_elicitation_is_declined(tmp_path):
    """No person is at the gateway to send to a page: a URL-mode elicitation is declined (a
    session-era server; a 2026-07-28 one asks in its result, which the SDK answers the same)."""
    proc, port = start_mcp_http("http-legacy")
    try:
        result = mcp_cli(str(tmp_path / "s.json"), "call", "--url",
                         f"http://127.0.0.1:{port}/mcp", "visit")
        assert result.returncode == 0 and result.stdout.strip() == "visit decline", result
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def test_mcp_roots_progress_and_logs_reach_the_host(tmp_path, fake, caplog):
    """Roots are the --root folders; a tool's progress and its server's log messages go to
    llmhost's log (at the server's level)."""
    import logging
    caplog.set_level(logging.INFO, logger="llmhost.mcp")
    registry = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["t"]}],
        mcp={"t": MCP_STDIO})
    running = Running(registry, mcp_roots=[str(tmp_path)])
    try:
        fake.script({"calls": [("t__roots", {}), ("t__chatty", {})]})
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert doc["choices"][0]["message"]["content"] == \
            f"tool result: file://{tmp_path} | chatty done", doc
    finally:
        running.stop(timeout=5)
    logged = [r.getMessage() for r in caplog.records]
    assert "MCP t/chatty: progress 1.0/2.0 half way" in logged, logged
    assert "MCP t: chatty is working" in logged, logged


def test_mcp_per_request_selection_and_refusals(mcp_env):
    running, fake = mcp_env
    mcp_tool = {"type": "mcp", "server_label": "t", "allowed_tools": ["echo"],
                "require_approval": "never"}
    status, _, raw = agent_chat(running.port, [{"calls": [("t__echo", {"text": "sel"})]}], fake,
                                model="fake-model", tools=[mcp_tool])
    assert json.loads(raw)["choices"][0]["message"]["content"] == "tool result: sel"
    tools = [t["function"]["name"] for t in json.loads(fake.posts()[0]["body"])["tools"]]
    assert tools == ["t__echo"]  # allowed_tools filters
    for tool, code in [
            (dict(mcp_tool, server_label="nope"), "mcp_server_not_found"),
            (dict(mcp_tool, server_label="x", server_url="http://169.254.169.254/mcp"),
             "mcp_url_not_allowed"),
            (dict(mcp_tool, require_approval="always"), "invalid_request")]:
        status, doc = jpost(running.port, "/v1/chat/completions",
                            dict(CHAT, tools=[tool]))
        assert status == 400 and doc["error"]["code"] == code, doc


@pytest.mark.parametrize("url, prefix, allowed", [
    ("http://127.0.0.1:8931/mcp", "http://127.0.0.1:8931", True),
    ("http://127.0.0.1:8931/mcp/x", "http://127.0.0.1:8931/mcp", True),
    ("http://127.0.0.1:5555/mcp", "http://127.0.0.1:", True),  # every port of that host
    ("http://127.0.0.1:8931@evil.example:80/mcp", "http://127.0.0.1:8931", False),  # a user part
    ("http://127.0.0.1:8931\\@evil.example/mcp", "http://127.0.0.1:8931", False),
    ("http://127.0.0.1.evil.example/mcp", "http://127.0.0.1:", False),
    ("http://127.0.0.1:8931/mcpx", "http://127.0.0.1:8931/mcp", False),
    ("https://127.0.0.1:8931/mcp", "http://127.0.0.1:8931", False),
    ("http://127.0.0.1:8931/allowed/../mcp", "http://127.0.0.1:8931/allowed/", False),  # sent
    ("http://127.0.0.1:8931/allowed/%2E%2e/mcp", "http://127.0.0.1:8931/allowed", False),  # as
    ("http://127.0.0.1:8931/allowed/./mcp", "http://127.0.0.1:8931/allowed", False),  # /mcp
    ("http://127.0.0.1:8931/allowed/..mcp", "http://127.0.0.1:8931/allowed", True),
])
def test_mcp_allow_url_compares_parsed_urls_not_text(url, prefix, allowed):
    assert llmhost.url_under(url, prefix) is allowed


def test_mcp_unstartable_server_is_a_clear_error(mcp_env):
    running, fake = mcp_env
    status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, tools=[
        {"type": "mcp", "server_label": "broken", "require_approval": "never"}]))
    assert status == 502 and doc["error"]["code"] == "mcp_server_unavailable"
    assert "'broken'" in doc["error"]["message"]


def test_mcp_status_and_tools_endpoints(mcp_env):
    running, fake = mcp_env
    agent_chat(running.port, [{"calls": [("t__echo", {"text": "x"})]}], fake)
    servers = {s["name"]: s for s in json.loads(request(running.port, "GET",
                                                        "/v1/mcp/servers")[2])["data"]}
    assert servers["t"]["state"] == "ready" and servers["t"]["transport"] == "stdio"
    assert servers["t"]["era"] and servers["t"]["tools"] >= 10
    status, _, raw = request(running.port, "GET", "/v1/mcp/tools")
    assert status == 502  # `broken` cannot start: the listing says so rather than hiding it


def test_mcp_crashed_stdio_server_restarts_and_list_changed(mcp_env):
    running, fake = mcp_env
    status, _, raw = agent_chat(running.port, [{"calls": [("t__die", {})]}], fake)
    assert json.loads(raw)["mcp_calls"][0]["ok"] is False
    status, _, raw = agent_chat(running.port, [{"calls": [("t__echo", {"text": "back"})]}], fake)
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["content"] == "tool result: back"
    agent_chat(running.port, [{"calls": [("t__grow", {})]}], fake)

    def offered():
        agent_chat(running.port, [{}], fake, tool_choice="none")
        return [t["function"]["name"] for t in json.loads(fake.posts()[0]["body"])["tools"]]
    assert wait_until(lambda: "t__extra" in offered())  # list_changed refreshed the tool cache


def test_mcp_error_reply_keeps_the_session(mcp_env):
    """-32000 from a server is its own error (JSON-RPC leaves -32000..-32099 to servers), not
    the SDK's "Connection closed": the model gets the message and the server is not restarted."""
    running, fake = mcp_env

    def call(tool):
        status, _, raw = agent_chat(running.port, [{"calls": [(tool, {})]}], fake)
        assert status == 200, raw
        return json.loads(raw)

    before = call("t__pid")["choices"][0]["message"]["content"]
    doc = call("t__quota")
    assert doc["mcp_calls"][0]["ok"] is False
    assert doc["mcp_calls"][0]["error"] == "MCPError: quota exceeded"  # no "connection lost"
    assert call("t__pid")["choices"][0]["message"]["content"] == before


def test_mcp_an_error_after_a_tool_ran_does_not_run_it_again(mcp_env, tmp_path):
    running, fake = mcp_env
    path = str(tmp_path / "runs")
    status, _, raw = agent_chat(running.port, [{"calls": [("t__tally", {"path": path})]}], fake)
    doc = json.loads(raw)
    assert doc["mcp_calls"][0]["ok"] is False and "session log" in doc["mcp_calls"][0]["error"]
    assert open(path).read() == "ran\n"  # before: a second run (the word "session")
    status, doc = jpost(running.port, "/v1/chat/completions", {
        "model": "agent", "messages": [{"role": "user", "content": "go"}], "tools": ["x"]})
    assert status == 400 and doc["error"]["code"] == "invalid_type"  # before: a 500


def test_mcp_client_disconnect_cancels_calls(mcp_env, tmp_path):
    running, fake = mcp_env
    started = tmp_path / "slow-started"
    fake.steps.clear()
    fake.script({"calls": [("t__slow", {"seconds": 30, "note": str(started)})]})
    body = json.dumps({"model": "agent", "messages": [{"role": "user", "content": "go"}]}).encode()
    s = socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone-mid-call"
              b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_until(started.exists)  # the tool call is under way
    s.close()
    # the request ends (its access line is written): not waiting out the 30 s tool
    assert wait_until(lambda: logged_status(running, "gone-mid-call") == "499", 5.0)


def test_mcp_client_leaving_mid_round_is_no_internal_error(mcp_env, caplog):
    """A client that leaves while the model is answering an MCP round: the round is dropped
    quietly (logged as 499), not as a failure with a traceback."""
    running, fake = mcp_env
    fake.steps.clear()
    release = threading.Event()
    fake.script({"hold": release})
    body = json.dumps({"model": "agent", "messages": [{"role": "user", "content": "go"}]}).encode()
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: "
                      b"gone-mid-round\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert fake.holding.acquire(timeout=TIMEOUT)  # the model round is under way
        assert wait_until(lambda: logged_status(running, "gone-mid-round") == "499")
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        release.set()


def start_mcp_http(kind, *extra, env=None):
    proc = subprocess.Popen([sys.executable, TESTS_PY, "mcp-server", kind, *extra],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    return proc, int(line.split()[1])


def accepts(port):
    """Whether something listens on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def mcp_http_server():
    proc, port = start_mcp_http("http")
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(TIMEOUT)


def test_mcp_http_server_that_restarted_gets_a_new_session(fake, tmp_path):
    proc, port = start_mcp_http("http-legacy")  # sessions: a restart forgets ours
    registry = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["old"]}],
        mcp={"old": {"url": f"http://127.0.0.1:{port}/mcp"}})
    running = Running(registry)
    try:
        for word in ("before", "after"):
            fake.script({"calls": [("old__echo", {"text": word})]})
            status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
            assert doc["choices"][0]["message"]["content"] == f"tool result: {word}", doc
            if word == "before":
                proc.terminate()
                proc.wait(TIMEOUT)
                proc, _ = start_mcp_http("http-legacy", str(port))  # same port, new process
                assert wait_until(lambda: accepts(port))  # (the old one's connections
                # closed as it exited: llmhost learns of the restart from its next request)
    finally:
        running.stop()
        proc.terminate()
        proc.wait(TIMEOUT)


def test_mcp_2026_server_restarted_with_other_tools_is_listed_anew(fake, tmp_path):
    """A 2026 server keeps no session, so nothing shows that it restarted: its tool list is
    used as long as its ttlMs says (the SDK's servers say 0), and at least MCP_TOOLS_TTL_MIN."""
    proc, port = start_mcp_http("http")
    registry = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["h"]}],
        mcp={"h": {"url": f"http://127.0.0.1:{port}/mcp"}})
    running = Running(registry)
    old = None

    def names():
        doc = json.loads(request(running.port, "GET", "/v1/mcp/tools")[2])
        return [t["function"]["name"] for t in doc.get("data", ())]
    try:
        assert wait_until(lambda: "h__echo" in names())
        assert "h__later" not in names()
        old = proc  # a polite stop: uvicorn closes its port, then waits for open streams,
        old.terminate()  # such as our listen stream, which so never ends
        assert wait_until(lambda: not accepts(port))
        proc, _ = start_mcp_http("http", str(port), env={"LLMHOST_TEST_MCP_LATER": "1"})
        assert wait_until(lambda: "h__later" in names())
        fake.script({"calls": [("h__later", {})]})
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert doc["choices"][0]["message"]["content"] == "tool result: later ok", doc
    finally:
        running.stop()
        for p in (proc, old):
            if p is not None:
                p.kill()
                p.wait(TIMEOUT)


def test_mcp_add_says_when_an_http_server_wants_credentials(tmp_path):
    class Refuses(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="mcp"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_GET = do_POST

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        registry = write_registry(tmp_path / "s.json", [])
        before = open(registry).read()
        code, out, err = run_cli(registry, "mcp", "add", "locked", "--url",
                                 f"http://127.0.0.1:{server.server_port}/mcp")
        assert code == 1 and "HTTP 401: the server wants credentials, e.g. --header " \
            "'Authorization: Bearer TOKEN'" in err, err
        assert open(registry).read() == before
    finally:
        server.shutdown()
        server.server_close()


def test_mcp_legacy_sse_transport(fake, tmp_path):
    proc, port = start_mcp_http("sse")
    try:
        registry = str(tmp_path / "servers.json")
        code, out, err = run_cli(registry, "mcp", "add", "old", "--url",
                                 f"http://127.0.0.1:{port}/sse", "--transport", "sse")
        assert code == 0 and "tools" in out, err
        assert llmhost.load_registry(registry)["mcpServers"]["old"]["type"] == "sse"
        write_registry(registry, [{"name": "local", "url": fake.url, "models": ["fake-model"],
                                   "mcp": ["old"]}],
                       mcp=llmhost.load_registry(registry)["mcpServers"])
        running = Running(registry)
        try:
            fake.script({"calls": [("old__echo", {"text": "over sse"})]})
            status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
            assert doc["choices"][0]["message"]["content"] == "tool result: over sse"
            servers = json.loads(request(running.port, "GET", "/v1/mcp/servers")[2])["data"]
            assert servers[0]["transport"] == "sse" and servers[0]["state"] == "ready"
        finally:
            running.stop()
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def test_mcp_streamable_http_with_env_header(mcp_http_server, fake, tmp_path):
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["h"]}],
        mcp={"h": {"url": mcp_http_server, "headers": {"X-Token": "${MCP_TOKEN}"}}})
    running = Running(path, environ={"MCP_TOKEN": "tok-123"})
    try:
        fake.script({"calls": [("h__header", {"name": "x-token"})]})
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert doc["choices"][0]["message"]["content"] == "tool result: tok-123"
        servers = json.loads(request(running.port, "GET", "/v1/mcp/servers")[2])["data"]
        assert servers[0]["transport"] == "http" and servers[0]["state"] == "ready"
    finally:
        running.stop()


def test_mcp_server_url_allowed_by_prefix(mcp_http_server, fake, tmp_path):
    path = write_registry(tmp_path / "s.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, mcp_allow_urls=["http://127.0.0.1:"],
                      environ={"GATEWAY_SECRET": "s3cret"})
    try:
        tool = {"type": "mcp", "server_label": "web", "server_url": mcp_http_server,
                "headers": {"X-Token": "${GATEWAY_SECRET}"}, "require_approval": "never"}
        fake.script({"calls": [("web__echo", {"text": "via url"})]})
        status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, tools=[tool]))
        assert status == 200 and doc["choices"][0]["message"]["content"] == "tool result: via url"
        fake.script({"calls": [("web__header", {"name": "x-token"})]})
        status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, tools=[tool]))
        # a client's header values are sent as given: never expanded to the gateway's secrets
        assert doc["choices"][0]["message"]["content"] == "tool result: ${GATEWAY_SECRET}"
        status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, tools=[
            {"type": "mcp", "server_label": "web", "require_approval": "never"}]))
        assert status == 400  # another request cannot reuse it by its label alone
        assert [s["name"] for s in json.loads(request(
            running.port, "GET", "/v1/mcp/servers")[2])["data"]] == ["web"]
    finally:
        running.stop()


def test_mcp_request_servers_added_at_once_keep_their_own_spec():
    """Two requests naming one label with different URLs at the same moment: one gets the
    server, the other a 409 - never the first one's URL and headers."""
    hub = llmhost.MCPHub({}, environ={})
    spec = {"url": "http://127.0.0.1:1/mcp", "headers": {}}

    async def race():
        hub.release([await hub.add_from_request("x", spec)])  # known, idle
        return await asyncio.gather(
            hub.add_from_request("x", dict(spec, headers={"A": "1"})),
            hub.add_from_request("x", dict(spec, headers={"B": "2"})), return_exceptions=True)

    first, second = asyncio.run(race())
    assert first.spec["headers"] == {"A": "1"} and first.users == 1
    assert isinstance(second, llmhost.HTTPError) and second.status == 409
    assert hub.specs() == {} and hub._conns["x"] is first


def test_mcp_server_url_in_use_is_not_replaced(mcp_http_server, fake, tmp_path):
    """Another request naming the same label with another URL or headers is refused (409)
    while the first uses it, instead of closing the server under the first one's tool call."""
    path = write_registry(tmp_path / "s.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, mcp_allow_urls=["http://127.0.0.1:"])
    tool = {"type": "mcp", "server_label": "web", "server_url": mcp_http_server}
    other = dict(tool, headers={"X-Other": "1"})
    try:
        started, release = tmp_path / "slow-started", tmp_path / "release"
        fake.script({"calls": [("web__slow", {"seconds": 60, "note": str(started),
                                              "until": str(release)})]}, {})
        first = {}
        thread = threading.Thread(target=lambda: first.update(doc=jpost(
            running.port, "/v1/chat/completions", dict(CHAT, tools=[tool]))))
        thread.start()
        assert wait_until(started.exists)  # the slow call is under way
        status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, tools=[other]))
        assert status == 409 and doc["error"]["code"] == "mcp_label_in_use", doc
        release.touch()
        thread.join(TIMEOUT)
        status, doc = first["doc"]
        assert status == 200 and doc["mcp_calls"][0]["ok"], doc
        assert doc["choices"][0]["message"]["content"] == "tool result: released"
        status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, tools=[other]))
        assert status == 200, doc  # no longer in use: replaced
    finally:
        running.stop()


def test_mcp_list_never_prints_a_url_password(tmp_path):
    registry = str(tmp_path / "servers.json")
    code, out, err = run_cli(registry, "mcp", "add", "docs", "--no-check", "--url",
                             "http://reader:s3cret@127.0.0.1:3001/mcp")
    assert code == 0, err
    for extra in ([], ["--json"]):
        code, out, err = run_cli(registry, "mcp", "list", *extra)
        assert code == 0 and "reader:***@127.0.0.1:3001" in out and "s3cret" not in out
    assert "s3cret" in open(registry).read()  # kept: the SDK sends it


def mcp_cli(registry, *argv):
    """`python3 llmhost.py --registry REGISTRY mcp ARGV...` as a user runs it."""
    return subprocess.run([sys.executable, LLMHOST_PY, "--registry",
                           registry, "mcp", *argv], capture_output=True, text=True, timeout=60)


def at_once(*calls):
    """Call each of `calls` (no arguments) in a thread of its own, all at once -> their results
    in order. For CLI processes that do not depend on each other: each spends about a second
    of CPU importing the mcp SDK, and two cores run two of those in the time of one."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def in_background(call):
    """Start `call` (no arguments) in a thread of its own -> its Future, for .result(timeout)."""
    from concurrent.futures import Future
    future = Future()

    def run():
        try:
            future.set_result(call())
        except BaseException as exc:  # noqa: BLE001 -- raised by .result()
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


MCP_STDIO_ARGV = [MCP_STDIO["command"]] + MCP_STDIO["args"]  # (after `mcp add NAME --`)


@pytest.fixture
def mcp_cli_registry(tmp_path, mcp_http_server):
    """A registry holding MCP servers t (stdio) and w (HTTP), as `mcp add` saves them."""
    return write_registry(tmp_path / "servers.json", [],
                          mcp={"t": MCP_STDIO, "w": {"url": mcp_http_server}})


def test_mcp_cli_add_connects_to_a_server_then_saves_it(tmp_path, mcp_http_server):
    registry = str(tmp_path / "servers.json")
    result = mcp_cli(registry, "add", "t", "--", *MCP_STDIO_ARGV)
    assert result.returncode == 0 and "tools" in result.stdout, result.stderr
    assert mcp_cli(registry, "add", "w", "--url", mcp_http_server).returncode == 0
    assert llmhost.load_registry(registry)["mcpServers"] == \
        {"t": MCP_STDIO, "w": {"url": mcp_http_server}}  # (what mcp_cli_registry holds)
    listed = json.loads(mcp_cli(registry, "list", "--json").stdout)
    assert [(e["name"], e["transport"]) for e in listed] == [("t", "stdio"), ("w", "http")]


def test_mcp_cli_add_of_a_server_that_does_not_answer_is_refused_and_changes_nothing(
        mcp_cli_registry):
    before = open(mcp_cli_registry, "rb").read()
    result = mcp_cli(mcp_cli_registry, "add", "dead", "--url", "http://127.0.0.1:1/mcp")
    assert result.returncode == 1 and "'dead'" in result.stderr
    assert open(mcp_cli_registry, "rb").read() == before


def test_mcp_cli_tools_names_each_tool_as_models_see_it(mcp_cli_registry):
    tools = json.loads(mcp_cli(mcp_cli_registry, "tools", "t", "--json").stdout)
    assert "t__echo" in [t["openai_name"] for t in tools]


def test_mcp_cli_call_prints_what_the_tool_returns(mcp_cli_registry):
    result = mcp_cli(mcp_cli_registry, "call", "t", "echo", '{"text": "cli"}')
    assert result.returncode == 0 and result.stdout.strip() == "cli"


def test_mcp_cli_call_json_gives_the_text_and_the_structured_content(tmp_path,
                                                                        mcp_http_server):
    result = mcp_cli(str(tmp_path / "servers.json"), "call", "--url", mcp_http_server,
                     "weather", '{"city": "Rome"}', "--json")
    assert json.loads(json.loads(result.stdout)["text"])["city"] == "Rome"
    assert json.loads(result.stdout)["structured"]["city"] == "Rome"


def test_mcp_cli_call_of_a_tool_that_fails_exits_1_with_its_error(mcp_cli_registry):
    result = mcp_cli(mcp_cli_registry, "call", "t", "boom")
    assert result.returncode == 1 and "boom" in result.stdout


def test_mcp_cli_call_answers_a_sampling_request_with_why_it_cannot(mcp_cli_registry):
    """Sampling is declared as serve declares it (servers that list sampling tools only to
    clients able to sample show the CLI what models see), then answered with why not."""
    result = mcp_cli(mcp_cli_registry, "call", "t", "summarize", '{"topic": "cats"}')
    assert result.returncode == 1 and "the CLI has no model to answer sampling" in result.stdout


def test_mcp_cli_resources_lists_a_servers_resources(mcp_cli_registry):
    assert "test://hello" in mcp_cli(mcp_cli_registry, "resources", "t").stdout


def test_mcp_cli_prompts_lists_a_servers_prompts(tmp_path, mcp_http_server):
    assert "greet" in mcp_cli(str(tmp_path / "servers.json"), "prompts", "--url",
                              mcp_http_server).stdout


def test_mcp_cli_tools_of_every_server_still_lists_the_others_when_one_is_down(
        mcp_cli_registry):
    assert mcp_cli(mcp_cli_registry, "add", "dead", "--url", "http://127.0.0.1:1/mcp",
                   "--no-check").returncode == 0
    result = mcp_cli(mcp_cli_registry, "tools")
    assert result.returncode == 1 and "'dead'" in result.stderr
    assert "t__echo" in result.stdout and "w__echo" in result.stdout


def test_mcp_cli_remove_removes_a_server_and_fails_for_one_not_there(mcp_cli_registry):
    assert mcp_cli(mcp_cli_registry, "remove", "w").returncode == 0
    assert list(llmhost.load_registry(mcp_cli_registry)["mcpServers"]) == ["t"]
    assert mcp_cli(mcp_cli_registry, "remove", "w").returncode == 1


def test_mcp_cli_tool_names_that_clash_once_sanitised_get_serves_hash_suffix(tmp_path,
                                                                          mcp_http_server):
    """As serve names them: the listing shows models' names."""
    registry = write_registry(tmp_path / "servers.json", [], mcp={"t": MCP_STDIO})
    # (in either order: the second of the two in the registry is the one with the suffix)
    assert [r.returncode for r in at_once(
        lambda: mcp_cli(registry, "add", "a.b", "--url", mcp_http_server),
        lambda: mcp_cli(registry, "add", "a_b", "--url", mcp_http_server))] == [0, 0]
    assert sorted(llmhost.load_registry(registry)["mcpServers"]) == ["a.b", "a_b", "t"]
    names = [t["openai_name"] for t in json.loads(mcp_cli(registry, "tools", "--json").stdout)
             if t["name"] == "echo"]
    assert names[:2] == ["t__echo", "a_b__echo"] and re.fullmatch(r"a_b__echo_[0-9a-f]{8}",
                                                                   names[2]), names


def catches(pid, sig):
    """Whether process `pid` has a handler for signal `sig` (Linux: its SigCgt mask)."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(re.search(r"SigCgt:\s*([0-9a-f]+)", f.read()).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def test_mcp_cli_stopped_by_sigterm_stops_its_stdio_server(tmp_path):
    """As Ctrl-C does (timeout(1) and systemd send SIGTERM): a server that hangs at start and
    ignores its closed stdin is not left running."""
    # Two processes, started at once (each imports the SDK): one for a SIGTERM, one for two.
    # Each has a `sleep` of its own, found by its argument.
    markers = [f"{time.time() % 1000:.6f}{i}" for i in (1, 2)]  # (seconds still)
    procs = [subprocess.Popen([sys.executable, LLMHOST_PY, "--registry",
                               str(tmp_path / "s.json"), "mcp", "tools", "--", "sleep", marker],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for marker in markers]

    def sleeping(marker):
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read() == b"sleep\0" + marker.encode() + b"\0":
                        found.append(pid)
            except OSError:
                pass  # (gone meanwhile)
        return found
    try:
        proc, marker = procs[0], markers[0]
        assert wait_until(lambda: sleeping(marker) != [])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 128 + signal.SIGTERM
        assert wait_until(lambda: sleeping(marker) == [], 5)
        proc, marker = procs[1], markers[1]
        assert wait_until(lambda: sleeping(marker) != [])
        assert catches(proc.pid, signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: not catches(proc.pid, signal.SIGTERM))  # taken: cleaning up
        proc.send_signal(signal.SIGTERM)  # a second one during the cleanup: gone at once
        assert proc.wait(2) == -signal.SIGTERM
    finally:
        for proc, marker in zip(procs, markers):
            proc.kill()
            proc.wait(TIMEOUT)
            for pid in sleeping(marker):
                os.kill(int(pid), signal.SIGKILL)


def test_mcp_add_with_a_relative_path_saves_the_folder_it_is_from(tmp_path):
    """serve (systemd, another shell) may start elsewhere: the path found now must be found
    then."""
    registry = str(tmp_path / "s.json")
    result = subprocess.run([sys.executable, LLMHOST_PY, "--registry",
                             registry, "mcp", "add", "rel", "--no-check", "--", sys.executable,
                             "test_llmhost.py", "mcp-server", "stdio"], cwd=HERE,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "saved with cwd" in result.stderr, result.stderr
    assert llmhost.load_registry(registry)["mcpServers"]["rel"]["cwd"] == HERE


def test_mcp_import_mcp_json(tmp_path):
    registry = str(tmp_path / "servers.json")
    source = tmp_path / "claude_desktop_config.json"
    source.write_text(json.dumps({"mcpServers": {
        "time": {"command": "uvx", "args": ["mcp-server-time"]},
        "docs": {"url": "http://127.0.0.1:3001/mcp", "headers": {"Authorization": "Bearer x"}},
        "off": {"command": "x", "disabled": True},
        "my clock!": {"command": "clock"},
        "bad": {"args": ["no command"]}}}))
    code, out, err = run_cli(registry, "mcp", "import", str(source))
    assert code == 0 and "imported 3" in out and "my-clock (was 'my clock!')" in out
    assert llmhost.load_registry(registry)["mcpServers"]["my-clock"] == {"command": "clock"}
    assert "skipped off" in out and "skipped bad" in out
    doc = llmhost.load_registry(registry)
    assert doc["mcpServers"]["time"] == {"command": "uvx", "args": ["mcp-server-time"]}
    vscode = tmp_path / "mcp.json"
    vscode.write_text(json.dumps({"servers": {"fs": {"type": "stdio", "command": "npx"}}}))
    code, out, err = run_cli(registry, "mcp", "import", str(vscode))
    assert code == 0 and llmhost.load_registry(registry)["mcpServers"]["fs"] == \
        {"command": "npx"}
    before = open(registry, "rb").read()
    for wrong in ([], {"servers": []}, {"unrelated": {}}):
        vscode.write_text(json.dumps(wrong))
        code, out, err = run_cli(registry, "mcp", "import", str(vscode))
        assert code == 1 and "expected an mcp.json" in err, (wrong, out, err)
    assert open(registry, "rb").read() == before


def test_mcp_tool_names_sanitised_and_bounded():
    taken = set()
    assert llmhost.mcp_tool_name("time", "get_current_time", taken) == "time__get_current_time"
    odd = llmhost.mcp_tool_name("my.server", "weird.name/with spaces", taken)
    assert odd == "my_server__weird_name_with_spaces"
    long = llmhost.mcp_tool_name("s" * 40, "t" * 40, taken)
    assert len(long) <= 64 and long == llmhost.mcp_tool_name("s" * 40, "t" * 40, set())
    again = llmhost.mcp_tool_name("my_server", "weird_name_with_spaces", taken)
    assert again != odd and len(again) <= 64  # collision resolved deterministically


def test_mcp_is_not_imported_until_used(tmp_path, fake):
    code = ("import sys, json; sys.path.insert(0, %r); import llmhost, asyncio\n"
            "g = llmhost.Gateway(%r)\n"
            "async def main():\n"
            "    await g.start('127.0.0.1', 0)\n"
            "    await g.stop(1)\n"
            "asyncio.run(main()); print('mcp' in sys.modules)")
    registry = write_registry(tmp_path / "s.json", [  # registered, attached to no model
        {"name": "local", "url": fake.url, "models": ["fake-model"]}], mcp={"t": MCP_STDIO})
    result = subprocess.run([sys.executable, "-c", code % (HERE, registry)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.stdout.strip() == "False", result.stderr


def test_mcp_servers_attached_to_a_model_connect_when_serve_starts(tmp_path, fake):
    """As LM Studio and Claude Desktop start theirs: the first request need not wait for one
    (a stdio server's start is a second or more of imports), and one that cannot start is
    known (and not waited for) before any request needs it."""
    registry = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["t", "broken"]}],
        mcp={"t": MCP_STDIO, "broken": {"command": "/nonexistent/mcp-server"},
             "spare": MCP_STDIO})  # (registered, attached to no model: on first use only)
    running = Running(registry)
    try:
        def states():
            servers = json.loads(request(running.port, "GET", "/v1/mcp/servers")[2])["data"]
            return {s["name"]: s["state"] for s in servers}
        assert wait_until(lambda: states()["t"] == "ready", 30), states()
        assert states() == {"t": "ready", "broken": "failed", "spare": "idle"}
        assert fake.posts() == []  # no request was made
        fake.script({"calls": [("t__echo", {"text": "x"})]})
        started = time.monotonic()
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert doc["choices"][0]["message"]["content"] == "tool result: x", doc
        assert time.monotonic() - started < 1.0  # no start, no wait for `broken`
    finally:
        running.stop(timeout=5)


# ---- MCP OAuth: a protected MCP server, an authorization server, logins and tokens ----------

class FakeAuthServer:
    """An OAuth 2.1 authorization server on the standard library's http.server: metadata
    (RFC 8414), dynamic registration (RFC 7591), an authorization endpoint that consents at once
    (a logged-in user's browser is sent straight back, with `iss`, RFC 9207), a token endpoint
    (PKCE S256; refresh tokens that rotate, each good once; client credentials with a secret),
    and introspection (RFC 7662) for the MCP server. `wrong_iss` sends back another issuer than
    its own. Every token, code and secret it gives out is in `issued`, for the tests that look
    for them where they must never be."""

    def __init__(self, wrong_iss=False, clients=None):
        self.wrong_iss = wrong_iss
        self.lock = threading.Lock()
        self.seen = []  # (path, parameters) of each request
        self.clients = dict(clients or {})  # client id -> secret (None: a public client)
        self.codes, self.access, self.refresh = {}, {}, {}
        self.refresh_gate = None  # a threading.Event refresh grants wait for, when set
        self.issued = list(self.clients.values())
        auth = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, doc=None, headers=()):
                body = json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path, _, query = self.path.partition("?")
                params = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
                with auth.lock:
                    auth.seen.append((path, params))
                if path in ("/.well-known/oauth-authorization-server",
                            "/.well-known/openid-configuration"):
                    return self.answer(200, auth.metadata())
                if path == "/authorize":
                    return auth.authorize(self, params)
                self.answer(404, {"error": "not_found"})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if self.path == "/register":
                    params = json.loads(raw)
                else:
                    params = {k: v[0] for k, v in urllib.parse.parse_qs(raw).items()}
                with auth.lock:
                    auth.seen.append((self.path, params))
                gate = auth.refresh_gate
                if gate is not None and params.get("grant_type") == "refresh_token":
                    gate.wait(TIMEOUT * 6)
                with auth.lock:
                    status, doc = {"/register": auth.register, "/token": auth.token,
                                   "/introspect": auth.introspect}.get(
                        self.path, lambda p, h: (404, {"error": "not_found"}))(
                        params, self.headers)
                self.answer(status, doc)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def new(self, kind, secret=True):
        value = f"{kind}-{os.urandom(12).hex()}"
        if secret:  # (a client id is none: it is in every authorization URL)
            self.issued.append(value)
        return value

    def requests(self, path, grant=None):
        with self.lock:
            return [p for seen, p in self.seen if seen == path and
                    (grant is None or p.get("grant_type") == grant)]

    def metadata(self):
        return {"issuer": self.url, "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token", "registration_endpoint":
                f"{self.url}/register", "introspection_endpoint": f"{self.url}/introspect",
                "response_types_supported": ["code"], "scopes_supported": ["mcp", "admin"],
                "grant_types_supported": ["authorization_code", "refresh_token",
                                          "client_credentials"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
                "authorization_response_iss_parameter_supported": True}

    def register(self, params, headers):
        client_id, secret = self.new("client", secret=False), self.new("client-secret")
        self.clients[client_id] = secret
        return 201, dict(params, client_id=client_id, client_secret=secret,
                         token_endpoint_auth_method="client_secret_basic")

    def authorize(self, handler, params):
        if params.get("code_challenge_method") != "S256" or \
                params.get("client_id") not in self.clients:
            return handler.answer(400, {"error": "invalid_request"})
        with self.lock:
            code = self.new("code")
            self.codes[code] = params
        back = {"code": code, "state": params["state"],
                "iss": "https://elsewhere.example" if self.wrong_iss else self.url}
        handler.send_response(302)
        handler.send_header("Location", params["redirect_uri"] + "?" +
                            urllib.parse.urlencode(back))
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def client(self, params, headers):
        """The client a token request authenticates as (client_secret_basic or _post)."""
        basic = headers.get("Authorization", "")
        if basic.startswith("Basic "):
            client_id, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
            client_id, secret = urllib.parse.unquote(client_id), urllib.parse.unquote(secret)
        else:
            client_id, secret = params.get("client_id"), params.get("client_secret")
        return client_id if client_id in self.clients and \
            self.clients[client_id] in (None, secret) else None

    def grant(self, client_id, scope, refresh=True):
        access = self.new("access")
        self.access[access] = {"client_id": client_id, "scope": scope, "active": True}
        doc = {"access_token": access, "token_type": "Bearer", "expires_in": 3600,
               "scope": scope}
        if refresh:
            doc["refresh_token"] = self.new("refresh")
            self.refresh[doc["refresh_token"]] = {"client_id": client_id, "scope": scope}
        return 200, doc

    def token(self, params, headers):
        client_id = self.client(params, headers)
        if client_id is None:
            return 401, {"error": "invalid_client"}
        kind = params.get("grant_type")
        if kind == "authorization_code":
            asked = self.codes.pop(params.get("code"), None)
            challenge = base64.urlsafe_b64encode(hashlib.sha256(
                params.get("code_verifier", "").encode()).digest()).rstrip(b"=").decode()
            if asked is None or asked["code_challenge"] != challenge or \
                    asked["redirect_uri"] != params.get("redirect_uri"):
                return 400, {"error": "invalid_grant"}
            return self.grant(client_id, asked.get("scope") or "mcp")
        if kind == "refresh_token":
            held = self.refresh.pop(params.get("refresh_token"), None)  # (once: it rotates)
            if held is None or held["client_id"] != client_id:
                return 400, {"error": "invalid_grant"}
            return self.grant(client_id, held["scope"])
        if kind == "client_credentials":
            return self.grant(client_id, params.get("scope") or "mcp", refresh=False)
        return 400, {"error": "unsupported_grant_type"}

    def introspect(self, params, headers):
        held = self.access.get(params.get("token"))
        if held is None or not held["active"]:
            return 200, {"active": False}
        return 200, {"active": True, "client_id": held["client_id"], "scope": held["scope"],
                     "exp": int(time.time()) + 3600}

    def expire_access_tokens(self):
        """The server side of an expiry: every access token given so far is refused."""
        with self.lock:
            for held in self.access.values():
                held["active"] = False


# A browser whose user is logged in and consents: it follows the redirect to llmhost's listener.
# (A line of Python, not this file: that would compile it and import pytest, llmhost and the
# SDK's types first, half a second of CPU per login; no ":", which $BROWSER's list splits at.)
OAUTH_BROWSER = " ".join(shlex.quote(arg) for arg in [
    sys.executable, "-c", "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], "
    f"timeout={TIMEOUT}).read()", "%s"])


def oauth_cli(registry, *argv, env=None):
    """`llmhost.py --registry REGISTRY mcp ARGV` as a user runs it, with a browser (BROWSER)."""
    return subprocess.run([sys.executable, LLMHOST_PY, "--registry",
                           registry, "mcp", *argv], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL,
                          env=dict(os.environ, BROWSER=OAUTH_BROWSER, **(env or {})))


def start_oauth_mcp(auth):
    proc, port = start_mcp_http("http-oauth", auth.url)
    return proc, f"http://127.0.0.1:{port}/mcp"


@pytest.fixture(scope="module")
def oauth_server():
    """(authorization server, URL of an MCP server that takes only its tokens)."""
    auth = FakeAuthServer(clients={"m2m": "m2m-secret-" + os.urandom(8).hex()})
    proc, url = start_oauth_mcp(auth)
    yield auth, url
    proc.terminate()
    proc.wait(TIMEOUT)
    auth.close()


def stored_tokens(registry, name, url):
    with open(llmhost.tokens_path(registry)) as f:
        return json.load(f)["servers"][name][url]


def expire_in_file(registry, name, url):
    """Make the tokens file say the access token has expired (as time passing would)."""
    path = llmhost.tokens_path(registry)
    with open(path) as f:
        doc = json.load(f)
    doc["servers"][name][url]["expires_at"] = time.time() - 1
    with open(path, "w") as f:
        json.dump(doc, f)


def test_mcp_oauth_login_through_the_loopback_redirect(tmp_path, oauth_server):
    auth, url = oauth_server
    registry = str(tmp_path / "servers.json")
    logins = len(auth.requests("/authorize"))
    result = oauth_cli(registry, "add", "docs", "--url", url)
    assert result.returncode == 0 and "added MCP server docs:" in result.stdout, result.stderr
    # The address to log in at is said too, for a person with no browser on this machine.
    assert f"{auth.url}/authorize?" in result.stderr
    (login,) = auth.requests("/authorize")[logins:]
    assert login["code_challenge_method"] == "S256" and login["resource"] == url
    assert login["scope"] == "mcp"  # what the server's metadata names
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/callback", login["redirect_uri"])
    (exchange,) = [p for p in auth.requests("/token") if p.get("code")]
    assert exchange["code_verifier"] and exchange["resource"] == url
    # The tokens are beside the registry, for the owner only; the registry has none.
    assert os.stat(llmhost.tokens_path(registry)).st_mode & 0o777 == 0o600
    record = stored_tokens(registry, "docs", url)
    assert auth.access[record["tokens"]["access_token"]]["active"]
    assert record["client"]["client_id"] in auth.clients and record["issuer"] == auth.url
    assert "access-" not in open(registry).read()
    result = oauth_cli(registry, "call", "docs", "echo", '{"text": "hi"}')
    assert result.returncode == 0 and result.stdout.strip() == "hi", result.stderr
    assert len(auth.requests("/authorize")) == logins + 1  # the stored token, no new login


def test_mcp_oauth_login_logout_and_remove(tmp_path, oauth_server):
    auth, url = oauth_server
    registry = write_registry(tmp_path / "servers.json", [], mcp={"docs": {"url": url}})
    logins = len(auth.requests("/authorize"))
    result = oauth_cli(registry, "login", "docs")
    assert result.returncode == 0 and result.stdout.startswith("logged in to docs ("), \
        result.stderr
    first = stored_tokens(registry, "docs", url)
    result = oauth_cli(registry, "login", "docs")  # anew: a login, with the same registration
    assert result.returncode == 0 and len(auth.requests("/authorize")) == logins + 2
    second = stored_tokens(registry, "docs", url)
    assert second["tokens"] != first["tokens"] and second["client"] == first["client"]
    result = oauth_cli(registry, "logout", "docs")
    assert result.returncode == 0 and "logged out of docs" in result.stdout
    with open(llmhost.tokens_path(registry)) as f:
        assert json.load(f)["servers"] == {}
    assert oauth_cli(registry, "login", "docs").returncode == 0
    assert oauth_cli(registry, "remove", "docs").returncode == 0
    with open(llmhost.tokens_path(registry)) as f:
        assert json.load(f)["servers"] == {}  # its tokens went with it


def test_mcp_oauth_refresh_after_the_access_token_expires(tmp_path, oauth_server):
    auth, url = oauth_server
    registry = write_registry(tmp_path / "servers.json", [], mcp={"docs": {"url": url}})
    assert oauth_cli(registry, "login", "docs").returncode == 0
    logins = len(auth.requests("/authorize"))
    refreshes = len(auth.requests("/token", "refresh_token"))
    # Expired by the client's clock: refreshed before the call.
    before = stored_tokens(registry, "docs", url)["tokens"]
    expire_in_file(registry, "docs", url)
    result = oauth_cli(registry, "call", "docs", "echo", '{"text": "again"}')
    assert result.returncode == 0 and result.stdout.strip() == "again", result.stderr
    (refresh,) = auth.requests("/token", "refresh_token")[refreshes:]
    assert refresh["refresh_token"] == before["refresh_token"] and refresh["resource"] == url
    after = stored_tokens(registry, "docs", url)["tokens"]
    assert after["access_token"] != before["access_token"]
    assert after["refresh_token"] != before["refresh_token"]  # (it rotates)
    # Expired by the server's, earlier than the client knew: refreshed on its 401.
    auth.expire_access_tokens()
    result = oauth_cli(registry, "call", "docs", "echo", '{"text": "once more"}')
    assert result.returncode == 0 and result.stdout.strip() == "once more", result.stderr
    assert len(auth.requests("/token", "refresh_token")) == refreshes + 2
    assert len(auth.requests("/authorize")) == logins  # never a new login


def flock_waiters(path):
    """How many processes wait for a flock of `path` now (Linux's /proc/locks: "->" lines)."""
    inode = f":{os.stat(path).st_ino} "
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and inode in line)


def test_mcp_oauth_processes_spend_a_rotating_refresh_token_once(tmp_path, oauth_server):
    """As the workers of `serve --workers N` do: each holds the same tokens, and a refresh
    token is good once. The refresh is made under the file's lock, and the processes that
    waited for it take the tokens the first one saved."""
    auth, url = oauth_server
    registry = write_registry(tmp_path / "servers.json", [], mcp={"docs": {"url": url}})
    assert oauth_cli(registry, "login", "docs").returncode == 0
    refreshes = len(auth.requests("/token", "refresh_token"))
    logins = len(auth.requests("/authorize"))
    expire_in_file(registry, "docs", url)
    auth.refresh_gate = threading.Event()  # the first refresh is answered when all have come
    try:
        calls = [subprocess.Popen(
            [sys.executable, LLMHOST_PY, "--registry", registry, "mcp",
             "call", "docs", "echo", f'{{"text": "{i}"}}'], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
            env=dict(os.environ, BROWSER=OAUTH_BROWSER)) for i in range(3)]
        # Two wait for the lock while the first refreshes (or, without it, refresh too).
        assert wait_until(lambda: flock_waiters(llmhost.tokens_path(registry) + ".lock") == 2 or
                          len(auth.requests("/token", "refresh_token")) > refreshes + 1, 60)
    finally:
        auth.refresh_gate.set()
        auth.refresh_gate = None
    for i, call in enumerate(calls):
        out, err = call.communicate(timeout=60)
        assert call.returncode == 0 and out.strip() == str(i), err
    assert len(auth.requests("/token", "refresh_token")) == refreshes + 1
    assert len(auth.requests("/authorize")) == logins  # (nobody had to log in again)


def test_mcp_oauth_step_up_when_a_tool_needs_more_scope(tmp_path, oauth_server):
    auth, url = oauth_server
    registry = write_registry(tmp_path / "servers.json", [], mcp={"docs": {"url": url}})
    assert oauth_cli(registry, "login", "docs").returncode == 0
    logins = len(auth.requests("/authorize"))
    result = oauth_cli(registry, "call", "docs", "secret")
    assert result.returncode == 0 and result.stdout.strip() == "secret ok", result.stderr
    (login,) = auth.requests("/authorize")[logins:]
    assert set(login["scope"].split()) == {"mcp", "admin"}  # what it had, and what it lacked
    assert "admin" in stored_tokens(registry, "docs", url)["tokens"]["scope"].split()


def test_mcp_oauth_a_wrong_iss_is_refused(tmp_path):
    """RFC 9207: a redirect that names another issuer than the server that was asked is an
    attacker's (mix-up); its code is never sent to a token endpoint."""
    auth = FakeAuthServer(wrong_iss=True)
    proc, url = start_oauth_mcp(auth)
    try:
        registry = str(tmp_path / "servers.json")
        result = oauth_cli(registry, "tools", "--url", url)
        assert result.returncode == 1 and "iss" in result.stderr and \
            "https://elsewhere.example" in result.stderr, result.stderr
        assert auth.requests("/authorize") and not auth.requests("/token")
        assert "tokens" not in json.dumps(llmhost.MCPTokenStore(
            llmhost.tokens_path(registry)).read())
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        auth.close()


def test_mcp_oauth_over_the_legacy_sse_transport(tmp_path):
    auth = FakeAuthServer()
    proc, port = start_mcp_http("sse-oauth", auth.url)
    try:
        result = oauth_cli(str(tmp_path / "s.json"), "call", "--url",
                           f"http://127.0.0.1:{port}/sse", "--transport", "sse", "echo",
                           '{"text": "over sse"}')
        assert result.returncode == 0 and result.stdout.strip() == "over sse", result.stderr
        (login,) = auth.requests("/authorize")
        assert login["resource"] == f"http://127.0.0.1:{port}/sse"
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        auth.close()


def test_mcp_oauth_serve_uses_and_refreshes_the_stored_token_in_the_tool_loop(
        tmp_path, oauth_server, fake):
    auth, url = oauth_server
    registry = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["docs"]}],
        mcp={"docs": {"url": url}})
    assert oauth_cli(registry, "login", "docs").returncode == 0
    refreshes = len(auth.requests("/token", "refresh_token"))
    expire_in_file(registry, "docs", url)
    running = Running(registry)
    try:
        fake.script({"calls": [("docs__echo", {"text": "with a token"})]})
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert doc["choices"][0]["message"]["content"] == "tool result: with a token", doc
        assert len(auth.requests("/token", "refresh_token")) == refreshes + 1
        # (and saved it for the CLI and the other workers)
        assert stored_tokens(registry, "docs", url)["expires_at"] > time.time()
    finally:
        running.stop(timeout=5)


def test_mcp_oauth_serve_says_which_command_logs_in(tmp_path, oauth_server, fake):
    """serve cannot open a browser: it passes the server's 401 on, with the command that logs
    in; once that has run (serve still running), the server is used."""
    auth, url = oauth_server
    registry = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}], mcp={"docs": {"url": url}})
    logins = len(auth.requests("/authorize"))
    running = Running(registry)
    try:
        tools = [{"type": "mcp", "server_label": "docs", "require_approval": "never"}]
        status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, tools=tools))
        command = f"python3 llmhost.py --registry {os.path.realpath(registry)} mcp login docs"
        assert status == 502 and doc["error"]["message"] == \
            f"MCP server 'docs': needs a login (HTTP 401); run: {command}", doc
        (server,) = json.loads(request(running.port, "GET", "/v1/mcp/servers")[2])["data"]
        assert server["login"] == command and command in server["last_error"]
        assert len(auth.requests("/authorize")) == logins  # (serve tried none)
        assert oauth_cli(registry, "login", "docs").returncode == 0
        fake.script({"calls": [("docs__echo", {"text": "logged in"})]})
        status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, tools=tools))
        assert doc["choices"][0]["message"]["content"] == "tool result: logged in", doc
        (server,) = json.loads(request(running.port, "GET", "/v1/mcp/servers")[2])["data"]
        assert server["login"] is None and server["state"] == "ready"
    finally:
        running.stop(timeout=5)


def test_mcp_oauth_client_credentials_need_no_login(tmp_path, oauth_server, fake):
    """Machine to machine: serve gets its own token with the client's secret (from the
    environment variable the entry names) and sends it the way the server takes it."""
    auth, url = oauth_server
    registry = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"], "mcp": ["m2m"]}],
        mcp={"m2m": {"url": url, "oauth": {"client_credentials": True, "client_id": "m2m",
                                           "client_secret_env": "M2M_SECRET"}}})
    grants = len(auth.requests("/token", "client_credentials"))
    running = Running(registry, environ={"M2M_SECRET": auth.clients["m2m"]})
    try:
        fake.script({"calls": [("m2m__echo", {"text": "machine"})]})
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert doc["choices"][0]["message"]["content"] == "tool result: machine", doc
        (grant,) = auth.requests("/token", "client_credentials")[grants:]
        assert "client_secret" not in grant and grant["resource"] == url  # (Basic auth)
    finally:
        running.stop(timeout=5)


def test_mcp_oauth_no_token_or_secret_is_ever_shown(tmp_path, oauth_server, fake, caplog):
    """Not in what the CLI prints (add, call, list, tools, step-up, refresh, errors), serve's
    log (at debug), its access log, /v1/mcp/servers or /v1/status."""
    import logging
    caplog.set_level(logging.DEBUG)
    auth, url = oauth_server
    registry = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    env = {"M2M_SECRET": auth.clients["m2m"], "WRONG_SECRET": "wrong-" + os.urandom(8).hex()}
    shown = []
    # (three rounds: what a round's commands need, the rounds before it did)
    for round_ in ([["add", "docs", "--url", url], ["add", "m2m", "--url", url,
                     "--client-credentials", "--client-id", "m2m", "--client-secret-env",
                     "M2M_SECRET"]], [["attach", "docs", "local"], ["attach", "m2m", "local"],
                    ["call", "docs", "secret"]], [["list"], ["list", "--json"],
                    ["tools", "--json"], ["add", "bad", "--url", url, "--client-id", "m2m",
                                          "--client-secret-env", "WRONG_SECRET"]]):
        for result in at_once(*[lambda argv=argv: oauth_cli(registry, *argv, env=env)
                                for argv in round_]):
            shown += [result.stdout, result.stderr]
    assert "secret ok" in shown[8] and "MCP server 'bad'" in shown[-1], shown  # (one fails)
    expire_in_file(registry, "docs", url)
    auth.expire_access_tokens()
    running = Running(registry, environ=env)
    try:
        fake.script({"calls": [("docs__echo", {"text": "x"}), ("m2m__echo", {"text": "y"})]})
        shown.append(post(running.port, "/v1/chat/completions", CHAT)[2].decode())
        shown += [request(running.port, "GET", path)[2].decode()
                  for path in ("/v1/mcp/servers", "/v1/status", "/v1/mcp/tools")]
        shown.append(running.log.getvalue())
    finally:
        running.stop(timeout=5)
    shown += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert auth.requests("/token", "refresh_token")  # (a refresh was among them)
    text = "\n".join(shown)
    assert "tool result: x" in text
    leaks = [secret for secret in auth.issued + [env["WRONG_SECRET"]] if secret in text]
    assert not leaks, leaks


def test_mcp_oauth_settings_are_checked_and_hold_no_secret(tmp_path):
    assert llmhost.validate_mcp_entry("a", {"url": "http://h/mcp", "oauth": {
        "client_id": "x", "client_secret_env": "X_SECRET", "scope": "read write",
        "callback_port": 8765}}) == []
    for oauth, error in (
            ({"client_secret": "s"}, "a secret is not kept in the registry"),
            ({"client_id": "x", "clientid": "y"}, "unknown key 'clientid'"),
            ({"client_secret_env": "X"}, "client_secret_env needs client_id"),
            ({"client_credentials": True, "client_id": "x"}, "needs client_id and one of"),
            ({"client_key": "/k.pem", "client_id": "x"}, "client_key is for client_credentials"),
            ({"client_metadata_url": "http://h/client.json"}, "an https:// URL with a path"),
            ({"callback_port": 70000}, "a port number")):
        errors = llmhost.validate_mcp_entry("a", {"url": "http://h/mcp", "oauth": oauth})
        assert any(error in e for e in errors), (oauth, errors)
    assert llmhost.validate_mcp_entry("a", {"command": "x", "oauth": {}}) == \
        ["a: 'oauth' is for URL servers"]
    registry = write_registry(tmp_path / "s.json", [])
    code, _, err = run_cli(registry, "mcp", "add", "a", "--client-id", "x", "--", "cmd")
    assert code == 1 and "--client-id: only with --url" in err
    code, _, err = run_cli(registry, "mcp", "tools", "a", "--scope", "x")
    assert code == 1 and "--scope: only with --url" in err
    code, _, err = run_cli(registry, "mcp", "add", "a", "--url", "http://h/mcp", "--no-check",
                           "--client-credentials", "--client-id", "x", "--client-key", "k.pem")
    assert code == 0, err
    assert llmhost.load_registry(registry)["mcpServers"]["a"]["oauth"] == {
        "client_id": "x", "client_credentials": True, "client_key": os.path.abspath("k.pem")}


def test_mcp_login_takes_the_redirect_of_its_own_login_or_an_address_pasted_back():
    """The loopback listener answers a redirect that is not this login's (another state) and
    waits on; on a machine without a browser the address the browser ended at is pasted back
    (a line that is no such address is said so); a refusal ends the login with its reason."""
    from mcp.shared.auth import AuthorizationCodeResult

    async def login(paste, visits):
        out = io.StringIO()
        seen = []

        def browser(url):  # (in a thread, as webbrowser runs $BROWSER)
            for query in visits:
                try:
                    with urllib.request.urlopen(f"{uri}?{query}", timeout=TIMEOUT) as answer:
                        seen.append(answer.status)
                except urllib.error.HTTPError as exc:
                    seen.append(exc.code)

        flow = llmhost.LoopbackLogin(browser, out, paste, timeout=TIMEOUT)
        uri = await flow.redirect_uri(0, False, "docs")
        await flow.open("https://as.example/authorize?client_id=c&state=S1")
        try:
            return await flow.callback(), seen, out.getvalue()
        except RuntimeError as exc:
            return exc, seen, out.getvalue()

    result, seen, out = asyncio.run(login(None, ["code=evil&state=S0", "code=good&state=S1"]))
    assert result == AuthorizationCodeResult(code="good", state="S1") and seen[0] == 400
    assert "https://as.example/authorize?client_id=c&state=S1" in out
    result, seen, out = asyncio.run(login(None, ["error=access_denied&error_description=No+way"
                                                 "&state=S1"]))
    assert str(result) == "the login was refused (access_denied No way)"
    paste, typing = os.pipe()  # (a terminal's stand-in)
    os.write(typing, b"yes\nhttp://127.0.0.1:9/callback?code=pasted&state=S1&iss=https%3A"
                     b"%2F%2Fas.example\n")
    try:
        result, seen, out = asyncio.run(login(paste, []))
    finally:
        os.close(paste)
        os.close(typing)
    assert result == AuthorizationCodeResult(code="pasted", state="S1", iss="https://as.example")
    assert "paste here the address the browser ends at" in out and \
        "not the address of the login" in out


def test_mcp_cli_read_and_prompt(mcp_cli_registry, mcp_http_server, tmp_path):
    text, as_json, prompt, bad_prompt, missing = at_once(  # (none changes anything)
        lambda: mcp_cli(mcp_cli_registry, "read", "t", "test://hello"),
        lambda: mcp_cli(mcp_cli_registry, "read", "t", "test://hello", "--json"),
        lambda: mcp_cli(mcp_cli_registry, "prompt", "w", "greet", '{"who": "Ada"}'),
        lambda: mcp_cli(str(tmp_path / "x.json"), "prompt", "--url", mcp_http_server, "greet",
                        '{"who": 1}'),
        lambda: mcp_cli(mcp_cli_registry, "read", "w", "test://nothing-here"))
    assert text.returncode == 0 and text.stdout == "hello resource\n", text.stderr
    assert json.loads(as_json.stdout)["contents"][0]["uri"] == "test://hello"
    assert prompt.returncode == 0 and "user: Say hello to Ada" in prompt.stdout, prompt.stderr
    assert bad_prompt.returncode == 1 and "a JSON object of strings" in bad_prompt.stderr
    assert missing.returncode == 1 and "reading test://nothing-here failed" in missing.stderr


def test_mcp_a_result_without_result_type_is_complete(tmp_path):
    """SEP-2322: a 2026-07-28 result that has no resultType is complete (servers written
    before it was required send none); the SDK's schema check alone would refuse it."""
    proc, port = start_mcp_http("http", env={"LLMHOST_TEST_MCP_NO_RESULT_TYPE": "1"})
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        raw = http_json_rpc(url, "tools/list")
        assert "result" in raw and "resultType" not in raw  # (it sends none)
        result = mcp_cli(str(tmp_path / "s.json"), "call", "--url", url, "echo",
                         '{"text": "complete"}')
        assert result.returncode == 0 and result.stdout.strip() == "complete", result.stderr
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def http_json_rpc(url, method):
    """One stateless 2026-07-28 request, as raw text of the answer."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {}}}}).encode()
    request = urllib.request.Request(url, body, {
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
        return answer.read().decode()


# =============================================================================
# MCP server: llmhost as one (/mcp, /mcp/NAME, mcp serve --stdio), reached by the SDK's client
# =============================================================================

def sdk_client(url, mode, key=None, **kw):
    """The SDK's own client over streamable HTTP (`mode`: "legacy" for 2025-11-25, "auto"
    lands on 2026-07-28 with a server that speaks it)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"} if key else None,
                              timeout=httpx2.Timeout(TIMEOUT * 3))
    return Client(streamable_http_client(url, http_client=http), mode=mode, **kw)


@pytest.fixture(scope="module")
def front_env(tmp_path_factory):
    """llmhost serving a stdio backend `t`, an HTTP backend `h` and a private one `p`."""
    proc, port = start_mcp_http("http")
    path = write_registry(tmp_path_factory.mktemp("front") / "servers.json", [], mcp={
        "t": MCP_STDIO, "h": {"url": f"http://127.0.0.1:{port}/mcp"},
        "p": dict(MCP_STDIO, private=True)})
    running = Running(path, api_keys=["sesame"])
    yield running, path
    running.stop(timeout=5)
    proc.terminate()
    proc.wait(TIMEOUT)


MODES = {"legacy": "2025-11-25", "auto": "2026-07-28"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path, prefix", [("/mcp/t", ""), ("/mcp/h", ""), ("/mcp", "h__")])
def test_mcp_server_lists_calls_reads_and_prompts_at_both_revisions(front_env, mode, path,
                                                                    prefix):
    running, _ = front_env
    progress = []

    async def on_progress(done, total, message):
        progress.append((done, total, message))

    async def session():
        async with sdk_client(f"http://127.0.0.1:{running.port}{path}", mode, "sesame") as c:
            assert c.protocol_version == MODES[mode]
            tools = [t.name for t in (await c.list_tools()).tools]
            echo = await c.call_tool(f"{prefix}echo", {"text": "through llmhost"})
            chatty = await c.call_tool(f"{prefix}chatty", {}, progress_callback=on_progress)
            failed = await c.call_tool(f"{prefix}boom", {})
            read = await c.read_resource("test://hello")
            prompts = [p.name for p in (await c.list_prompts()).prompts]
            prompt = await c.get_prompt(f"{prefix}greet", {"who": "Ada"})
            resources = [str(r.uri) for r in (await c.list_resources()).resources]
            return tools, echo, chatty, failed, read, prompts, prompt, resources

    tools, echo, chatty, failed, read, prompts, prompt, resources = asyncio.run(session())
    assert f"{prefix}echo" in tools and f"{prefix}weather" in tools
    if path == "/mcp":  # every exposed server, prefixed as models see them; never the private
        assert "t__echo" in tools and not any(t.startswith("p__") for t in tools)
        assert set(prompts) == {"t__greet", "h__greet"}
        assert resources == ["test://hello", "test://hello"]
    else:
        assert prompts == ["greet"] and resources == ["test://hello"]
    assert echo.content[0].text == "through llmhost" and not echo.is_error
    assert echo.structured_content == {"result": "through llmhost"}
    assert chatty.content[0].text == "chatty done" and progress == [(1.0, 2.0, "half way")]
    assert failed.is_error and "boom" in failed.content[0].text
    assert read.contents[0].text == "hello resource"
    assert prompt.messages[0].content.text == "Say hello to Ada"


def test_mcp_server_refusals_speak_http_and_json_rpc(front_env):
    running, path = front_env
    port = running.port
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    key = dict(accept, Authorization="Bearer sesame")
    status, headers, raw = request(port, "POST", "/mcp/t", init, headers=accept)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert json.loads(raw)["error"]["code"] == -32600
    # /mcp/servers and /mcp/tools are no aliases of /v1/mcp/... any more; private: not served
    for where in ("/mcp/servers", "/mcp/tools", "/mcp/p", "/mcp/nobody"):
        assert request(port, "POST", where, init, headers=key)[0] == 404, where
    status, headers, raw = request(port, "POST", "/mcp/t", init, headers=key)
    assert status == 200 and rpc_answer(headers, raw)["result"]["protocolVersion"] == \
        "2025-11-25"
    assert headers["content-type"] == "text/event-stream"  # (the client accepts it)
    sid = headers["mcp-session-id"]
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    assert request(port, "POST", "/mcp/t", listing, headers=key)[0] == 400  # no session
    status, headers, raw = request(port, "POST", "/mcp/t", listing, headers={
        "Authorization": "Bearer sesame", "Accept": "application/json", "Mcp-Session-Id": sid})
    assert headers["content-type"] == "application/json"  # (it accepts nothing else)
    assert status == 200 and "echo" in [t["name"] for t in json.loads(raw)["result"]["tools"]]
    # a session is of the path it began on, and a forged or ended one is unknown (404)
    assert request(port, "POST", "/mcp/h", listing,
                   headers=dict(key, **{"Mcp-Session-Id": sid}))[0] == 404
    forged = sid[:-1] + ("1" if sid.endswith("0") else "0")  # (its last signature digit)
    assert request(port, "POST", "/mcp/t", listing,
                   headers=dict(key, **{"Mcp-Session-Id": forged}))[0] == 404
    status, _, raw = request(port, "GET", "/v1/mcp/servers", headers=key)
    sessions = json.loads(raw)["clients"]["sessions"]
    assert status == 200 and any(s["client"] == "raw 1" and s["view"] == "t" for s in sessions)
    clients = get_status(port, headers=key)["mcp_clients"]
    assert "p" not in clients["exposed"] and any(s["client"] == "raw 1" for s in
                                                 clients["sessions"])
    assert request(port, "DELETE", "/mcp/t", headers=dict(key, **{"Mcp-Session-Id": sid}))[0] \
        == 200
    assert request(port, "POST", "/mcp/t", listing,
                   headers=dict(key, **{"Mcp-Session-Id": sid}))[0] == 404
    unknown = {"jsonrpc": "2.0", "id": 3, "method": "no/such", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28"}}}
    modern = dict(key, **{"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "no/such"})
    status, _, raw = request(port, "POST", "/mcp/t", unknown, headers=modern)  # no capabilities
    assert status == 400 and json.loads(raw)["error"]["code"] == -32602
    unknown["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = {}
    status, _, raw = request(port, "POST", "/mcp/t", unknown, headers=modern)
    assert status == 404 and json.loads(raw)["error"]["code"] == -32601
    removed = dict(unknown, method="ping")  # (a method of the handshake era only)
    status, _, raw = request(port, "POST", "/mcp/t", removed,
                             headers=dict(modern, **{"Mcp-Method": "ping"}))
    assert status == 404 and json.loads(raw)["error"]["code"] == -32601
    status, _, raw = request(port, "POST", "/mcp/t", unknown, headers=dict(
        modern, **{"MCP-Protocol-Version": "2025-11-25"}))
    assert status == 400 and json.loads(raw)["error"]["code"] == -32020  # header vs _meta
    unknown["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = "2099-01-01"
    status, _, raw = request(port, "POST", "/mcp/t", unknown, headers=dict(
        modern, **{"MCP-Protocol-Version": "2099-01-01"}))
    assert status == 400 and json.loads(raw)["error"] == {
        "code": -32022, "message": "Unsupported protocol version",
        "data": {"supported": ["2026-07-28"], "requested": "2099-01-01"}}
    assert request(port, "POST", "/mcp/t", b"{nope", headers=key)[0] == 400
    assert llmhost.validate_mcp_entry("servers", MCP_STDIO) and \
        llmhost.validate_mcp_entry("tools", MCP_STDIO)
    assert llmhost.validate_mcp_entry("x", dict(MCP_STDIO, private="yes"))


def test_mcp_server_expose_chooses_what_slash_mcp_serves(tmp_path):
    path = write_registry(tmp_path / "s.json", [], mcp={"t": MCP_STDIO, "u": MCP_STDIO})
    running = Running(path, mcp_expose=["u"])
    try:
        async def session():
            async with sdk_client(f"http://127.0.0.1:{running.port}/mcp", "auto") as c:
                return [t.name for t in (await c.list_tools()).tools]

        tools = asyncio.run(session())
        assert "u__echo" in tools and not any(t.startswith("t__") for t in tools)
        assert request(running.port, "POST", "/mcp/t", {"jsonrpc": "2.0", "id": 1,
                                                         "method": "ping"})[0] == 404
    finally:
        running.stop(timeout=5)


@pytest.mark.parametrize("mode", MODES)
def test_mcp_server_tells_clients_of_a_changed_tool_list(tmp_path, mode):
    """A backend's tools/list_changed reaches a 2025-11-25 client on its GET stream and a
    2026-07-28 client on its subscriptions/listen stream."""
    path = write_registry(tmp_path / "s.json", [], mcp={"t": MCP_STDIO})
    running = Running(path)
    changed = []

    async def session():
        told = asyncio.Event()

        async def on_message(msg):
            if type(msg).__name__ == "ToolListChangedNotification":
                told.set()

        url = f"http://127.0.0.1:{running.port}/mcp/t"
        async with sdk_client(url, mode, message_handler=on_message) as c:
            if mode == "legacy":
                # the GET stream is open once the server holds it (its session's outlet)
                while not running.gateway.app.mcp_front.outlets:
                    await asyncio.sleep(0.02)
                assert (await c.call_tool("grow", {})).content[0].text == "grown"
                await asyncio.wait_for(told.wait(), TIMEOUT)
            else:
                async with c.listen(tools_list_changed=True) as sub:
                    assert (await c.call_tool("grow", {})).content[0].text == "grown"
                    async for event in sub:
                        changed.append(type(event).__name__)
                        break
            changed.append([t.name for t in (await c.list_tools()).tools])

    try:
        asyncio.run(asyncio.wait_for(session(), TIMEOUT * 3))
    finally:
        running.stop(timeout=5)
    assert "extra" in changed[-1]
    if mode == "auto":
        assert changed[0] == "ToolsListChanged"


def test_mcp_server_forwards_sampling_to_a_client_that_can(tmp_path):
    """A backend's sampling request goes to the client whose call caused it when it declared
    sampling; one that did not gets today's answer (no model here: an error result)."""
    import mcp_types as MT
    path = write_registry(tmp_path / "s.json", [], mcp={"t": MCP_STDIO})
    running = Running(path)

    async def sample(ctx, params):
        return MT.CreateMessageResult(role="assistant", model="client-model",
                                      content=MT.TextContent(text="from the client"))

    async def session(**kw):
        from mcp.shared.exceptions import MCPError
        url = f"http://127.0.0.1:{running.port}/mcp/t"
        async with sdk_client(url, "legacy", **kw) as c:
            try:
                return (await c.call_tool("summarize", {"topic": "bees"})).content[0].text
            except MCPError as e:  # the backend's error: our sampling failed
                return e.error.message

    try:
        asked = asyncio.run(session(sampling_callback=sample))
        unasked = asyncio.run(session())
    finally:
        running.stop(timeout=5)
    assert asked == "model=client-model text=from the client"
    assert "no model to sample with" in unasked  # (as before: serve's models answer)


def test_mcp_server_a_backend_killed_mid_call_is_an_error_then_back(tmp_path):
    """An HTTP backend killed while a call runs: the client gets a JSON-RPC error (not a hang);
    once it is back (same port), the next call works."""
    from mcp.shared.exceptions import MCPError
    proc, port = start_mcp_http("http")
    path = write_registry(tmp_path / "s.json", [], mcp={
        "h": {"url": f"http://127.0.0.1:{port}/mcp"}, "t": MCP_STDIO})
    running = Running(path)
    note = tmp_path / "started"

    async def session(mode):
        url = f"http://127.0.0.1:{running.port}/mcp/h"
        async with sdk_client(url, mode) as c:
            call = asyncio.ensure_future(c.call_tool("slow", {"seconds": 30, "note": str(note)}))
            while not note.exists():
                await asyncio.sleep(0.02)
            proc.kill()
            try:
                await asyncio.wait_for(call, TIMEOUT)
            except MCPError as e:
                return e.error.code, e.error.message
            return None, call.result()

    async def stdio_dies():  # a stdio backend that exits mid-call: an error, then back
        async with sdk_client(f"http://127.0.0.1:{running.port}/mcp/t", "legacy") as c:
            try:
                await c.call_tool("die", {})
                died = None
            except MCPError as e:
                died = e.error.message
            return died, await c.call_tool("echo", {"text": "restarted"})

    try:
        # (`t` meanwhile, in a thread: its two starts overlap h's kill and restart)
        stdio = in_background(lambda: asyncio.run(asyncio.wait_for(stdio_dies(), TIMEOUT * 6)))
        code, message = asyncio.run(session("auto"))
        assert code == llmhost.MCP_INTERNAL_CODE and "connection" in message.lower(), message
        proc.wait(TIMEOUT)
        proc, _ = start_mcp_http("http", str(port))

        async def again():
            async with sdk_client(f"http://127.0.0.1:{running.port}/mcp/h", "legacy") as c:
                return await c.call_tool("echo", {"text": "back"})

        assert asyncio.run(again()).content[0].text == "back"
        died, after = stdio.result(TIMEOUT * 6)
        assert died and "connection" in died.lower() and after.content[0].text == "restarted"
    finally:
        running.stop(timeout=5)
        proc.kill()
        proc.wait(TIMEOUT)


def test_mcp_server_fifty_clients_at_once(front_env):
    running, _ = front_env

    async def one(i):
        mode = "legacy" if i % 2 else "auto"
        async with sdk_client(f"http://127.0.0.1:{running.port}/mcp", mode, "sesame") as c:
            r = await c.call_tool("h__echo" if i % 3 else "t__echo", {"text": f"client {i}"})
            return r.content[0].text

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(50)))

    assert asyncio.run(asyncio.wait_for(all_of_them(), TIMEOUT * 6)) == \
        [f"client {i}" for i in range(50)]


def test_mcp_server_cancelled_call_ends_its_request(front_env):
    """A client that cancels a call (notifications/cancelled at 2025-11-25, closing the
    stream at 2026-07-28) ends llmhost's request for it; the client stays usable."""
    running, _ = front_env
    front = running.gateway.app.mcp_front

    async def session(mode):
        async with sdk_client(f"http://127.0.0.1:{running.port}/mcp/h", mode, "sesame") as c:
            call = asyncio.ensure_future(c.call_tool("slow", {"seconds": 30}))
            while not front.exchanges:
                await asyncio.sleep(0.02)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            while front.exchanges:
                await asyncio.sleep(0.02)
            return (await c.call_tool("echo", {"text": "still here"})).content[0].text

    for mode in MODES:
        assert asyncio.run(asyncio.wait_for(session(mode), TIMEOUT)) == "still here"


def test_mcp_serve_stdio_bridges_an_http_server_to_a_stdio_client(front_env):
    from mcp import Client, StdioServerParameters
    _, path = front_env

    async def session(name, tool, mode):
        params = StdioServerParameters(command=sys.executable, args=[
            LLMHOST_PY, "--registry", path, "mcp", "serve", "--stdio",
            *name])
        async with Client(params, mode=mode) as c:
            tools = [t.name for t in (await c.list_tools()).tools]
            r = await c.call_tool(tool, {"text": "over stdio"})
            read = await c.read_resource("test://hello")
            return c.protocol_version, tools, r.content[0].text, read.contents[0].text

    async def sessions():  # (at once: each process imports the SDK, a second of CPU)
        return await asyncio.gather(session([], "h__echo", "auto"),
                                    *(session(["h"], "echo", mode) for mode in MODES))

    (_, tools, text, _), *each = asyncio.run(sessions())
    assert "t__echo" in tools and "h__echo" in tools and text == "over stdio"
    for mode, (version, tools, text, read) in zip(MODES, each):
        assert version == MODES[mode] and "echo" in tools and text == "over stdio"
        assert read == "hello resource"



@pytest.fixture(scope="module")
def fixture_env(tmp_path_factory):
    """llmhost in front of the conformance fixture (`fixture`, over HTTP), the same at
    2025-11-25 only (`old`) and the stdio test server (`t`): -> (running, the fixture's own
    URL)."""
    procs, urls = [], []
    for extra in ([], ["legacy"]):
        procs.append(subprocess.Popen([sys.executable, TESTS_PY,
                                       "mcp-fixture", *extra], stdout=subprocess.PIPE,
                                      text=True))
        line = procs[-1].stdout.readline()
        assert line.startswith("PORT "), line
        urls.append(f"http://127.0.0.1:{int(line.split()[1])}/mcp")
    path = write_registry(tmp_path_factory.mktemp("fixture") / "servers.json", [], mcp={
        "fixture": {"url": urls[0]}, "old": {"url": urls[1]}, "t": MCP_STDIO})
    running = Running(path)
    yield running, urls[0]
    running.stop(timeout=5)
    for proc in procs:
        proc.terminate()
        proc.wait(TIMEOUT)


MCP_NAMED = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


def modern_post(port, path, method, params=None, caps=None, headers=None, rid=1):
    """One 2026-07-28 request as a raw POST, with the Mcp-Method and Mcp-Name headers its
    body calls for (`headers` adds to or replaces them; None as a value leaves one out)
    -> (status, the JSON-RPC answer: the response, or the last event of a stream)."""
    params = dict(params or {}, _meta={
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": caps or {}})
    sent = {"Accept": "application/json, text/event-stream", "Mcp-Method": method,
            "MCP-Protocol-Version": "2026-07-28"}
    if method in MCP_NAMED:
        sent["Mcp-Name"] = params[MCP_NAMED[method]]
    for name, value in (headers or {}).items():  # (a name in other case replaces it)
        sent = {k: v for k, v in sent.items() if k.lower() != name.lower()}
        sent[name] = value
    status, got, raw = request(port, "POST", path, {"jsonrpc": "2.0", "id": rid,
                                                    "method": method, "params": params},
                               headers={k: v for k, v in sent.items() if v is not None})
    return status, rpc_answer(got, raw)


def rpc_answer(headers, raw):
    """The JSON-RPC answer in a response: its JSON body, or the last event of its stream."""
    if headers.get("content-type", "").startswith("text/event-stream"):
        raw = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")][-1]
    return json.loads(raw)


def test_mcp_server_relays_the_capabilities_of_the_client_that_asks(fixture_env):
    """A 2026-07-28 request relayed to a 2026-07-28 backend carries the capabilities its own
    client declared, not llmhost's (which declares sampling and elicitation): the backend
    refuses a tool that needs one the client lacks (-32021, HTTP 400) and asks a client only
    what it can answer."""
    running, _ = fixture_env
    port = running.port
    for path, tool in (("/mcp/fixture", "test_missing_capability"),
                       ("/mcp", "fixture__test_missing_capability")):
        status, doc = modern_post(port, path, "tools/call", {"name": tool})
        assert status == 400 and doc["error"]["code"] == -32021, doc
        status, doc = modern_post(port, path, "tools/call", {"name": tool},
                                  caps={"sampling": {}})
        assert status == 200 and doc["result"]["content"][0]["text"] == \
            "sampling is declared", doc
    asks = {}
    for caps in ({}, {"elicitation": {}}, {"sampling": {}, "elicitation": {}}):
        status, doc = modern_post(port, "/mcp/fixture", "tools/call", {
            "name": "test_input_required_result_capabilities"}, caps=caps)
        asks[tuple(caps)] = sorted(doc["result"].get("inputRequests") or ())
    assert asks == {(): [], ("elicitation",): ["user_name"],
                    ("sampling", "elicitation"): ["question", "user_name"]}

    async def sdk(**kw):  # the SDK's client: declares what its callbacks make it declare
        from mcp.shared.exceptions import MCPError
        async with sdk_client(f"http://127.0.0.1:{port}/mcp/fixture", "auto", **kw) as c:
            try:
                return (await c.call_tool("test_missing_capability", {})).content[0].text
            except MCPError as e:
                return e.error.code

    async def sample(ctx, params):
        import mcp_types as MT
        return MT.CreateMessageResult(role="assistant", model="m",
                                      content=MT.TextContent(text="4"))

    assert asyncio.run(sdk()) == -32021
    assert asyncio.run(sdk(sampling_callback=sample)) == "sampling is declared"


@pytest.mark.parametrize("path, tool", [("/mcp/fixture", "test_simple_text"),
                                        ("/mcp", "fixture__test_simple_text")])
def test_mcp_server_checks_the_routing_headers_against_the_body(fixture_env, path, tool):
    """SEP-2243: at 2026-07-28 Mcp-Method (every request) and Mcp-Name (tools/call,
    prompts/get, resources/read) repeat the body, as MCP-Protocol-Version repeats _meta, for
    intermediaries that route on them: one missing or different is -32020, HTTP 400, before
    anything is run. Header names are case-insensitive, values exact but for the spaces
    around them; a name a header cannot carry comes in the =?base64?...?= form."""
    running, _ = fixture_env
    port, call = running.port, {"name": tool}
    refused = [({"Mcp-Method": "prompts/list"}, "tools/list", {}),
               ({"Mcp-Method": None}, "tools/list", {}),
               ({"Mcp-Method": "TOOLS/LIST"}, "tools/list", {}),
               ({"Mcp-Name": "wrong_tool_name"}, "tools/call", call),
               ({"Mcp-Name": None}, "tools/call", call),
               ({"Mcp-Method": "tasks/get"}, "tools/call", call),
               ({"Mcp-Name": "test://other"}, "resources/read", {"uri": "test://static-text"}),
               ({"MCP-Protocol-Version": None}, "tools/list", {})]
    for headers, method, params in refused:
        status, doc = modern_post(port, path, method, params, headers=headers)
        assert status == 400 and doc["error"]["code"] == -32020, (headers, doc)
    encoded = "=?base64?" + base64.b64encode(tool.encode()).decode() + "?="
    for headers in ({}, {"Mcp-Name": f"  {tool}  "}, {"mcp-method": "tools/call"},
                    {"MCP-METHOD": "tools/call"}, {"Mcp-Name": encoded}):
        status, doc = modern_post(port, path, "tools/call", call, headers=headers)
        assert status == 200 and doc["result"]["content"][0]["text"] == \
            "This is a simple text response for testing.", (headers, doc)
    assert llmhost.mcp_header_value("=?base64?dGVzdA=?=") is None  # (not canonical)


def test_mcp_server_results_name_llmhost_not_the_backend(fixture_env):
    """A backend's result carries its serverInfo in _meta (2026-07-28): the client is
    answered by llmhost, so at 2026-07-28 each result names llmhost (as server/discover
    does), and at 2025-11-25 (where serverInfo is initialize's) none names anybody."""
    running, _ = fixture_env
    info = "io.modelcontextprotocol/serverInfo"
    for path, name, tool in (("/mcp/fixture", "llmhost/fixture", "test_simple_text"),
                             ("/mcp", "llmhost", "fixture__test_simple_text")):
        for method, params in (("server/discover", {}), ("tools/list", {}),
                               ("tools/call", {"name": tool})):
            status, doc = modern_post(running.port, path, method, params)
            assert status == 200 and doc["result"]["_meta"][info] == {
                "name": name, "version": llmhost.__version__}, (method, doc)
    accept = {"Accept": "application/json, text/event-stream"}
    status, headers, _ = request(running.port, "POST", "/mcp/fixture", {
        "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}}, headers=accept)
    status, got, raw = request(running.port, "POST", "/mcp/fixture", {
        "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "test_simple_text"}}, headers=dict(accept, **{
                "Mcp-Session-Id": headers["mcp-session-id"]}))
    result = rpc_answer(got, raw)["result"]
    assert status == 200 and result["content"][0]["type"] == "text" and "_meta" not in result


@pytest.fixture(scope="module")
def paged_env(tmp_path_factory):
    """llmhost in front of the conformance fixture paging its resources one a page (`paged`)
    and the stdio test server (`t`), for both revisions' clients: the cursors hold no state."""
    proc = subprocess.Popen([sys.executable, TESTS_PY, "mcp-fixture"],
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, LLMHOST_TEST_MCP_PAGE="1"))
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    path = write_registry(tmp_path_factory.mktemp("paged") / "s.json", [], mcp={
        "paged": {"url": f"http://127.0.0.1:{int(line.split()[1])}/mcp"}, "t": MCP_STDIO})
    running = Running(path)
    yield running
    running.stop(timeout=5)
    proc.terminate()
    proc.wait(TIMEOUT)


@pytest.mark.parametrize("mode", MODES)
def test_mcp_server_pages_are_the_backends_pages(paged_env, mode):
    """resources/list is paged as the backends page it: on /mcp/NAME the client's cursor
    goes to the server and the server's comes back, as they are; on /mcp a page holds the
    next page of each server that has more, and the cursor says where each one is."""
    running = paged_env
    fixture = ["test://static-text", "test://static-binary", "test://watched-resource"]

    async def walk(where):
        pages, cursors = [], []
        async with sdk_client(f"http://127.0.0.1:{running.port}{where}", mode) as c:
            cursor = None
            while True:
                page = await c.list_resources(cursor=cursor)
                pages.append([str(r.uri) for r in page.resources])
                cursor = page.next_cursor
                if cursor is None:
                    break
                cursors.append(cursor)
            read = await c.read_resource(pages[-1][-1])  # (routed by a later page's URI)
        return pages, cursors, read.contents[0].text

    pages, cursors, read = asyncio.run(walk("/mcp/paged"))
    assert pages == [[uri] for uri in fixture] and cursors == ["at:1", "at:2"]
    assert read == "watched"
    pages, cursors, read = asyncio.run(walk("/mcp"))
    assert pages == [[fixture[0], "test://hello"], [fixture[1]], [fixture[2]]], pages
    assert read == "watched"
    status, doc = modern_post(running.port, "/mcp", "resources/list", {"cursor": "nope"})
    assert status == 400 and doc["error"]["code"] == -32602


@pytest.mark.filterwarnings("ignore:resources/.*subscribe is removed")  # (a's, 2025-11-25)
@pytest.mark.parametrize("backend", ["fixture", "old"])
def test_mcp_server_resource_subscriptions_at_both_revisions(fixture_env, backend):
    """A 2025-11-25 client's resources/subscribe and a 2026-07-28 client's listen stream of
    a resource each get its updates, whichever revision the backend speaks: one of 2025-11-25
    is sent resources/subscribe once for both; one of 2026-07-28 (which has no such method)
    gets a listen stream of that URI from llmhost. The subscription ends with its last
    subscriber."""
    import mcp_types as MT
    running, _ = fixture_env
    front, hub = running.gateway.app.mcp_front, running.gateway.app.mcp_front.hub
    url = f"http://127.0.0.1:{running.port}/mcp/{backend}"
    uri, key = "test://watched-resource", (backend, "test://watched-resource")

    async def wait_for(predicate):
        while not predicate():
            await asyncio.sleep(0.02)

    async def session():
        updated = asyncio.Event()

        async def on_message(msg):
            if isinstance(msg, MT.ResourceUpdatedNotification) and str(msg.params.uri) == uri:
                updated.set()

        async with sdk_client(url, "legacy", message_handler=on_message,
                              client_info=MT.Implementation(name="sub-a", version="1")) as a, \
                sdk_client(url, "auto") as b, sdk_client(url, "legacy") as c:
            assert b.protocol_version == "2026-07-28"
            await wait_for(lambda: any(o.session is not None and o.session.client == "sub-a 1"
                                       for o in front.outlets))  # (a's GET stream is held)
            await a.session.subscribe_resource(uri)
            await a.session.subscribe_resource(uri)  # (twice is once)
            assert hub._subscribed[key][0] == 1
            async with b.listen(resource_subscriptions=[uri]) as sub:
                assert sub.honored.resource_subscriptions == [uri]
                assert hub._subscribed[key][0] == 2
                await c.call_tool("test_trigger_resource_update", {})
                await asyncio.wait_for(updated.wait(), TIMEOUT)
                event = await asyncio.wait_for(sub.__anext__(), TIMEOUT)
                assert type(event).__name__ == "ResourceUpdated" and event.uri == uri
                await a.session.unsubscribe_resource(uri)
                assert hub._subscribed[key][0] == 1
                watcher = hub._subscribed[key][2]
                assert (watcher is not None) == (backend == "fixture")
            await wait_for(lambda: key not in hub._subscribed)  # (b's stream closed)
            assert watcher is None or watcher.done()
            await a.session.unsubscribe_resource(uri)  # (not subscribed: nothing to do)

    asyncio.run(asyncio.wait_for(session(), TIMEOUT * 3))


# =============================================================================
# Managed servers: started on demand, stopped when idle
# =============================================================================

FAKE_CMD = f"{sys.executable} {TESTS_PY} fake-upstream ${{PORT}}"


def managed_entry(name, model, **extra):
    return dict({"name": name, "command": f"{FAKE_CMD} {model}", "models": [model]}, **extra)


def process_status(port, name):
    """The /v1/status entry of the managed server `name` (what `llmhost.py ps` shows)."""
    return next(p for p in get_status(port)["processes"] if p["name"] == name)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_until(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_managed_cold_start_is_shared_and_idle_stop(tmp_path):
    path = write_registry(tmp_path / "s.json", [managed_entry("m", "managed-model", ttl=0.5)])
    running = Running(path)
    try:
        models = json.loads(request(running.port, "GET", "/v1/models")[2])["data"]
        assert models[0]["id"] == "managed-model" and models[0]["state"] == "stopped"
        body = {"model": "managed-model", "messages": [{"role": "user", "content": "hi"}]}
        threads, results = held_requests(running.port, 20, body)
        for t in threads:
            t.join(TIMEOUT * 2)
        assert [r[0] for r in results] == [200] * 20
        log = open(tmp_path / "llmhost-logs" / "m.log").read()
        assert log.count("--- llmhost: starting") == 1  # 20 first requests, one start
        server = process_status(running.port, "m")
        pid = server["pid"]
        assert pid_alive(pid) and server["state"] == "running"
        # ttl 0.5 s
        assert wait_until(lambda: process_status(running.port, "m")["state"] == "stopped", 5)
        assert wait_until(lambda: not pid_alive(pid), 5)
        status, doc = jpost(running.port, "/v1/chat/completions", body)
        server = process_status(running.port, "m")
        assert status == 200 and server["state"] == "running" and server["pid"] != pid
        _, samples = scrape(running.port)  # two starts, one stop
        assert series(samples, "llmhost_managed_servers_running") == 1
        moves = "llmhost_managed_server_transitions_total"
        assert series(samples, moves, server="m", state="running") == 2
        assert series(samples, moves, server="m", state="stopped") == 1
        assert series(samples, moves, server="m", state="failed") is None
    finally:
        running.stop()
    assert wait_until(lambda: not pid_alive(server["pid"]), 5)  # serve leaves no child


def test_managed_max_running_swaps_without_cutting(tmp_path):
    path = write_registry(tmp_path / "s.json", [managed_entry("a", "model-a", ttl=0),
                                                managed_entry("b", "model-b", ttl=0)])
    running = Running(path, max_running=1)

    def procs():
        return {p["name"]: p for p in get_status(running.port)["processes"]}
    try:
        slow_a = {"model": "model-a", "messages": [{"role": "user", "content": "delay:0.8"}]}
        threads, results = held_requests(running.port, 1, slow_a)
        assert wait_until(lambda: procs()["a"]["in_flight"] and procs()["a"]["state"] == "running")
        started = time.monotonic()
        status, doc = jpost(running.port, "/v1/chat/completions",
                            {"model": "model-b", "messages": [{"role": "user", "content": "x"}]})
        threads[0].join(TIMEOUT)
        assert results[0][0] == 200  # the in-flight request on `a` was not cut
        assert status == 200 and time.monotonic() - started >= 0.5  # `b` waited its turn
        assert procs()["a"]["state"] == "stopped" and procs()["b"]["state"] == "running"
        for model in ("model-a", "model-b", "model-a"):
            assert jpost(running.port, "/v1/chat/completions", {"model": model, "messages": [
                {"role": "user", "content": "x"}]})[0] == 200
            assert sum(p["state"] == "running" for p in procs().values()) == 1
    finally:
        running.stop()


@pytest.mark.parametrize("command, extra, needle", [
    (f"{sys.executable} -c 'import sys; print(\"bad model file\"); sys.exit(3)' ${{PORT}}", {},
     "exited with code 3"),
    (f"{sys.executable} -m http.server --bind 127.0.0.1 ${{PORT}}",
     {"start_timeout": 1.0}, "not ready after 1s"),
])
def test_managed_start_failures_are_503_with_output(tmp_path, command, extra, needle):
    path = write_registry(tmp_path / "s.json", [dict(
        {"name": "bad", "command": command, "models": ["bad-model"]}, **extra)])
    running = Running(path)
    try:
        body = {"model": "bad-model", "messages": [{"role": "user", "content": "x"}]}
        status, doc = jpost(running.port, "/v1/chat/completions", body)
        assert status == 503 and doc["error"]["code"] == "server_start_failed"
        assert needle in doc["error"]["message"]
        if "exited" in needle:
            assert "bad model file" in doc["error"]["message"]  # the last lines of its output
        status, headers, raw = post(running.port, "/v1/chat/completions", body)
        assert status == 503 and "next try in" in json.loads(raw)["error"]["message"]
        assert int(headers["retry-after"]) >= 1  # backoff before the next attempt
    finally:
        running.stop()


def test_managed_server_that_serves_another_model_fails_fast(tmp_path, monkeypatch):
    """Up, but its /models lacks --model (llama.cpp lists the .gguf path): a clear 503 after a
    short grace, not a wait for the whole start timeout."""
    monkeypatch.setattr(llmhost, "MANAGED_MODEL_GRACE", 0.3)
    path = write_registry(tmp_path / "s.json", [
        {"name": "m", "command": f"{FAKE_CMD} other-model", "models": ["wanted-model"]}])
    running = Running(path)
    try:
        started = time.monotonic()
        status, doc = jpost(running.port, "/v1/chat/completions", {
            "model": "wanted-model", "messages": [{"role": "user", "content": "x"}]})
        assert status == 503 and time.monotonic() - started < TIMEOUT
        assert "it serves other-model, not wanted-model" in doc["error"]["message"]
    finally:
        running.stop()


def test_managed_command_expansion():
    argv = llmhost.expand_command("srv --port ${PORT} -m ${MODEL} ${env.VAR1}", 8080, "m1",
                                  {"VAR1": "v1"})
    assert argv == ["srv", "--port", "8080", "-m", "m1", "v1"]
    assert llmhost.expand_command("srv -m ${env.M}", 1, "m", {"M": "/my models/it's.gguf"}) == \
        ["srv", "-m", "/my models/it's.gguf"]  # one argument, as given
    with pytest.raises(ValueError, match=r"\$\{env.VAR2\} is not set"):
        llmhost.expand_command("srv ${env.VAR2}", 1, "m", {})


# The moves the process manager makes, read from the code; any other is a bug. The strings
# are what /v1/status, `ps` and /v1/models show.
MANAGED_STATE_MOVES = {
    ("stopped", "starting"), ("stopped", "stopped"), ("stopped", "failed"),
    ("starting", "running"), ("starting", "failed"), ("starting", "stopping"),
    ("starting", "stopped"),
    ("running", "stopping"), ("running", "failed"), ("running", "stopped"),
    ("running", "starting"),
    ("stopping", "stopped"), ("stopping", "stopping"), ("stopping", "starting"),
    ("failed", "starting")}
MANAGED_STATE_PATHS = {"stopped": ["stopped"], "starting": ["stopped", "starting"],
                       "running": ["stopped", "starting", "running"],
                       "stopping": ["stopped", "starting", "running", "stopping"],
                       "failed": ["stopped", "starting", "failed"]}


@pytest.mark.parametrize("before", MANAGED_STATE_PATHS)
@pytest.mark.parametrize("after", MANAGED_STATE_PATHS)
def test_managed_state_moves_outside_the_table_are_logged_as_bugs(before, after, caplog,
                                                                  tmp_path):
    up = llmhost.Upstream(managed_entry("m", "managed-model"), None)
    check_state_move(llmhost.ManagedServer(up, str(tmp_path / "m.log")),
                     MANAGED_STATE_PATHS[before], after, MANAGED_STATE_MOVES, caplog)


def test_killed_serve_leaves_no_child_on_next_start(tmp_path):
    registry = write_registry(tmp_path / "s.json", [managed_entry("m", "managed-model", ttl=0)])
    proc, port = start_serve(registry)
    assert jpost(port, "/v1/chat/completions", {"model": "managed-model", "messages": [
        {"role": "user", "content": "x"}]})[0] == 200
    child = int(next(iter(json.load(open(registry + ".pids")))))
    proc.kill()  # SIGKILL: no chance to stop its children
    proc.communicate()
    assert pid_alive(child)
    proc, port = start_serve(registry)
    try:
        assert wait_until(lambda: not pid_alive(child), 5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
    assert "left by a previous serve" in err


def test_managed_unload_while_starting_is_no_failure(tmp_path):
    fake = FAKE_CMD[len(sys.executable) + 1:]  # the fake upstream, after 1.5 s
    slow = (f'{sys.executable} -c "import os, sys, time; time.sleep(1.5); '
            f'os.execv(sys.executable, [sys.executable] + sys.argv[1:])" {fake} slow-model')
    path = write_registry(tmp_path / "s.json", [
        {"name": "m", "command": slow, "models": ["slow-model"]}])
    running = Running(path)
    server = running.gateway.processes.servers["m"]
    body = {"model": "slow-model", "messages": [{"role": "user", "content": "x"}]}
    try:
        threads, results = held_requests(running.port, 1, body)
        assert wait_until(lambda: process_status(running.port, "m")["state"] == "starting"
                          and process_status(running.port, "m")["pid"] is not None)
        status, _, _ = request(running.port, "POST", "/processes/m/unload")  # (without /v1)
        assert status == 200
        threads[0].join(TIMEOUT)
        assert results[0][0] == 503 and b"stopped while it started" in results[0][2]
        assert process_status(running.port, "m")["state"] == "stopped"
        assert server.failures == 0  # no backoff to wait out (a count /v1/status does not show)
        assert jpost(running.port, "/v1/chat/completions", body)[0] == 200
    finally:
        running.stop()


def test_managed_cli(tmp_path):
    registry = str(tmp_path / "servers.json")
    code, out, err = run_cli(registry, "add", "m", "--command", FAKE_CMD + " model-x", "--check",
                             "--ttl", "60", environ=dict(os.environ))
    assert code == 0, err
    entry = llmhost.load_registry(registry)["servers"][0]
    assert entry["models"] == ["model-x"] and entry["ttl"] == 60 and "url" not in entry
    for argv, needle in [
            (["add", "x", "--command", "/no/such/binary --port ${PORT}", "--model", "y"],
             "not an executable"),
            (["add", "x", "--command", f"{sys.executable} -m http.server", "--model", "y"],
             "${PORT}"),
            (["add", "x", "--command", FAKE_CMD + " z"], "--model"),
            (["add", "x", "http://127.0.0.1:1/v1", "--ttl", "5", "--no-check"], "--command")]:
        before = open(registry, "rb").read()
        code, out, err = run_cli(registry, *argv, environ=dict(os.environ))
        assert code == 1 and needle in err, err
        assert open(registry, "rb").read() == before
    proc, port = start_serve(registry)
    try:
        url = f"http://127.0.0.1:{port}"
        code, out, err = run_cli(registry, "ps", "--url", url)
        assert code == 0 and "stopped" in out
        code, out, err = run_cli(registry, "load", "m", "--url", url)
        assert code == 0 and "running" in out
        code, out, err = run_cli(registry, "logs", "m")
        assert code == 0 and "--- llmhost: starting" in out
        code, out, err = run_cli(registry, "unload", "m", "--url", url)
        assert code == 0 and "stopped" in out
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)


def test_discover_finds_fake_servers(tmp_path):
    one, two = FakeUpstream(models=["alpha"]), FakeUpstream(models=["beta", "gamma"])
    registry = str(tmp_path / "servers.json")
    try:
        ports = f"{one.port}, {two.port},1"  # spaces as typed: names are still local<port>
        code, out, err = run_cli(registry, "discover", "--ports", ports)
        assert code == 0 and "alpha" in out and "beta, gamma" in out
        assert not os.path.exists(registry)
        code, out, err = run_cli(registry, "discover", "--ports", ports, "--add")
        servers = llmhost.load_registry(registry)["servers"]
        assert [s["models"] for s in servers] == [["alpha"], ["beta", "gamma"]]
        assert [s["name"] for s in servers] == [f"local{one.port}", f"local{two.port}"]
        code, out, err = run_cli(registry, "discover", "--ports", ports, "--add")
        assert "nothing new" in out and len(llmhost.load_registry(registry)["servers"]) == 2
    finally:
        one.close()
        two.close()


def served_models(port):
    status, _, raw = request(port, "GET", "/v1/models")
    assert status == 200
    return [m["id"] for m in json.loads(raw)["data"]]


def test_serve_with_an_empty_registry_serves_what_it_discovers_until_the_registry_names_some(
        tmp_path):
    found, mine = FakeUpstream(models=["alpha", "beta"]), FakeUpstream(models=["gamma"])
    registry = str(tmp_path / "servers.json")  # missing: an empty registry
    proc, port = start_serve(registry, "--discover-ports", f"{found.port},1", "--no-access-log")
    try:
        assert wait_until(lambda: served_models(port) == ["alpha", "beta"])
        status, doc = jpost(port, "/v1/chat/completions", dict(CHAT, model="beta"))
        assert status == 200 and found.posts()[-1]["path"] == "/v1/chat/completions"
        assert not os.path.exists(registry)  # served, not saved
        code, out, err = run_cli(registry, "add", "mine", mine.url)
        assert code == 0, err
        assert wait_until(lambda: served_models(port) == ["gamma"])  # the registry wins
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
        found.close()
        mine.close()
    assert f"INFO discovered local{found.port} at {found.url} serving alpha, beta\n" in err
    assert f"registry {registry} is empty, so serving the 1 server(s) found" in err
    assert "make them permanent with `python3 llmhost.py discover --add`" in err
    assert "it replaces those discovered (local%d)" % found.port in err
    assert llmhost.load_registry(registry)["servers"][0]["name"] == "mine"


def test_serve_with_no_discover_probes_nothing(tmp_path):
    fake = FakeUpstream(models=["alpha"])
    registry = str(tmp_path / "servers.json")
    proc, port = start_serve(registry, "--discover-ports", str(fake.port), "--no-discover")
    try:
        ready = wait_line(proc, "and --no-discover: add one with")
        assert "serving on" in ready[0] and served_models(port) == []
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
        fake.close()
    assert fake.requests == [] and "discovered" not in err


def wait_line(proc, needle, timeout=TIMEOUT):
    """Read serve's log until a line holds `needle` -> the lines read (a thread reads, so a
    serve that never says it fails the test at `timeout` instead of hanging it)."""
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if needle in line:
                seen.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(timeout), "".join(lines)
    return lines


if __name__ == "__main__" and sys.argv[1:2] == ["mcp-server"]:
    run_mcp_test_server(sys.argv[2:])

if __name__ == "__main__" and sys.argv[1:2] == ["mcp-fixture"]:
    run_mcp_conformance_fixture(sys.argv[2:])

if __name__ == "__main__" and sys.argv[1:2] == ["fake-upstream"]:
    upstream = FakeUpstream(models=sys.argv[3:] or ["fake-model"], port=int(sys.argv[2]))
    print(f"fake upstream on {upstream.url}", flush=True)
    upstream.thread.join()


# =============================================================================
# Router (pure, injectable clock)
# =============================================================================

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_router(*entries, clock=None):
    router = llmhost.Router(clock or Clock())
    router.load([dict({"url": "http://127.0.0.1:1/v1", "models": ["m"]}, **e) for e in entries],
                {})
    return router


def names(candidates):
    return [up.name for up, _ in candidates]


def test_router_least_busy_then_round_robin():
    router = make_router({"name": "a"}, {"name": "b"}, {"name": "c"})
    firsts = [names(router.resolve("m"))[0] for _ in range(6)]
    assert sorted(firsts) == ["a", "a", "b", "b", "c", "c"]  # ties rotate
    router.upstreams["a"].in_flight = 2
    router.upstreams["b"].in_flight = 1
    assert names(router.resolve("m")) == ["c", "b", "a"]


def test_router_priority_fallback_only_when_down_or_full():
    router = make_router({"name": "local", "max_concurrency": 1},
                         {"name": "remote", "priority": 10})
    assert names(router.resolve("m")) == ["local", "remote"]
    router.upstreams["local"].in_flight = 1  # full
    assert names(router.resolve("m")) == ["remote", "local"]


def test_a_501_does_not_cool_a_server_down(gateway, fake):
    fake.script(*[{"status": 501}] * llmhost.FAILURES_BEFORE_COOLDOWN)
    for _ in range(llmhost.FAILURES_BEFORE_COOLDOWN):  # llama.cpp without --embeddings
        status, doc = jpost(gateway.port, "/v1/embeddings", {"model": "fake-model", "input": "x"})
        assert status == 501
    local = server_status(gateway.port, "local")
    assert local["consecutive_failures"] == 0 and local["healthy"], local
    assert local["cooldown_seconds"] == 0
    assert jpost(gateway.port, "/v1/chat/completions", CHAT)[0] == 200


@pytest.mark.parametrize("status, final, retry, health", [
    (429, False, True, "rate_limited"), (429, True, False, "rate_limited"),
    (503, False, True, "failed"), (503, True, False, "failed"), (502, False, True, "failed"),
    (504, True, False, "failed"), (500, False, False, "failed"), (501, False, False, "ok"),
    (200, False, False, "ok"), (400, False, False, "ok"), (404, True, False, "ok"),
])
def test_after_answer_says_what_the_send_path_does_next(status, final, retry, health):
    assert llmhost.after_answer(status, final) == (retry, health)


def test_a_429_cools_its_server_for_its_retry_after_even_from_the_last_server():
    """README says a 429 cools a server at once: before, a 429 from the last (or only) server
    counted as a success and cooled nothing, so every next request went to it again."""
    clock = Clock()
    router = make_router({"name": "a"}, clock=clock)
    sender = llmhost.Sender(router, None, llmhost.Admission(), None)
    a = router.upstreams["a"]
    retry, health = llmhost.after_answer(429, final=True)
    sender.mark(a, health, "HTTP 429", "7")
    assert not retry and a.cooldown_until == clock.now + 7 and router.cooling() == [a]
    clock.now += 8
    assert router.cooling() == []
    sender.mark(a, *llmhost.after_answer(429, final=False)[1:], "HTTP 429", None)
    assert a.cooldown_until == clock.now + llmhost.COOLDOWN_BASE  # (no Retry-After)


def test_a_429_from_the_only_server_is_passed_on_and_cools_it(gateway, fake):
    fake.script({"status": 429, "headers": [("Retry-After", "30")]})
    status, headers, _ = post(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 429 and headers.get("retry-after") == "30"
    status, _, raw = request(gateway.port, "GET", "/v1/status")
    server = json.loads(raw)["servers"][0]
    assert not server["healthy"] and 25 < server["cooldown_seconds"] <= 30, server


def test_router_cooldown_exponential_and_recovery():
    clock = Clock()
    router = make_router({"name": "a"}, {"name": "b"}, clock=clock)
    a = router.upstreams["a"]
    for _ in range(llmhost.FAILURES_BEFORE_COOLDOWN - 1):
        router.failed(a, "boom")
    assert a.cooldown_until == 0  # not yet
    router.failed(a, "boom")
    assert a.cooldown_until == clock.now + llmhost.COOLDOWN_BASE
    assert all(names(router.resolve("m"))[-1] == "a" for _ in range(4))  # skipped while cooling
    router.failed(a, "boom")
    assert a.cooldown_until == clock.now + 2 * llmhost.COOLDOWN_BASE  # doubles
    for _ in range(30):
        router.failed(a, "boom")
    assert a.cooldown_until == clock.now + llmhost.COOLDOWN_MAX  # capped
    clock.now += llmhost.COOLDOWN_MAX + 1
    assert router.cooling() == [] and "a" in names(router.resolve("m"))[:2]
    router.failed(a, "boom")
    router.recovered(a)
    assert a.failures == 0 and a.cooldown_until == 0


def test_router_429_cools_at_once_honouring_retry_after():
    clock = Clock()
    router = make_router({"name": "a"}, clock=clock)
    router.rate_limited(router.upstreams["a"], llmhost.parse_retry_after("7"))
    assert router.upstreams["a"].cooldown_until == clock.now + 7
    assert llmhost.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == llmhost.COOLDOWN_BASE


def test_router_keeps_health_of_unchanged_entries_on_reload():
    router = make_router({"name": "a"}, {"name": "b"})
    a = router.upstreams["a"]
    a.failures = 2
    router.load([{"name": "a", "url": "http://127.0.0.1:1/v1", "models": ["m"]}], {})
    assert router.upstreams["a"] is a and "b" not in router.upstreams


# =============================================================================
# Routing, failover and concurrency through a running gateway
# =============================================================================

@pytest.fixture
def pool(tmp_path):
    """Three fake upstreams behind `fake-model`, tried in order u0, u1, u2 (priorities)."""
    fakes = [FakeUpstream() for _ in range(3)]
    path = write_registry(tmp_path / "servers.json", [
        {"name": f"u{i}", "url": f.url, "models": ["fake-model"], "priority": i, "timeout": 2}
        for i, f in enumerate(fakes)])
    running = Running(path)
    yield running, fakes
    running.stop()
    for f in fakes:
        f.close()


def test_failover_before_first_byte(pool):
    running, fakes = pool
    fakes[0].close()  # connection refused
    fakes[1].script({"status": 503})
    status, headers, raw = post(running.port, "/v1/chat/completions", CHAT)
    assert status == 200 and headers["x-llmhost-server"] == "u2"
    assert len(fakes[1].posts()) == 1 and len(fakes[2].posts()) == 1
    errors = {s["name"]: s["errors"] for s in get_status(running.port)["servers"]}
    assert errors == {"u0": 1, "u1": 1, "u2": 0}


def test_429_upstream_fails_over_and_cools(pool):
    running, fakes = pool
    fakes[0].script({"status": 429, "headers": [("Retry-After", "30")]})
    status, headers, _ = post(running.port, "/v1/chat/completions", CHAT)
    assert status == 200 and headers["x-llmhost-server"] == "u1"
    status, headers, _ = post(running.port, "/v1/chat/completions", CHAT)
    assert headers["x-llmhost-server"] == "u1"  # u0 is cooling down for 30 s
    assert len(fakes[0].posts()) == 1


def test_last_candidate_error_is_passed_on(pool):
    running, fakes = pool
    for f in fakes:
        f.script({"status": 503})
    status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
    assert status == 503 and "fake error 503" in doc["error"]["message"]
    assert [len(f.posts()) for f in fakes] == [1, 1, 1]


def test_no_retry_after_first_byte_and_error_event(pool):
    running, fakes = pool
    fakes[0].script({"drop_after": 2})
    status, headers, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
    events = sse_events(raw)
    assert status == 200 and "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and "mid-answer" in error["message"]
    assert [json.loads(e)["choices"][0]["delta"] for e in events[:-1]] == \
        [{"role": "assistant", "content": ""}, {"content": "echo:"}, {"content": " hello"}]
    assert len(fakes[1].posts()) == 0 and len(fakes[2].posts()) == 0  # never retried


def test_events_split_across_chunks_and_death_mid_event(pool):
    running, fakes = pool
    fakes[0].script({"split": True})
    status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if json.loads(e)["choices"])
    assert text == "echo: hello there"
    fakes[0].script({"split": True, "drop_after": 1})
    status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
    events = sse_events(raw)
    assert [json.loads(e).get("error", {}).get("type") for e in events] == \
        [None, None, "server_error"]  # whole events, then one clean error event
    assert raw.count(b"data:") == 3


def test_upstream_stall_mid_stream_ends_with_timeout_event(pool):
    running, fakes = pool
    release = threading.Event()
    fakes[0].script({"stall_after": 1, "stall": release})
    running.gateway.router.upstreams["u0"].timeout = 0.5
    try:
        status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
    finally:
        release.set()
    events = sse_events(raw)
    assert json.loads(events[-1])["error"]["code"] == "upstream_timeout"
    assert "[DONE]" not in events


def test_non_stream_death_is_502(pool):
    running, fakes = pool
    fakes[0].script({"close": True})
    for f in fakes[1:]:
        f.script({"close": True})
    status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
    assert status == 502 and doc["error"]["code"] == "upstream_closed"


def test_stale_pooled_connection_is_retried_once(gateway, fake):
    assert post(gateway.port, "/v1/chat/completions", CHAT)[0] == 200
    # the upstream forgets every idle keep-alive connection (as after its own idle timeout)
    fake.server.shutdown()
    fake.server.server_close()
    fake.server = QuietServer(("127.0.0.1", fake.port), FakeHandler)
    fake.server.fake = fake
    fake.thread = threading.Thread(target=fake.server.serve_forever, args=(0.05,), daemon=True)
    fake.thread.start()
    status, _, _ = post(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 200
    assert server_status(gateway.port, "local")["errors"] == 0


def test_pooled_connection_closed_without_answer_is_retried_once(gateway, fake):
    """The other stale case: the pooled connection looks open, takes the request, and is
    closed without an answer (the upstream's idle timeout raced the request)."""
    assert post(gateway.port, "/v1/chat/completions", CHAT)[0] == 200  # now pooled
    fake.script({"close": True})
    status, _, _ = post(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 200 and len(fake.posts()) == 3  # the second on a fresh connection
    assert server_status(gateway.port, "local")["errors"] == 0


def test_a_pooled_connection_that_took_the_request_is_not_retried(gateway, fake):
    """One that closes without an answer a while after the request went out had taken it (the
    model may have run it): a POST is not sent twice (RFC 9110 §9.2.2; nginx neither)."""
    assert post(gateway.port, "/v1/chat/completions", CHAT)[0] == 200  # now pooled
    fake.script({"delay": 1.0, "close": True})
    status, doc = jpost(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 502 and doc["error"]["code"] == "upstream_closed"
    assert len(fake.posts()) == 2
    assert post(gateway.port, "/v1/chat/completions", CHAT)[0] == 200  # pooled again
    fake.script({"interim_close": True})  # at once, but after an interim answer: taken too
    status, doc = jpost(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 502 and len(fake.posts()) == 4


def test_cooling_server_comes_back_through_probe(pool):
    running, fakes = pool
    fakes[0].script(*[{"status": 503}] * llmhost.FAILURES_BEFORE_COOLDOWN)
    for _ in range(llmhost.FAILURES_BEFORE_COOLDOWN):  # (each answered by u1)
        assert post(running.port, "/v1/chat/completions", CHAT)[0] == 200
    assert not server_status(running.port, "u0")["healthy"]  # cooling down
    # GET /models answered: back before its 5 s cooldown has passed
    assert wait_until(lambda: server_status(running.port, "u0")["healthy"],
                      llmhost.COOLDOWN_BASE - 1)
    assert any(r["path"] == "/v1/models" for r in fakes[0].requests)


def held_requests(port, n, body=CHAT):
    """Start n POSTs in threads; -> (threads, results list filled as they finish)."""
    results = []

    def one():
        try:
            results.append(post(port, "/v1/chat/completions", body, timeout=TIMEOUT * 2))
        except Exception as exc:  # noqa: BLE001 -- recorded and asserted on
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_slot_handed_over_as_the_wait_times_out_is_not_lost():
    """A release that lands in the same loop turn as the waiter's timeout: the waiter either
    gets the slot or the slot goes back; it is never lost (asyncio.wait_for on 3.12+ raises
    TimeoutError even when the future was already given its result)."""
    async def trial(offset):
        admission = llmhost.Admission(limit=1, queue_size=5, queue_timeout=0.005)
        await admission.acquire()
        loop = asyncio.get_running_loop()
        waiter = loop.create_task(admission.acquire())
        await asyncio.sleep(0)  # (one turn of the loop, not a wait: the waiter takes its place)
        assert admission.queued() == 1
        released = loop.create_future()
        loop.call_at(loop.time() + offset, lambda: (admission.release(),
                                                    released.set_result(None)))
        try:
            await waiter
            holders = 1
        except llmhost.RateLimited:
            holders = 0
        await released
        return admission.active, holders

    async def trials():
        return [await trial(0.005 + (i - 10) * 0.0001) for i in range(20)]

    for active, holders in asyncio.run(trials()):
        assert active == holders


def test_sixty_against_fifty_with_small_queue(fake, tmp_path):
    path = write_registry(tmp_path / "s.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, max_concurrency=50, queue_size=5)
    release = threading.Event()
    fake.script(*[{"hold": release} for _ in range(60)])
    try:
        threads, results = held_requests(running.port, 60)
        for _ in range(50):  # 50 reach the upstream and are held there
            assert fake.holding.acquire(timeout=TIMEOUT)
        assert wait_until(lambda: len(results) >= 5)
        rejected = [r for r in results if r[0] == 429]
        assert len(rejected) == 5 and len(results) == 5  # the excess: answered at once
        for status, headers, raw in rejected:
            assert headers["retry-after"] == "1"
            assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        assert get_status(running.port)["queued"] == 5
        release.set()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert sorted(r[0] for r in results) == [200] * 55 + [429] * 5  # none lost, none hung
        assert len(fake.posts()) == 55
    finally:
        release.set()
        running.stop()


def test_queue_timeout_gives_429(fake, tmp_path):
    path = write_registry(tmp_path / "s.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, max_concurrency=1, queue_size=5, queue_timeout=0.3)
    release = threading.Event()
    fake.script({"hold": release})
    try:
        threads, results = held_requests(running.port, 1)
        assert fake.holding.acquire(timeout=TIMEOUT)
        status, headers, raw = post(running.port, "/v1/chat/completions", CHAT)
        assert status == 429 and "waited" in json.loads(raw)["error"]["message"]
        release.set()
        threads[0].join(TIMEOUT)
        assert results[0][0] == 200
    finally:
        release.set()
        running.stop()


def test_a_stream_whose_upstream_dies_before_its_first_event_is_retried(tmp_path):
    first, second = FakeUpstream(), FakeUpstream()
    path = write_registry(tmp_path / "s.json", [
        {"name": "first", "url": first.url, "models": ["fake-model"]},
        {"name": "second", "url": second.url, "models": ["fake-model"], "priority": 10}])
    running = Running(path)
    first.script({"drop_at_head": True})  # as llama.cpp killed while it reads a long prompt
    try:
        status, headers, raw = post(running.port, "/v1/chat/completions",
                                    dict(CHAT, stream=True))
        assert status == 200 and headers["x-llmhost-server"] == "second"
        events = sse_events(raw)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
        assert len(first.posts()) == 1 and len(second.posts()) == 1
    finally:
        running.stop()
        first.close()
        second.close()


class CloseFramedUpstream:
    """An upstream that ends each answer by closing (no Content-Length, not chunked), as some
    HTTP/1.0-style servers do; `answers` are the bodies of its next POST answers (with a
    content type of None: the whole answer, head and all, sent as it is)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += client.recv(65536)
                if head.startswith(b"POST"):
                    ctype, body = self.answers.pop(0)
                    pieces = body if isinstance(body, list) else [body]  # a list: 0.2 s apart
                    try:
                        client.sendall(pieces[0] if ctype is None else
                                       b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nConnection: "
                                       b"close\r\n\r\n%s" % (ctype, pieces[0]))
                        for piece in pieces[1:]:
                            time.sleep(0.2)  # (pacing: a slow upstream)
                            client.sendall(piece)
                    except OSError:
                        pass  # the reader left
                else:
                    models = b'{"object":"list","data":[{"id":"fake-model"}]}'
                    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close"
                                   b"\r\n\r\n%s" % (len(models), models))

    def close(self):
        self.sock.close()


def test_an_upstream_chunk_over_the_body_limit_is_refused_at_its_size_line(tmp_path):
    """A chunk is read whole, so one larger than an answer may be is refused when its size
    arrives (before: read into memory until the upstream stopped: 411 MB for 150 MB sent)."""
    upstream = CloseFramedUpstream([(None, [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n7fffffff\r\n"] + [b"x" * 1000] * 10)])  # 2 s of data, then the close
    path = write_registry(tmp_path / "s.json", [
        {"name": "old", "url": upstream.url, "models": ["fake-model"]}])
    running = Running(path)
    try:
        started = time.monotonic()
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 502 and "a chunk of 2147483647 bytes" in doc["error"]["message"]
        assert doc["error"]["code"] == "upstream_protocol_error"
        assert time.monotonic() - started < 1.5
    finally:
        running.stop()
        upstream.close()


def test_an_answer_framed_by_the_close_is_checked_for_its_end(tmp_path):
    event = b'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
    upstream = CloseFramedUpstream([
        (b"text/event-stream", event),  # died after one event
        (b"text/event-stream", event + b"data: [DONE]\n\n"),  # ended as it should
        (b"application/json", b'{"id": "chatcmpl-1", "cho'),  # died mid-JSON
    ])
    path = write_registry(tmp_path / "s.json", [
        {"name": "old", "url": upstream.url, "models": ["fake-model"]}])
    running = Running(path)
    try:
        status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
        events = sse_events(raw)
        assert status == 200 and "Hello" in events[0] and len(events) == 2
        assert "closed the stream before data: [DONE]" in json.loads(events[1])["error"]["message"]
        status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
        assert sse_events(raw)[-1] == "[DONE]" and b'"error"' not in raw
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 502 and doc["error"]["code"] == "upstream_closed"
    finally:
        running.stop()
        upstream.close()


def test_a_stream_framed_by_the_close_is_checked_for_its_end_in_the_mcp_loop_too(tmp_path,
                                                                                   caplog):
    event = b'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
    upstream = CloseFramedUpstream([
        (b"text/event-stream", event),  # died after one event
        (b"text/event-stream", event + b"data: [DONE]\n\n")])  # ended as it should
    path = write_registry(tmp_path / "s.json", [
        {"name": "old", "url": upstream.url, "models": ["fake-model"], "mcp": ["t"]}],
        mcp={"t": MCP_STDIO})
    running = Running(path)
    try:
        status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
        events = sse_events(raw)  # (before: a normal end, finish_reason "stop" and [DONE])
        assert status == 200 and "Hello" in events[0] and len(events) == 2, events
        assert "closed the stream before data: [DONE]" in json.loads(events[1])["error"]["message"]
        assert "server old: upstream closed the stream before data: [DONE]" in caplog.text
        # counted, as elsewhere
        assert server_status(running.port, "old")["consecutive_failures"] == 1
        status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
        assert sse_events(raw)[-1] == "[DONE]" and b'"error"' not in raw
    finally:
        running.stop()
        upstream.close()


def test_the_mcp_loop_names_what_it_cannot_read_in_an_answer(tmp_path, caplog):
    """A chunk of another shape ends the stream with an error event that says what was wrong;
    a usage of another shape is left out (before: AttributeError, an internal error)."""
    answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "fake-model",
              "usage": [7], "choices": [{"index": 0, "finish_reason": "stop", "message": {
                  "role": "assistant", "content": "hi"}}]}
    upstream = CloseFramedUpstream([
        (b"text/event-stream", b'data: {"choices": ["x"]}\n\ndata: [DONE]\n\n'),
        (b"text/event-stream", b'data: {"choices": [{"delta": {"tool_calls": [{"index": 0, '
                               b'"function": {"arguments": {"a": 1}}}]}}]}\n\ndata: [DONE]\n\n'),
        (b"application/json", json.dumps(answer).encode())])
    path = write_registry(tmp_path / "s.json", [
        {"name": "odd", "url": upstream.url, "models": ["fake-model"], "mcp": ["t"]}],
        mcp={"t": MCP_STDIO})
    running = Running(path)
    try:
        for needle in ["(choices[0] is a string, not an object)",
                       "(choices[0].delta.tool_calls[0] is not a tool call"]:
            status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
            error = json.loads(sse_events(raw)[-1])["error"]
            assert status == 200 and error["code"] == "upstream_format", error
            assert "upstream sent a chunk that is not an OpenAI chat.completion.chunk " + \
                needle in error["message"]
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 200 and doc["choices"][0]["message"]["content"] == "hi", doc
        assert "Traceback" not in caplog.text
    finally:
        running.stop()
        upstream.close()


@pytest.mark.parametrize("data", [
    '{"a":1}', ' {"a": [1, "x"]} ', '{"a":1}\t', '{"a":1}x', '{"a":1}{}', "", " ", "NaN",
    '"\\ud800"', "\ufeff{}", "[" * 100000, '{"a":', "[1,]", "tok"])
def test_event_json_is_json_loads(data):
    """The tool loop's decoder of an upstream event gives what json_loads gives, and raises a
    ValueError where it does (whitespace around the object, extra data, too deep a nesting)."""
    try:
        expected = llmhost.json_loads(data)
    except ValueError as exc:
        with pytest.raises(ValueError) as caught:
            llmhost.event_json(data)
        assert str(caught.value) == str(exc)
    else:
        assert repr(llmhost.event_json(data)) == repr(expected)  # (NaN is not NaN)


def test_an_upstream_head_with_bare_lf_lines_is_read_and_a_bare_cr_refused(tmp_path):
    """Lines ending in a bare LF are taken from an upstream, as nginx takes them (before: its
    head's CRLF end never came, and the client waited the whole upstream timeout for a 504),
    and read as line ends everywhere, so no field hides behind one; also in a 1xx interim
    head. A bare CR would hide a field from one parser and show it to another: refused."""
    lf_answer = b'{"id": "lf", "object": "chat.completion", "choices": []}'
    upstream = CloseFramedUpstream([
        (None, b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\r\nContent-Type: application/json"
               b"\r\nContent-Length: 2\r\n\r\n{}"),
        (None, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: 1\n"
               b"Content-Length: 2\r\n\r\n{}tail"),
        (None, b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: %d\n\n%s"
               % (len(lf_answer), lf_answer)),
        (None, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\rContent-Length: 2\r\n"
               b"\r\n{}"),
    ])
    path = write_registry(tmp_path / "s.json", [
        {"name": "odd", "url": upstream.url, "models": ["fake-model"]}])
    running = Running(path)
    try:
        for _ in range(2):  # (Content-Length is read after the LF: "tail" is not relayed)
            started = time.monotonic()
            status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
            assert status == 200 and doc == {} and time.monotonic() - started < 2
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 200 and doc["id"] == "lf"
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 502 and doc["error"]["code"] == "upstream_protocol_error", doc
        assert "a bare CR in its head" in doc["error"]["message"]
    finally:
        running.stop()
        upstream.close()


@pytest.mark.parametrize("control", [b"\x00", b"\x0b", b"\x1f", b"\x7f"])
def test_an_upstream_field_we_pass_on_with_a_control_character_is_refused(tmp_path, control):
    """Content-Type is passed on: a NUL (or another control) in it is a 502, before any byte
    goes to the client (before: a 500, or for a stream an error chunk with no status line)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream%s\r\n" % control
    upstream = CloseFramedUpstream([
        (None, head + b"\r\ndata: [DONE]\n\n"),
        (None, head + b"Content-Length: 2\r\n\r\n{}")])
    path = write_registry(tmp_path / "s.json", [
        {"name": "odd", "url": upstream.url, "models": ["fake-model"]}])
    running = Running(path)
    try:
        for stream in (True, False):
            status, doc = jpost(running.port, "/v1/chat/completions", dict(CHAT, stream=stream))
            assert status == 502 and doc["error"]["code"] == "upstream_protocol_error", doc
            assert "a control character in its content-type" in doc["error"]["message"]
    finally:
        running.stop()
        upstream.close()


def test_an_upstream_redirect_or_a_status_out_of_range_is_a_502(tmp_path):
    """Upstream fields are not passed on, so a redirect relayed would lack its Location: it
    is a 502 that names where it points; a status under 100 is no HTTP (nginx: 502 too)."""
    upstream = CloseFramedUpstream([
        (None, b"HTTP/1.1 302 Found\r\nLocation: https://models.example/v1/chat/completions"
               b"\r\nContent-Length: 0\r\n\r\n"),
        (None, b"HTTP/1.1 099 Weird\r\nContent-Length: 2\r\n\r\n{}"),
        (None, b"HTTP/1.1 1000 Big\r\nContent-Length: 2\r\n\r\n{}")])  # (no 1xx answer)
    path = write_registry(tmp_path / "s.json", [
        {"name": "odd", "url": upstream.url, "models": ["fake-model"]}])
    running = Running(path)
    try:
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 502 and doc["error"]["code"] == "upstream_protocol_error", doc
        assert "HTTP 302, a redirect to https://models.example/v1/chat/completions" in \
            doc["error"]["message"]
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 502 and "status line b'HTTP/1.1 099 Weird'" in doc["error"]["message"]
        status, doc = jpost(running.port, "/v1/chat/completions", CHAT)
        assert status == 502 and "status line b'HTTP/1.1 1000 Big'" in doc["error"]["message"]
    finally:
        running.stop()
        upstream.close()


def test_a_whole_stream_at_hand_at_once_ends_for_the_client_at_once(tmp_path):
    """Events and data: [DONE] in the first piece read, the upstream's end (here its close)
    later: the client's answer ends at once, head, events and end in one write."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
    upstream = CloseFramedUpstream([
        (b"text/event-stream", [event + b"data: [DONE]\n\n"] + [b""] * 15)])  # closes after 3 s
    path = write_registry(tmp_path / "s.json", [
        {"name": "old", "url": upstream.url, "models": ["fake-model"]}])
    running = Running(path)
    try:
        started = time.monotonic()
        status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
        assert time.monotonic() - started < 2.0  # before: 3 s, the upstream's close
        assert status == 200 and sse_events(raw) == [event[6:-2].decode(), "[DONE]"]
    finally:
        running.stop()
        upstream.close()


def test_close_framed_streams_failover_and_client_departures(fake, tmp_path):
    event = b'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
    upstream = CloseFramedUpstream([
        (b"text/event-stream", b""),  # closed before its first event: the next server answers
        (b"text/event-stream", [event] * 20),  # a slow stream the client walks away from
    ])
    path = write_registry(tmp_path / "s.json", [
        {"name": "old", "url": upstream.url, "models": ["fake-model"]},
        {"name": "spare", "url": fake.url, "models": ["fake-model"], "priority": 10}])
    running = Running(path)
    try:
        status, headers, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True))
        assert status == 200 and headers["x-llmhost-server"] == "spare"
        assert sse_events(raw)[-1] == "[DONE]"
        old = server_status(running.port, "old")
        assert old["consecutive_failures"] == 1, old
        body = json.dumps(dict(CHAT, stream=True)).encode()
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: left"
                      b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert b"Hello" in s.recv(65536)
        assert wait_until(lambda: logged_status(running, "left") == "499")  # it has ended
        old = server_status(running.port, "old")  # a client that left is not a failure
        assert old["errors"] == 1 and old["consecutive_failures"] == 0, old
    finally:
        running.stop()
        upstream.close()


def test_a_client_gone_before_it_queues_takes_no_place():
    async def trial():
        admission = llmhost.Admission(limit=1, queue_size=1, queue_timeout=5)
        await admission.acquire()
        conn = llmhost.Detached()
        conn.gone = True  # it left while its request waited for something else (MCP start-up)
        with pytest.raises(llmhost.ClientGone):
            await asyncio.wait_for(admission.acquire(conn), 1)
        return admission.queued()
    assert asyncio.run(trial()) == 0


def test_a_request_whose_model_goes_while_it_queues_gives_its_slot_back(tmp_path):
    first, second = FakeUpstream(), FakeUpstream(models=("other-model",))
    entries = [{"name": "first", "url": first.url, "models": ["fake-model"]},
               {"name": "second", "url": second.url, "models": ["other-model"]}]
    path = write_registry(tmp_path / "s.json", entries)
    running = Running(path, max_concurrency=1, queue_size=5)
    release = threading.Event()
    first.script({"hold": release})
    try:
        threads, results = held_requests(running.port, 1)
        assert first.holding.acquire(timeout=TIMEOUT)
        threads2, results2 = held_requests(running.port, 1, dict(CHAT, model="other-model"))
        assert wait_until(lambda: get_status(running.port)["queued"] == 1)
        write_registry(path, entries[:1])  # `remove second` while its request queues
        assert wait_until(lambda: "other-model" not in [m["id"] for m in json.loads(request(
            running.port, "GET", "/v1/models")[2])["data"]])
        release.set()
        for t in threads + threads2:
            t.join(TIMEOUT)
        assert [r[0] for r in results + results2] == [200, 404]
        # before: the slot was never given back
        assert wait_until(lambda: get_status(running.port)["in_flight"] == 0)
        assert post(running.port, "/v1/chat/completions", CHAT)[0] == 200
    finally:
        release.set()
        running.stop()
        first.close()
        second.close()


def test_bench_cut_requests_close_their_connections(fake):
    release = threading.Event()
    fake.script(*[{"hold": release}] * 3)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        code, out, err = run_cli("unused", "bench", fake.url, "--model", "fake-model", "-c", "3",
                                 "-d", "0.5", "--json")
        assert json.loads(out)["unfinished"] == 3
        release.set()  # the fake answers; sockets bench closed are closed at its end too
        assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds, 3)  # before: 3 left
    finally:                                                # open on each side
        release.set()


def test_a_client_that_leaves_the_queue_gives_up_its_place(fake, tmp_path):
    path = write_registry(tmp_path / "s.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, max_concurrency=1, queue_size=2)
    release = threading.Event()
    fake.script({"hold": release})
    body = json.dumps(CHAT).encode()
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
           % (len(body), body))
    try:
        threads, results = held_requests(running.port, 1)
        assert fake.holding.acquire(timeout=TIMEOUT)  # the one slot is taken
        quitters = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(2)]
        for s in quitters:
            s.sendall(raw)
        assert wait_until(lambda: get_status(running.port)["queued"] == 2)
        for s in quitters:
            s.close()  # they give up, as a client with a short timeout does
        # before: their places stayed taken
        assert wait_until(lambda: get_status(running.port)["queued"] == 0, 2)
        threads2, results2 = held_requests(running.port, 2)  # so these queue, not 429
        assert wait_until(lambda: get_status(running.port)["queued"] == 2)
        release.set()
        for t in threads + threads2:
            t.join(TIMEOUT)
        assert [r[0] for r in results + results2] == [200, 200, 200]
        assert len(fake.posts()) == 3  # the requests of clients that left never went upstream
    finally:
        release.set()
        running.stop()


def test_a_model_at_its_servers_limit_does_not_hold_up_other_models(tmp_path):
    local, other = FakeUpstream(), FakeUpstream(models=("other-model",))
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": local.url, "models": ["fake-model"], "max_concurrency": 1},
        {"name": "other", "url": other.url, "models": ["other-model"]}])
    running = Running(path, max_concurrency=2, queue_size=10)
    release = threading.Event()
    local.script({"hold": release})
    try:
        threads, results = held_requests(running.port, 1)
        assert local.holding.acquire(timeout=TIMEOUT)  # local is at its max_concurrency
        threads2, results2 = held_requests(running.port, 3)  # these wait for local
        assert wait_until(lambda: get_status(running.port)["queued"] == 3)
        # before: two of them held both global slots, so other-model waited behind them
        status, doc = jpost(running.port, "/v1/chat/completions",
                            dict(CHAT, model="other-model"), timeout=2)
        assert status == 200 and results2 == []
        release.set()
        for t in threads + threads2:
            t.join(TIMEOUT)
        assert [r[0] for r in results + results2] == [200] * 4
    finally:
        release.set()
        running.stop()
        local.close()
        other.close()


def test_queue_timeout_bounds_the_whole_wait_not_each_queue(tmp_path):
    """A request that waits for its model's server, then (the global slot it was freed for
    having gone to another request) for a global slot, is refused when --queue-timeout has
    passed since it arrived: the two waits do not each get the whole timeout."""
    local, other = FakeUpstream(), FakeUpstream(models=("other-model",))
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": local.url, "models": ["fake-model"], "max_concurrency": 1},
        {"name": "other", "url": other.url, "models": ["other-model"]}])
    running = Running(path, max_concurrency=2, queue_size=10, queue_timeout=1.0)
    first, others = threading.Event(), threading.Event()
    local.script({"hold": first})
    other.script({"hold": others}, {"hold": others})
    try:
        threads, results = held_requests(running.port, 1)  # holds local (and a global slot)
        assert local.holding.acquire(timeout=TIMEOUT)
        threads += held_requests(running.port, 1, dict(CHAT, model="other-model"))[0]
        assert other.holding.acquire(timeout=TIMEOUT)  # both global slots are taken now
        started = time.monotonic()
        waiting, result = held_requests(running.port, 1)  # waits for local's capacity
        assert wait_until(lambda: get_status(running.port)["queued"] == 1)
        queued = held_requests(running.port, 1, dict(CHAT, model="other-model"))[0]
        # ... which queues for a global slot
        assert wait_until(lambda: get_status(running.port)["queued"] == 2)
        # Pacing, not waiting: local stays busy 0.6 s of the 1.0 s queue timeout
        time.sleep(max(0.0, started + 0.6 - time.monotonic()))
        first.set()  # local is free, but its global slot passes to the queued request
        for t in waiting:
            t.join(TIMEOUT)
        waited = time.monotonic() - started
        assert result[0][0] == 429
        assert waited < 1.45  # before: 0.6 s for local, then a whole 1.0 s more in the queue
    finally:
        first.set()
        others.set()
        for t in threads + queued:
            t.join(TIMEOUT)
        running.stop()
        local.close()
        other.close()


def test_queue_timeout_bounds_an_mcp_chats_wait_too(tmp_path):
    """A chat with MCP tools waits as a plain one does: for its model's server first (holding
    no global slot), and --queue-timeout in all; before, it took a global slot as one came
    free (within the timeout), then waited a whole timeout more for its server, holding it."""
    local, other = FakeUpstream(), FakeUpstream(models=("other-model",))
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": local.url, "models": ["fake-model"], "max_concurrency": 1,
         "mcp": ["t"]},
        {"name": "other", "url": other.url, "models": ["other-model"]}],
        mcp={"t": MCP_STDIO})
    running = Running(path, max_concurrency=2, queue_size=10, queue_timeout=1.0)
    first, others = threading.Event(), threading.Event()
    local.script({"hold": first})
    other.script({"hold": others})
    try:
        threads, results = held_requests(running.port, 1)  # an MCP chat holding local
        assert local.holding.acquire(timeout=TIMEOUT)  # (its MCP server is up by now)
        threads += held_requests(running.port, 1, dict(CHAT, model="other-model"))[0]
        assert other.holding.acquire(timeout=TIMEOUT)  # both global slots are taken now
        started = time.monotonic()
        waiting, result = held_requests(running.port, 1)
        assert wait_until(lambda: get_status(running.port)["queued"] == 1)  # waits for local
        # Pacing, not waiting: a global slot comes free 0.6 s into the 1.0 s queue timeout
        time.sleep(max(0.0, started + 0.6 - time.monotonic()))
        others.set()  # a global slot is free; local is still busy
        for t in waiting:
            t.join(TIMEOUT)
        waited = time.monotonic() - started
        assert result[0][0] == 429, result
        assert b"every server for 'fake-model' is at its max_concurrency" in result[0][2]
        assert waited < 1.45  # before: 1.6 s (0.6 s for a slot, then 1.0 s for local)
    finally:
        first.set()
        others.set()
        for t in threads:
            t.join(TIMEOUT)
        running.stop(timeout=5)
        local.close()
        other.close()


def test_server_max_concurrency_queues_then_uses_fallback(tmp_path):
    local, remote = FakeUpstream(), FakeUpstream()
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": local.url, "models": ["fake-model"], "max_concurrency": 1},
        {"name": "remote", "url": remote.url, "models": ["fake-model"], "priority": 10,
         "max_concurrency": 1}])
    running = Running(path)
    release = threading.Event()
    local.script({"hold": release})
    remote.script({"hold": release})
    try:
        threads, results = held_requests(running.port, 1)
        assert local.holding.acquire(timeout=TIMEOUT)  # local is full now
        threads2, results2 = held_requests(running.port, 1)
        assert remote.holding.acquire(timeout=TIMEOUT)  # so the fallback takes the second
        threads3, results3 = held_requests(running.port, 1)  # both full: this one waits
        assert wait_until(lambda: get_status(running.port)["queued"] == 1)
        assert results3 == [] and len(local.posts()) + len(remote.posts()) == 2
        release.set()
        for t in threads + threads2 + threads3:
            t.join(TIMEOUT)
        assert [r[0] for r in results + results2 + results3] == [200, 200, 200]
    finally:
        release.set()
        running.stop()
        local.close()
        remote.close()


class StreamWatcher(FakeUpstream):
    """An upstream whose paced stream notes when its client (llmhost) went away."""


def test_a_stream_ends_for_the_client_at_done_and_its_upstream_connection_is_kept(fake, tmp_path):
    """The openai client closes its connection as soon as it reads data: [DONE]: the end of the
    chunked body goes out with [DONE], and the upstream's own end, read after it, keeps that
    connection pooled; a client that leaves once it has it all is no 499 in the log."""
    path = write_registry(tmp_path / "s.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    log = io.StringIO()
    running = Running(path, access_log=llmhost.AccessLog(log))
    end = threading.Event()
    fake.script({"hold_end": end})
    try:
        try:  # the client's body ends while the upstream's is held (before: a timeout here)
            status, _, raw = post(running.port, "/v1/chat/completions", dict(CHAT, stream=True),
                                  timeout=3)
        finally:  # (and the client has closed its connection)
            end.set()
        assert status == 200 and sse_events(raw)[-1] == "[DONE]"
        assert wait_until(lambda: sum(map(len, running.gateway.client.idle.values())) == 1)
        assert post(running.port, "/v1/chat/completions", CHAT)[0] == 200
        first, second = fake.posts()
        assert first["peer"] == second["peer"]  # one upstream connection for both
        assert wait_until(lambda: log.getvalue().count("\n") == 2)
        assert [line.split(" status=")[1][:3] for line in log.getvalue().splitlines()] == \
            ["200", "200"]
    finally:
        running.stop()


def test_the_next_request_on_a_connection_does_not_wait_for_an_upstream_end(fake, tmp_path):
    """A client that reads a stream to its end and sends its next request on the same
    connection is answered at once, while the upstream's end after data: [DONE] is still
    awaited in the background (before: the handler waited for it, up to a second)."""
    path = write_registry(tmp_path / "s.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path)
    end = threading.Event()
    fake.script({"hold_end": end})
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as s:
            def ask(body):
                data = json.dumps(body).encode()
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            ask(dict(CHAT, stream=True))
            received = b""
            while not received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
                received += s.recv(65536)
            started = time.monotonic()
            ask(CHAT)
            received = b""
            while b'"choices"' not in received:
                received += s.recv(65536)
            assert time.monotonic() - started < 0.5 and received.startswith(b"HTTP/1.1 200")
            assert not end.is_set()
        end.set()  # the held end arrives: that upstream connection goes back to the pool
        assert wait_until(lambda: sum(map(len, running.gateway.client.idle.values())) == 2)
        assert not running.gateway.client.draining
    finally:
        end.set()
        running.stop()


def test_client_disconnect_reaches_upstream_within_a_second(gateway, fake):
    long_text = " ".join(["word"] * 200)
    fake.script({"pace": 0.02})  # (4 s of stream)
    body = json.dumps({"model": "fake-model", "stream": True,
                       "messages": [{"role": "user", "content": long_text}]}).encode()
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: left\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200 OK" in s.recv(4096)
    s.close()
    # the upstream sees its connection closed (not pooled, not read to its end): the model
    # stops generating
    assert fake.cut.wait(1.0)
    assert wait_until(lambda: logged_status(gateway, "left") == "499", 1.0)  # and it ended
    doc = get_status(gateway.port)
    assert doc["in_flight"] == 0 and doc["servers"][0]["in_flight"] == 0


def test_url_credentials_refused_for_llm_servers_kept_for_mcp():
    assert "credentials in a URL" in llmhost.valid_url("http://u:pw@127.0.0.1:8080/v1")
    assert llmhost.valid_url("http://u:pw@127.0.0.1:3001/mcp", credentials=True) is None
    assert llmhost.validate_mcp_entry("docs", {"url": "http://u:pw@127.0.0.1:3001/mcp"}) == []


@pytest.mark.parametrize("text, shown", [
    ("http://u:pw@127.0.0.1:3001/mcp", "http://u:***@127.0.0.1:3001/mcp"),
    ("http://u:p@ss@h:1/v1", "http://u:***@h:1/v1"),  # (urlsplit reads the last '@')
    ("https://u:pw@h?q=a@b", "https://u:***@h?q=a@b"),
    ("for url 'http://u:pw@h/sse'\nsee https://x:y@z/",
     "for url 'http://u:***@h/sse'\nsee https://x:***@z/"),
    ("http://user@h/v1", "http://user@h/v1"),  # (a user name alone)
    ("http://h/a@b:c", "http://h/a@b:c"),
])
def test_hide_password_in_urls_and_messages(text, shown):
    assert llmhost.hide_password(text) == shown


def test_registry_through_a_symlink_stays_a_link(fake, tmp_path):
    real = tmp_path / "real" / "servers.json"
    real.parent.mkdir()
    write_registry(real, [])
    link = tmp_path / "servers.json"
    link.symlink_to(real)
    assert run_cli(str(link), "add", "local", fake.url)[0] == 0
    assert link.is_symlink()
    assert [e["name"] for e in llmhost.load_registry(str(real))["servers"]] == ["local"]


def test_registry_file_problems_are_messages(tmp_path):
    path = tmp_path / "servers.json"
    path.write_text('{"version": 1, "servers": [{"name": "a", "url": "http://h/v1", '
                    '"models": ["m"]}], "servers": [], "mcpServers": {}}')
    code, _, err = run_cli(str(path), "list")
    assert code == 1 and "'servers' appears twice" in err  # saving would drop server a
    missing = str(tmp_path / "missing" / "s.json")
    code, _, err = run_cli(missing, "add", "x", "http://127.0.0.1:1/v1", "--no-check")
    assert code == 1 and "Traceback" not in err  # the registry is named, not its lock file
    assert f"cannot write {missing}: the folder" in err and ".lock" not in err


def test_live_registry_add_and_remove(fake, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(llmhost, "WATCH_INTERVAL", llmhost.TICK)  # (each sweep, not second)
    path = write_registry(tmp_path / "s.json", [])
    running = Running(path)

    def model_ids():
        return [m["id"] for m in json.loads(request(running.port, "GET", "/v1/models")[2])["data"]]

    def wait_for(expected):
        wait_until(lambda: model_ids() == expected, 3.0)  # (a few watches, on a busy box)
        return model_ids()

    def kept(why):  # the watch saw the edit, and said why it kept the last good registry
        return any("registry not reloaded, keeping the last good one" in r.getMessage() and
                   why in r.getMessage() for r in caplog.records)

    try:
        assert model_ids() == []
        assert run_cli(path, "add", "local", fake.url)[0] == 0
        assert wait_for(["fake-model"]) == ["fake-model"]
        assert post(running.port, "/v1/chat/completions", CHAT)[0] == 200
        with open(path, "w") as f:
            f.write("{ broken")  # a broken edit keeps the last good registry
        assert wait_until(lambda: kept("not valid JSON"))
        assert model_ids() == ["fake-model"]
        os.unlink(path)  # so does a deleted file
        assert wait_until(lambda: kept("is gone"))
        assert model_ids() == ["fake-model"]
        write_registry(path, [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
        assert run_cli(path, "remove", "local")[0] == 0
        assert wait_for([]) == []
    finally:
        running.stop()


def test_status_endpoint_and_command(pool):
    running, fakes = pool
    fakes[0].close()
    post(running.port, "/v1/chat/completions", CHAT)
    status, _, raw = request(running.port, "GET", "/v1/status")
    doc = json.loads(raw)
    servers = {s["name"]: s for s in doc["servers"]}
    assert servers["u0"]["errors"] == 1 and "cannot connect" in servers["u0"]["last_error"]
    assert servers["u1"]["requests"] == 1 and doc["max_concurrency"] == 50
    code, out, err = run_cli("unused", "status", "--url", f"http://127.0.0.1:{running.port}")
    assert code == 0 and "u0" in out and "cannot connect" in out


def scrape(port, **kw):
    """GET /metrics, read as Prometheus reads the text format 0.0.4 -> (types {family: type},
    samples {(name, frozenset of label pairs): value}); every line is checked on the way."""
    status, headers, raw = request(port, "GET", "/metrics", **kw)
    assert status == 200, raw
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = raw.decode()
    assert text.endswith("\n")
    types, helps, samples = {}, set(), {}
    sample = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)')
    pair = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helps and name not in types  # HELP before TYPE, once
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name in helps and name not in types
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
        else:
            m = sample.fullmatch(line)
            assert m, line
            name, body, value = m.groups()
            labels = pair.findall(body) if body else []
            assert ",".join('%s="%s"' % p for p in labels) == (body or ""), line
            family = name if name in types else re.sub("_(bucket|sum|count)$", "", name)
            assert family in types, line  # a sample follows its family's TYPE
            if family != name:
                assert types[family] == "histogram"
            if types[family] == "counter":
                assert name.endswith("_total")
            key = (name, frozenset(labels))
            assert key not in samples, line  # no series twice
            samples[key] = float(value)
    return types, samples


def series(samples, name, **labels):
    """The value of one series (its label set exactly), or None."""
    return samples.get((name, frozenset(labels.items())))


def test_metrics_count_requests_by_route_model_status_with_durations_and_tokens(gateway):
    for _ in range(3):
        assert post(gateway.port, "/v1/chat/completions", CHAT)[0] == 200
    assert post(gateway.port, "/v1/chat/completions", dict(CHAT, model="free\ntext"))[0] == 404
    assert request(gateway.port, "GET", "/v1/models")[0] == 200
    assert request(gateway.port, "GET", "/models")[0] == 200  # the same route
    assert request(gateway.port, "GET", "/any/thing?x")[0] == 404
    assert post(gateway.port, "/v1/chat/completions", dict(CHAT, stream=True))[0] == 200
    assert post(gateway.port, "/v1/chat/completions", dict(  # (its usage chunk: counted)
        CHAT, stream=True, stream_options={"include_usage": True}))[0] == 200
    types, samples = scrape(gateway.port)
    chat = "/v1/chat/completions"
    assert types["llmhost_requests_total"] == "counter"
    assert series(samples, "llmhost_requests_total", route=chat, model="fake-model",
                  status="200") == 5
    assert series(samples, "llmhost_requests_total", route=chat, model="unknown",
                  status="404") == 1  # the client's text is no label
    assert series(samples, "llmhost_requests_total", route="/v1/models", model="",
                  status="200") == 2
    assert series(samples, "llmhost_requests_total", route="other", model="",
                  status="404") == 1
    assert not any("free" in v for _, labels in samples for _, v in labels)
    # the duration histogram: cumulative buckets ending in +Inf = count, a sum of seconds
    assert types["llmhost_request_duration_seconds"] == "histogram"
    labels = dict(route=chat, model="fake-model")
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in samples.items()
                     if k[0] == "llmhost_request_duration_seconds_bucket" and
                     k[1] - {("le", dict(k[1])["le"])} == frozenset(labels.items()))
    assert len(buckets) == len(llmhost.DURATION_BUCKETS) + 1 and buckets[-1][0] == float("inf")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][1] == 5
    assert series(samples, "llmhost_request_duration_seconds_count", **labels) == 5
    assert 0 < series(samples, "llmhost_request_duration_seconds_sum", **labels) < 5 * TIMEOUT
    # the fake's usage (7 prompt, 3 completion) summed over the three answers and both
    # streams (llmhost asked the one whose client did not ask for its usage)
    assert series(samples, "llmhost_tokens_total", model="fake-model", kind="prompt") == 35
    assert series(samples, "llmhost_tokens_total", model="fake-model", kind="completion") == 15
    assert series(samples, "llmhost_upstream_attempts_total", server="local") == 5
    assert types["llmhost_stream_first_byte_seconds"] == "histogram"
    assert series(samples, "llmhost_stream_first_byte_seconds_count", route=chat,
                  model="fake-model") == 2  # the streams only
    assert series(samples, "llmhost_in_flight_requests") == 0
    assert series(samples, "llmhost_refused_requests_total") == 0
    info = [dict(k[1]) for k in samples if k[0] == "llmhost_build_info"]
    assert info == [{"version": llmhost.__version__, "python": platform.python_version()}]
    # the process collector's names, with this process's figures
    assert series(samples, "process_resident_memory_bytes") > 1e6
    assert series(samples, "process_open_fds") > 3 and types["process_open_fds"] == "gauge"
    assert series(samples, "process_cpu_seconds_total") > 0
    assert abs(series(samples, "process_start_time_seconds") - time.time()) < 3600
    _, again = scrape(gateway.port)  # the scrape itself is counted, once it has answered
    assert series(again, "llmhost_requests_total", route="/metrics", model="",
                  status="200") == 1


def test_metrics_count_failed_attempts_by_kind_cooldowns_and_cooling_servers(pool):
    running, fakes = pool
    fakes[0].close()  # connection refused: u1 answers each time
    fakes[1].script({"status": 503})
    for _ in range(llmhost.FAILURES_BEFORE_COOLDOWN):
        assert post(running.port, "/v1/chat/completions", CHAT)[0] == 200
    _, samples = scrape(running.port)
    n = llmhost.FAILURES_BEFORE_COOLDOWN
    assert series(samples, "llmhost_upstream_failures_total", server="u0",
                  kind="upstream_unreachable") == n
    assert series(samples, "llmhost_upstream_failures_total", server="u1", kind="http_5xx") == 1
    assert series(samples, "llmhost_upstream_attempts_total", server="u0") == n
    assert series(samples, "llmhost_upstream_attempts_total", server="u2") == 1
    assert series(samples, "llmhost_upstream_cooldowns_total", server="u0") == 1
    assert series(samples, "llmhost_upstream_cooling", server="u0") == 1
    assert series(samples, "llmhost_upstream_cooling", server="u1") == 0
    assert series(samples, "llmhost_requests_total", route="/v1/chat/completions",
                  model="fake-model", status="200") == n


def test_metrics_are_behind_the_api_key_unless_made_public(fake, tmp_path):
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    for public in (False, True):
        running = Running(path, api_keys=["k1"], metrics_public=public)
        try:
            assert request(running.port, "GET", "/metrics")[0] == (200 if public else 401)
            scrape(running.port, headers={"Authorization": "Bearer k1"})
            assert request(running.port, "GET", "/v1/models")[0] == 401  # the rest keeps it
        finally:
            running.stop()


def test_metrics_of_workers_are_totals_whichever_worker_answers(fake, tmp_path):
    registry = write_registry(tmp_path / "servers.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    def shared_dirs():
        return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("llmhost-metrics-")}
    before = shared_dirs()
    proc, port = start_serve(registry, "--workers", "2", "--no-access-log")
    try:
        for _ in range(12):  # a connection each: the kernel spreads them over both workers
            assert post(port, "/v1/chat/completions", CHAT)[0] == 200
        time.sleep(llmhost.METRICS_PUBLISH_INTERVAL + 0.5)  # each has published its figures
        for _ in range(8):
            _, samples = scrape(port)
            assert series(samples, "llmhost_requests_total", route="/v1/chat/completions",
                          model="fake-model", status="200") == 12
            assert series(samples, "llmhost_tokens_total", model="fake-model",
                          kind="prompt") == 12 * 7
            assert series(samples, "llmhost_upstream_attempts_total", server="local") == 12
            assert series(samples, "llmhost_in_flight_requests") == 0
            assert series(samples, "process_open_fds") > 6  # both workers' (and not serve's)
        ours = shared_dirs() - before
        assert len(ours) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    assert not shared_dirs() & ours  # serve removes it


def test_metrics_label_values_are_escaped_and_histogram_buckets_are_cumulative():
    assert llmhost.prometheus_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    hist = llmhost.Histogram()
    for value in (0.001, 0.005, 0.2, 1e6):
        hist.observe(value)
    lines = hist.lines("x", 'a="1"')
    assert lines[0] == 'x_bucket{a="1",le="0.005"} 2'  # le is "less than or equal"
    assert 'x_bucket{a="1",le="0.25"} 3' in lines and 'x_bucket{a="1",le="+Inf"} 4' in lines
    assert lines[-1] == 'x_count{a="1"} 4' and lines[-2].startswith('x_sum{a="1"} 1000000.2')


def start_serve(registry, *extra, env=None, python=()):
    """`python3 llmhost.py serve` as a user runs it; -> (process, port)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, *python, LLMHOST_PY,
                             "--registry", registry, "serve", "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    proc.kill()
    raise AssertionError("serve did not start: " + proc.communicate()[1])


class PtyChat:
    """`python3 llmhost.py ARGV` on a pseudo-terminal, as a user at a console runs it."""

    def __init__(self, *argv, home):
        import pty
        pid, fd = pty.fork()
        if pid == 0:  # (the child: a session of its own, the terminal its controlling one)
            try:
                os.execve(sys.executable, [sys.executable, LLMHOST_PY, *argv],
                          dict(os.environ, TERM="dumb", HOME=str(home)))
            finally:
                os._exit(127)
        self.pid, self.fd, self.out, self.mark, self.status = pid, fd, b"", 0, None

    def read_some(self, deadline):
        import select
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the child has closed the terminal
                data = b""
            if not data:
                return False
            self.out += data
        return True

    def expect(self, text, timeout=TIMEOUT * 2):
        """Wait until `text` appears in what the program wrote since the last expect."""
        deadline = time.monotonic() + timeout
        needle = text.encode()
        while needle not in self.out[self.mark:]:
            if time.monotonic() > deadline or not self.read_some(deadline):
                raise AssertionError(f"{text!r} not seen in {self.out[self.mark:]!r}")
        self.mark = self.out.index(needle, self.mark) + len(needle)
        return self.out.decode("utf-8", "replace")

    def send(self, line):
        os.write(self.fd, line.encode() + b"\r")

    def wait(self, timeout=TIMEOUT * 2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            self.read_some(min(deadline, time.monotonic() + 0.1))
        raise AssertionError("chat did not exit: " + self.out.decode("utf-8", "replace"))

    def close(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def test_chat_console_streams_shows_tools_sends_images_stops_and_saves(fake, tmp_path):
    path = write_registry(tmp_path / "servers.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]},
        {"name": "agent", "url": fake.url, "models": ["fake-model"], "alias": "agent",
         "mcp": ["t"]}], mcp={"t": MCP_STDIO})
    proc, port = start_serve(path, "--no-discover")
    chat = PtyChat("--registry", path, "chat", "fake-model", home=tmp_path)
    try:
        chat.expect(f"chatting with fake-model via http://127.0.0.1:{port}")  # serve's record
        # streamed text shows while the answer is under way (the upstream holds the rest)
        stall = threading.Event()
        fake.script({"stall_after": 2, "stall": stall})
        chat.send("one two three")
        chat.expect("echo: one")
        assert "tokens/s" not in chat.out.decode()
        stall.set()  # the upstream then dies mid-answer: one line, and the session goes on
        chat.expect("error: ")
        # /image: a data URL the upstream receives byte for byte
        image = tmp_path / "dot.png"
        image.write_bytes(bytes(range(256)) * 3)
        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        chat.send(f"/image {image}")
        chat.expect("attached to your next message")
        chat.send("look")
        chat.expect("echo: look [1 images]")
        chat.expect("tokens/s")
        last = json.loads(fake.posts()[-1]["body"])["messages"][-1]
        assert last["content"][1] == {"type": "image_url", "image_url": {"url": url}}
        assert url.encode() in fake.posts()[-1]["body"]
        # an MCP tool call is shown as it runs; its result reaches the model
        chat.send("/model agent")
        chat.send("/tools")
        chat.expect("t__echo  Echo text back.")
        fake.script({"calls": [("t__echo", {"text": "hi"})]})
        chat.send("go")
        chat.expect('↳ t__echo {"text": "hi"}')
        chat.expect("tool result: hi")
        assert json.loads(fake.posts()[-1]["body"])["messages"][-1] == {
            "role": "tool", "tool_call_id": "call_0", "content": "hi"}
        # Ctrl-C stops a slow answer: the upstream sees the disconnect; the session goes on
        chat.send("/model fake-model")
        chat.send("/tools")
        chat.expect("no MCP tools are attached to fake-model")
        fake.cut.clear()
        fake.script({"pace": 0.2})
        chat.send("slow " + " ".join(f"w{i}" for i in range(100)))
        chat.expect("echo: slow w0")
        answer_from = chat.mark
        os.write(chat.fd, b"\x03")
        chat.expect("[stopped]")
        assert fake.cut.wait(TIMEOUT)
        assert b"w99" not in chat.out[answer_from:]
        chat.send("/system be brief")
        saved = tmp_path / "talk.json"
        chat.send(f"/save {saved}")
        chat.expect("saved 6 messages")
        chat.send("/exit")
        assert chat.wait() == 0
    finally:
        chat.close()
    messages = json.loads(saved.read_text())
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 3
    assert messages[2]["content"] == "echo: look [1 images]"
    # --load goes on with it: the upstream gets the conversation back
    assert "/image " in (tmp_path / ".llmhost_history").read_text()  # readline's history
    chat = PtyChat("--registry", path, "chat", "fake-model", "--load", str(saved), home=tmp_path)
    try:
        chat.expect("loaded 6 messages")
        chat.send("again")
        chat.expect("echo: again")
        body = json.loads(fake.posts()[-1]["body"])
        assert body["messages"][0] == {"role": "system", "content": "be brief"}
        assert body["messages"][1]["content"][1] == {"type": "image_url",
                                                     "image_url": {"url": url}}
        assert [m["content"] for m in body["messages"][2:5]] == [
            "echo: look [1 images]", "go", "tool result: hi"]
        chat.expect("tokens/s")
        chat.expect("> ")  # (at the prompt: a Ctrl-D typed ahead of it is no end of input)
        os.write(chat.fd, b"\x04")  # Ctrl-D leaves
        assert chat.wait() == 0
    finally:
        chat.close()
        proc.terminate()
        proc.communicate(timeout=TIMEOUT * 2)


def test_chat_reads_multi_line_messages_by_backslash_or_triple_quotes():
    session = llmhost.ChatSession(None, "m", io.StringIO())

    def reader(*lines):
        it = iter(lines)
        return lambda prompt: next(it)

    assert session.read_message(reader("one \\", "two")) == "one \ntwo"
    assert session.read_message(reader('"""', "a", "", "b", '"""')) == "a\n\nb"
    assert session.read_message(reader('"""first', 'last"""')) == "first\nlast"
    assert session.read_message(reader('"""inline"""')) == "inline"
    assert session.read_message(reader("plain")) == "plain"


def test_chat_in_a_pipe_prints_only_the_answer_or_exits_1(fake, tmp_path):
    path = write_registry(tmp_path / "servers.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])

    def chat(*argv, text="hello there"):  # no serve runs: llmhost in-process, on no port
        return subprocess.run([sys.executable, "-I", "-S", os.path.join(HERE, "llmhost.py"),
                               "--registry", path, "chat", *argv], input=text,
                              capture_output=True, text=True, timeout=TIMEOUT * 2)

    fake.script({"reasoning": "let me think"})
    done = chat()  # the only model
    assert (done.stdout, done.stderr, done.returncode) == ("echo: hello there\n", "", 0)
    done = chat("fake-model", "--json")
    assert json.loads(done.stdout)["output"][-1]["content"][0]["text"] == "echo: hello there"
    done = chat("nope")
    assert (done.stdout, done.returncode) == ("", 1)
    assert done.stderr == ("llmhost: error: HTTP 404: The model 'nope' does not exist. Known "
                           "models: fake-model.\n")
    fake.script({"drop_after": 1})
    done = chat("fake-model")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert not any(p["path"].endswith("/responses") for p in fake.requests)
    done = chat("fake-model", "--url", f"http://127.0.0.1:{llmhost.free_port()}")  # no serve there
    assert (done.stdout, done.returncode) == ("", 1)
    assert done.stderr.startswith("llmhost: error: http://127.0.0.1:") and \
        done.stderr.count("\n") == 1, done.stderr


def test_access_log_lines_are_written_at_flush_and_cannot_be_forged():
    out = io.StringIO()
    log = llmhost.AccessLog(out)
    request = llmhost.Request("POST", "/v1/chat/completions", "1.1", {})
    request.started, request.request_id = 10.0, "r-1"
    log.add(request, 200, "m", "s", 10.25)
    assert out.getvalue() == ""  # nothing is formatted or written per request
    log.add(request, 404, "x\n2026-01-01 00:00:00 INFO forged\r", None, 10.5)
    for forged in ("a\u2028b", "a\x0bb", "\x1b[2Kc", "d server=x", 'e"f\\'):
        log.add(request, 404, forged, None, 10.5)  # other line breaks, escapes, a fake field
    log.flush()
    text = out.getvalue()
    assert text.count("\n") == 7 and "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 7
    assert lines[0].endswith(" INFO POST /v1/chat/completions model=m server=s status=200 "
                             "250.0ms id=r-1")  # (a batch that needed escapes: the rest as is)
    assert ' model="x\\n2026-01-01 00:00:00 INFO forged\\r" server=- status=404 500.0ms' \
        in lines[1]
    assert [line.split(" model=")[1].split(" server=-")[0] for line in lines[2:]] == [
        '"a\\u2028b"', '"a\\x0bb"', '"\\x1b[2Kc"', '"d server=x"', '"e\\"f\\\\"']
    log.add(request, 404, "y" * 5_000_000, None, 10.5)  # a client's 5 MB "model"
    log.flush()
    assert out.getvalue().splitlines()[-1].split(" model=")[1].startswith(
        '"%s"... server=-' % ("y" * llmhost.LOG_MODEL_CHARS))  # cut, and not kept after
    assert max(map(len, log.shown), default=0) <= llmhost.LOG_MODEL_CHARS


def test_access_log_json_lines_are_usage_records_without_keys(fake, tmp_path):
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    out = io.StringIO()
    running = Running(path, api_keys=["sk-secret-1"], key_labels={"sk-secret-2": "team-b"},
                      access_log=llmhost.AccessLog(out, json_lines=True))
    key = {"Authorization": "Bearer sk-secret-1", "X-Request-Id": "r-1"}
    try:
        assert post(running.port, "/chat/completions", CHAT, headers=key)[0] == 200
        assert post(running.port, "/v1/chat/completions", dict(CHAT, model='x\n"y'),
                    headers={"X-Api-Key": "sk-secret-2", "X-Request-Id": "r-2"})[0] == 404
        assert request(running.port, "GET", "/v1/models",
                       headers={"Authorization": "Bearer wrong", "X-Request-Id": "r-3"})[0] == 401
        assert post(running.port, "/v1/chat/completions", dict(CHAT, stream=True),
                    headers=dict(key, **{"X-Request-Id": "r-4"}))[0] == 200
        assert wait_until(lambda: out.getvalue().count("\n") == 4)
    finally:
        running.stop()
    text = out.getvalue()
    assert "sk-secret" not in text and "wrong" not in text and "hello there" not in text
    docs = {d["id"]: d for d in map(json.loads, text.splitlines())}  # one object a line
    ok = docs["r-1"]
    assert ok["route"] == "/v1/chat/completions" and ok["path"] == "/chat/completions"
    assert ok["model"] == "fake-model" and ok["server"] == "local" and ok["status"] == 200
    assert ok["prompt_tokens"] == 7 and ok["completion_tokens"] == 3
    assert 0 < ok["duration_ms"] < TIMEOUT * 1000 and ok["method"] == "POST"
    assert docs["r-2"]["model"] == 'x\n"y' and docs["r-2"]["status"] == 404
    assert "prompt_tokens" not in docs["r-2"] and docs["r-2"]["server"] is None
    assert docs["r-2"]["key"] == "team-b" and "key" not in ok  # a key without a label: none
    assert docs["r-3"]["status"] == 401 and docs["r-3"]["model"] is None
    assert 0 < docs["r-4"]["first_byte_ms"] <= docs["r-4"]["duration_ms"]
    assert "first_byte_ms" not in ok


def test_api_keys_file_gives_labels_and_must_be_private(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nteam-a sk-aaa\n\n  ci@host  sk-bbb  \n")
    path.chmod(0o600)
    assert llmhost.read_api_keys_file(str(path)) == {"sk-aaa": "team-a", "sk-bbb": "ci@host"}
    path.chmod(0o640)
    with pytest.raises(ValueError, match="readable by others.*chmod 600"):
        llmhost.read_api_keys_file(str(path))
    for text, needle in (("sk-only\n", ":1: expected 'LABEL KEY'"),
                         ("a b\nbad label! k\n", ":2: expected"),
                         ("a sk-x\nb sk-x\n", ":2: this key is also on a line labelled 'a'"),
                         ("# none\n", "holds no key")):
        path.write_text(text)
        path.chmod(0o600)
        with pytest.raises(ValueError, match=needle) as info:
            llmhost.read_api_keys_file(str(path))
        assert "sk-x" not in str(info.value)  # a key is never quoted
    code, out, err = run_cli(str(tmp_path / "s.json"), "serve", "--api-keys-file",
                             str(tmp_path / "missing"))
    assert code != 0 and "--api-keys-file: cannot read" in err


def test_user_session_subprocess(fake, tmp_path):
    """add / list / serve / request / remove / SIGTERM as typed in a shell."""
    registry = str(tmp_path / "servers.json")
    cli = [sys.executable, LLMHOST_PY]
    env = dict(os.environ, LLMHOST_REGISTRY=registry)
    assert subprocess.run(cli + ["add", "local", fake.url], env=env, timeout=TIMEOUT,
                          capture_output=True).returncode == 0
    out = subprocess.run(cli + ["list", "--json"], env=env, capture_output=True, text=True,
                         timeout=TIMEOUT).stdout
    assert json.loads(out)[0]["models"] == ["fake-model"]
    proc, port = start_serve(registry)
    try:
        status, doc = jpost(port, "/v1/chat/completions", CHAT)
        assert status == 200 and doc["choices"][0]["message"]["content"] == "echo: hello there"
        assert jpost(port, "/v1/chat/completions", dict(CHAT, model="nope"))[0] == 404
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    assert "POST /v1/chat/completions model=nope server=- status=404" in err
    assert "serving on http://127.0.0.1:%d (auth off)" % port in err
    assert "POST /v1/chat/completions model=fake-model server=local status=200" in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_status_finds_the_serve_of_its_registry_by_the_record_beside_it(fake, tmp_path,
                                                                        workers):
    registry = write_registry(tmp_path / "servers.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    record = registry + ".serve"
    cli = [sys.executable, LLMHOST_PY, "--registry", registry, "status"]
    env = {k: v for k, v in os.environ.items() if k != "LLMHOST_API_KEY"}
    proc, port = start_serve(registry, "--workers", workers)  # a free port, not 4000
    try:
        assert wait_until(lambda: os.path.exists(record))
        doc = json.load(open(record))
        assert doc["pid"] == proc.pid and doc["port"] == port
        assert doc["url"] == f"http://127.0.0.1:{port}" and doc["registry"] == registry
        assert os.stat(record).st_mode & 0o777 == 0o644 and "started_at" in doc
        result = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert re.search(r"^local +ok ", result.stdout, re.M), result.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0 and not os.path.exists(record)
    result = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert result.returncode == 1
    assert f"no serve of {registry} is running (no record at {record}); start one or pass " \
        "--url" in result.stderr
    with open(record, "w") as f:  # left by a serve that was killed: its pid has exited
        json.dump(dict(doc, pid=proc.pid), f)
    result = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert result.returncode == 1
    assert f"its record {record} names pid {proc.pid}, which has exited" in result.stderr


def test_sigterm_lets_a_stream_finish(fake, tmp_path):
    registry = write_registry(tmp_path / "s.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    proc, port = start_serve(registry, "--shutdown-timeout", "10")
    try:
        fake.script({"pace": 0.1})
        body = json.dumps(dict(CHAT, stream=True, messages=[
            {"role": "user", "content": "one two three four five six seven eight"}])).encode()
        s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = s.recv(65536)
        assert b"200 OK" in received
        proc.send_signal(15)
        while True:
            data = s.recv(65536)
            if not data:
                break
            received += data
        s.close()
        assert b"data: [DONE]" in received and received.endswith(b"0\r\n\r\n")
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("how", ["a second Ctrl-C", "the shutdown timeout"])
def test_a_shutdown_that_stops_waiting_cuts_requests_and_logs_them(fake, tmp_path, how):
    """A second Ctrl-C stops waiting for requests at once; --shutdown-timeout when it ends.
    Either way each cut request gets its access line, and a count (before: no trace; at the
    timeout, its line came after the log's last flush)."""
    twice = how == "a second Ctrl-C"
    registry = write_registry(tmp_path / "s.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    proc, port = start_serve(registry, "--shutdown-timeout", "30" if twice else "0.5")
    release = threading.Event()
    fake.script({"hold": release})
    try:
        threads, results = held_requests(port, 1)
        assert fake.holding.acquire(timeout=TIMEOUT)
        err = []
        threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
        proc.send_signal(signal.SIGINT if twice else signal.SIGTERM)
        if twice:
            assert wait_until(lambda: any("shutting down" in line for line in err))
            assert proc.poll() is None  # the first one waits for the request (up to 30 s)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(5) == 0  # the second one does not
        else:
            assert proc.wait(TIMEOUT) == 0
        threads[0].join(TIMEOUT)
        assert len(results) == 1 and (not isinstance(results[0], tuple) or
                                      results[0][0] != 200), results
        needles = ["stopping now: 1 request still in flight cut",
                   "POST /v1/chat/completions model=fake-model server=local status=503"]
        if twice:
            needles.append("second signal: closing in-flight requests now")
        for needle in needles:
            assert wait_until(lambda: any(needle in line for line in err)), (needle, err)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT (Linux)")
@pytest.mark.parametrize("stop", ["ctrl-c", "systemd", "ctrl-c twice"])
def test_ctrl_c_in_a_terminal_lets_workers_finish_their_requests(fake, tmp_path, stop):
    """A terminal's Ctrl-C (SIGINT to the foreground group), or systemd's stop (SIGTERM to each
    process of the unit): each worker gets the signal from serve too, and that is no second
    signal ("stop now"), so the requests under way still finish. A second Ctrl-C, however
    soon, is one: they are cut."""
    registry = write_registry(tmp_path / "s.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, LLMHOST_PY, "--registry",
                             registry, "serve", "--port", str(port), "--workers", "2",
                             "--log-level", "debug"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as in a terminal
    err = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()

    def said(needle, times=1):
        return sum(needle in line for line in err) >= times

    release = threading.Event()
    fake.script({"hold": release})
    try:
        def up():
            try:
                return request(port, "GET", "/health", timeout=1)[0] == 200
            except OSError:
                return proc.poll() is not None  # not yet (or never: then say so below)

        assert wait_until(up) and proc.poll() is None
        workers = set()
        assert wait_until(lambda: workers.add(get_status(port)["pid"]) or len(workers) == 2)
        threads, results = held_requests(port, 1)
        assert fake.holding.acquire(timeout=TIMEOUT)
        seen = []  # /v1/status answers, until the one of the worker with the request
        assert wait_until(lambda: seen.append(get_status(port)) or seen[-1]["in_flight"])
        busy = seen[-1]["pid"]
        if stop.startswith("ctrl-c"):
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        else:  # KillMode=control-group: each process (serve passes its own on as well)
            os.kill(proc.pid, signal.SIGTERM)
        assert wait_until(lambda: said("shutting down worker", 2))  # each worker has it
        if stop == "systemd":
            os.kill(busy, signal.SIGTERM)  # ... and then systemd's own: the same stop
            assert wait_until(lambda: said("stop signal again worker"))
            for pid in workers - {busy}:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass  # (with no request under way, it has stopped already)
        if stop == "ctrl-c twice":
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(TIMEOUT) == 0  # at once, not when the request ends
            threads[0].join(TIMEOUT)
            assert not isinstance(results[0], tuple) or results[0][0] != 200, results
            return
        release.set()  # one Ctrl-C: the request under way still finishes
        threads[0].join(TIMEOUT)
        assert [r[0] for r in results] == [200]
        assert proc.wait(TIMEOUT) == 0, err
        reader.join(TIMEOUT)
        assert not said("closing in-flight requests now"), err
    finally:
        release.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_killing_one_of_three_loses_no_unstarted_request(pool):
    running, fakes = pool
    for f in fakes:
        f.script(*[{"delay": 0.3} for _ in range(40)])
        running.gateway.router.upstreams["u" + str(fakes.index(f))].priority = 0
    threads, results = held_requests(running.port, 30)
    assert wait_until(fakes[0].posts)
    fakes[0].kill()  # dies with requests in flight
    for t in threads:
        t.join(TIMEOUT * 2)
    assert [r[0] for r in results] == [200] * 30
    assert len(fakes[0].posts()) >= 1  # some had reached it and were moved elsewhere


@pytest.mark.parametrize("api", ["chat", "messages"])
def test_fifty_streams_flow_at_once(tmp_path, api):
    """The 50-request contract, without a stopwatch: 50 streams are in flight through llmhost at
    the same moment. Each upstream stream sends one event and then waits at a barrier that opens
    only when every client has read its first event, so a gateway that queued, capped or
    buffered any of them would leave the barrier shut and fail here. llmhost runs as its own
    process, as users run it. The same for 50 Messages streams (their message_start goes out
    once the upstream answered)."""
    n = 50
    fakes = [FakeUpstream() for _ in range(3)]
    registry = write_registry(tmp_path / "s.json", [
        {"name": f"u{i}", "url": f.url, "models": ["fake-model"]} for i, f in enumerate(fakes)])
    proc, port = start_serve(registry, "--no-access-log")
    barrier = threading.Barrier(n + 1)  # the 50 upstream streams and this test
    for f in fakes:
        f.script(*[{"meet": barrier, "pace": 0.01} for _ in range(n)])
    words = " ".join(["w"] * 19)
    path, body = ("/v1/chat/completions", CHAT) if api == "chat" else ("/v1/messages", MSG)
    payload = json.dumps(dict(body, stream=True, messages=[
        {"role": "user", "content": words}])).encode()
    conns = []
    try:
        for _ in range(n):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT * 2)
            conn.request("POST", path, payload, {"Content-Type": "application/json"})
            conns.append(conn)
        answers = [conn.getresponse() for conn in conns]
        assert [a.status for a in answers] == [200] * n
        # "data: {...role...}" / "event: message_start" of every stream
        firsts = [a.readline() for a in answers]
        assert all(line.startswith(b"data: {" if api == "chat" else b"event: message_start\n")
                   for line in firsts)
        barrier.wait(TIMEOUT)  # all 50 upstream streams are waiting here too
        for first, answer in zip(firsts, answers):
            if api == "messages":
                events = named_events(first + answer.read())
                assert events[-1][0] == "message_stop"
                assert "".join(data["delta"]["text"] for name, data in events
                               if name == "content_block_delta") == "echo: " + words
                continue
            events = sse_events(first + answer.read())
            assert events[-1] == "[DONE]"
            deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
            assert "".join(d.get("content", "") for d in deltas) == "echo: " + words
    finally:
        barrier.abort()
        for conn in conns:
            conn.close()
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)
        for f in fakes:
            f.close()


def test_fifty_slow_streams_take_as_long_as_one(tmp_path):
    """Issue 3's measure: 50 concurrent 1 s streams (20 events, 50 ms apart, spread over three
    upstreams) each take within 10% of one stream alone. Each stream is timed from its own
    request to its last byte, so starting 50 client threads is not counted; the fake upstreams
    pace by the clock, so their own thread scheduling does not add up over 20 events."""
    fakes = [FakeUpstream() for _ in range(3)]
    registry = write_registry(tmp_path / "s.json", [
        {"name": f"u{i}", "url": f.url, "models": ["fake-model"]} for i, f in enumerate(fakes)])
    proc, port = start_serve(registry, "--no-access-log")
    body = dict(CHAT, stream=True, messages=[{"role": "user", "content": " ".join(["w"] * 19)}])

    def durations(n):
        for f in fakes:
            f.script(*[{"pace": 0.05} for _ in range(n)])
        results = []

        def one():
            started = time.monotonic()
            status, _, raw = post(port, "/v1/chat/completions", body, timeout=TIMEOUT)
            results.append((status, sse_events(raw)[-1], time.monotonic() - started))

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert [(r[0], r[1]) for r in results] == [(200, "[DONE]")] * n
        for f in fakes:
            f.steps.clear()
        return [r[2] for r in results]

    try:
        alone = durations(1)[0]
        together = durations(50)
        # 50 at once take as long as one, give or take what 50 client threads and 3 fakes
        # sharing two cores with llmhost cost (about 10%, 15% on a busy one); queued: 50 s
        assert alone >= 1.0 and max(together) <= alone * 1.3, (alone, sorted(together)[-5:])
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)
        for f in fakes:
            f.close()


# =============================================================================
# Hostile input: strict parsing, slow clients, browsers, exposure, secrets
# =============================================================================

_BODY = b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}'
_POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"

# (name, raw request, expected status). Each must be answered and the connection closed.
MALFORMED = [
    ("bare LF request line", b"GET /health HTTP/1.1\nHost: x\n\n", 400),
    ("bare LF headers", b"GET /health HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
    ("bare CR in header", b"GET /health HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", 400),
    ("NUL in header value", b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
    ("NUL in target", b"GET /he\x00alth HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("space before colon", b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    ("obs-fold", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    ("header without colon", b"GET /health HTTP/1.1\r\nHost: x\r\nBogus\r\n\r\n", 400),
    ("bad header name", b"GET /health HTTP/1.1\r\nHost: x\r\nX(a): b\r\n\r\n", 400),
    ("missing Host", b"GET /health HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("HTTP/0.9 line", b"GET /health\r\n\r\n", 400),
    ("extra token in line", b"GET /health HTTP/1.1 x\r\nHost: x\r\n\r\n", 400),
    ("double space in line", b"GET  /health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("authority-form target", b"GET evil:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("bad version text", b"GET /health HTTP/1.1.1\r\nHost: x\r\n\r\n", 400),
    ("HTTP/2.0", b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("unknown method", b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    ("lower-case method", b"get /health HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    ("method with @", b"G@T /health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CL.TE smuggling", _POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nG", 400),
    ("TE.CL smuggling", _POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
     b"8\r\nSMUGGLED\r\n0\r\n\r\n", 400),
    ("two Content-Lengths", _POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("CL list", _POST + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    ("CL negative", _POST + b"Content-Length: -5\r\n\r\nhello", 400),
    ("CL plus sign", _POST + b"Content-Length: +5\r\n\r\nhello", 400),
    ("CL hex", _POST + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("CL huge", _POST + b"Content-Length: 99999999999999999999\r\n\r\n", 400),
    ("CL over limit", _POST + b"Content-Length: %d\r\n\r\n" % (llmhost.MAX_BODY_BYTES + 1), 413),
    ("TE gzip", _POST + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("TE chunked twice in list", _POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n", 501),
    ("TE obfuscated", _POST + b"Transfer-Encoding: xchunked\r\n\r\n", 501),
    ("TE repeated", _POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n", 400),
    ("TE space before colon", _POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("chunk size not hex", _POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
    ("chunk size negative", _POST + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nab\r\n0\r\n\r\n",
     400),
    ("chunk size overflow", _POST + b"Transfer-Encoding: chunked\r\n\r\n"
     b"1000000000000000a\r\n", 400),
    ("chunk size bare LF", _POST + b"Transfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n", 400),
    ("chunk without CRLF", _POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n", 400),
    ("chunk bad extension", _POST + b"Transfer-Encoding: chunked\r\n\r\n2;=\r\nab\r\n0\r\n\r\n",
     400),
    ("chunked over limit", _POST + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (
        llmhost.MAX_BODY_BYTES + 1), 413),
    ("bad trailer", _POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n", 400),
    ("request line too long", b"GET /" + b"a" * llmhost.MAX_REQUEST_LINE + b" HTTP/1.1\r\n"
     b"Host: x\r\n\r\n", 414),
    ("header line too long", b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (
        llmhost.MAX_HEADER_BYTES + llmhost.MAX_REQUEST_LINE) + b"\r\n\r\n", 431),
    ("headers too large", b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70)) + b"\r\n", 431),
    ("too many headers", b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: v\r\n" % i for i in range(llmhost.MAX_HEADER_COUNT)) + b"\r\n", 431),
    ("head cut off", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Partial: ab", 400),
    ("body cut off", _POST + b"Content-Length: 100\r\n\r\n{\"model\"", 400),
    ("chunked body cut off", _POST + b"Transfer-Encoding: chunked\r\n\r\n10\r\nabc", 400),
]


def parse_response(raw):
    """-> (status, headers, body, rest) for one HTTP/1.1 response; asserts it is well-formed."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version in ("HTTP/1.1", "HTTP/1.0") and status.isdigit() and len(status) == 3
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(": ")
        assert colon and name and "\r" not in value and "\n" not in value
        headers[name.lower()] = value
    if "content-length" in headers:
        n = int(headers["content-length"])
        assert len(rest) >= n
        return int(status), headers, rest[:n], rest[n:]
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                _, _, rest = rest.partition(b"\r\n")
                return int(status), headers, body, rest
            body, rest = body + rest[:size], rest[size + 2:]
    return int(status), headers, rest, b""


def test_malformed_table_is_large_enough():
    assert len(MALFORMED) >= 40


@pytest.mark.parametrize("name, payload, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_answered_and_closed(gateway, name, payload, expected):
    raw = raw_exchange(gateway.port, payload)  # reads until the server closes
    status, headers, body, rest = parse_response(raw)
    assert status == expected, body
    assert headers["connection"] == "close" and rest == b""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}


class MisframingUpstream:
    """A keep-alive upstream on raw sockets that answers every chat request with its own
    answer ("answer to <the user's message>"), and misframes every `every`-th answer in turn:
    a second, unrequested response glued after it; a Content-Length shorter than the body; a
    204 that carries a body; bytes sent on the idle connection a moment after the answer
    (`quiet` is clear until they are sent: bytes that come after the connection is reused
    cannot be told from the next answer, by llmhost or by nginx)."""

    MODES = ("stray", "short", "204", "late")

    def __init__(self, every=3):
        self.every = every
        self.count = 0
        self.lock = threading.Lock()
        self.quiet = threading.Event()
        self.quiet.set()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    @staticmethod
    def answer(text, status=200, length=None, extra=b""):
        body = json.dumps({"id": "c", "object": "chat.completion", "created": 1,
                           "model": "fake-model", "choices": [{"index": 0, "message": {
                               "role": "assistant", "content": text},
                               "finish_reason": "stop"}]}).encode()
        return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
               b"\r\n%s%s" % (status, len(body) if length is None else length, body, extra)

    def serve(self, client):
        buf = b""
        with client:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(buf) < length:
                    buf += client.recv(65536)
                body, buf = json.loads(buf[:length]), buf[length:]
                text = "answer to " + body["messages"][0]["content"]
                with self.lock:
                    self.count += 1
                    n = self.count
                mode = self.MODES[(n // self.every) % len(self.MODES)] \
                    if n % self.every == 0 else None
                if mode == "stray":
                    client.sendall(self.answer(text) + self.answer("STRAY"))
                elif mode == "short":
                    client.sendall(self.answer(text, extra=b"hello"))
                elif mode == "204":
                    client.sendall(self.answer(text, status=204))
                elif mode == "late":
                    self.quiet.clear()
                    client.sendall(self.answer(text))
                    time.sleep(0.05)  # (pacing: the stray bytes come a moment later)
                    client.sendall(self.answer("LATE"))
                    self.quiet.set()
                else:
                    client.sendall(self.answer(text))

    def close(self):
        self.sock.close()


def test_answers_never_cross_between_clients_through_a_misframing_upstream(tmp_path):
    """An upstream that sends bytes past the answer it declared leaves a pooled connection
    out of step: before, every later request on it got the previous request's answer (client
    B got the stray one, C got B's...). Now bytes past an answer, or bytes on an idle pooled
    connection, close it: 200 distinct clients in a row each get their own answer or an
    error, never another's, and most get their own."""
    upstream = MisframingUpstream(every=3)
    path = write_registry(tmp_path / "s.json", [
        {"name": "odd", "url": upstream.url, "models": ["fake-model"]}])
    running = Running(path)
    try:
        own = 0
        for i in range(200):
            assert upstream.quiet.wait(TIMEOUT)
            status, _, raw = request(running.port, "POST", "/v1/chat/completions", {
                "model": "fake-model", "messages": [{"role": "user", "content": f"client {i}"}]})
            if status == 200:
                content = json.loads(raw)["choices"][0]["message"]["content"]
                assert content == f"answer to client {i}", (i, content)
                own += 1
            else:
                assert status in (204, 502), (i, status, raw[:200])
                assert b"answer to" not in raw and b"STRAY" not in raw and b"LATE" not in raw
        assert own >= 180  # (only the 204s are not the client's own answer)
    finally:
        running.stop()
        upstream.close()


def test_a_client_head_with_bare_lf_or_a_tls_handshake_is_refused_at_once(gateway):
    """Bytes that can never become a request are a 400 and a close at once; before, a bare-LF
    head (typed into nc) or a bare-LF chunk-size line waited out the head timeout, and so did
    a TLS ClientHello sent to the plain-HTTP port."""
    client_hello = bytes.fromhex("16030100c4010000c00303") + os.urandom(32) + b"\x00" * 40
    for payload in (b"GET /health HTTP/1.1\nHost: x\n\n",
                    b"GET /health HTTP/1.1\r\nHost: x\nX: 1\n",
                    _POST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
                    client_hello):
        started = time.monotonic()
        raw = raw_exchange(gateway.port, payload, half_close=False)
        assert raw.startswith(b"HTTP/1.1 400 "), (payload, raw)
        assert time.monotonic() - started < 1.5, payload  # (the head timeout is 10 s)
    raw = raw_exchange(gateway.port, client_hello, half_close=False)
    assert b"TLS" in raw


def test_a_body_on_a_route_that_takes_none_is_refused_unread(tmp_path, fake):
    """OPTIONS on any path and GET /health were read whatever their body (OPTIONS even got
    100 Continue), so a client without a key could make llmhost hold 32 MiB per request. Now
    a body on a route that takes none is refused from its head: no 100 Continue, never read."""
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, api_keys=["k1"])
    try:
        for method, target in (("OPTIONS", "/v1/chat/completions"), ("OPTIONS", "*"),
                               ("GET", "/health"), ("GET", "/v1/models")):
            with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as s:
                s.sendall(b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                          b"Content-Length: 30000000\r\n\r\n" % (method.encode(),
                                                                 target.encode()))
                raw = s.recv(65536)
                assert raw[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 401", b"HTTP/1.1 404",
                                    b"HTTP/1.1 405"), (method, target, raw)
                assert b"100 Continue" not in raw and b"connection: close" in raw.lower()
        status, _, raw = request(running.port, "GET", "/health")  # (no body: still fine)
        assert status == 200
    finally:
        running.stop()


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def test_a_keyless_flood_neither_keeps_keyed_clients_out_nor_holds_memory(tmp_path, fake):
    """1,030 keyless connections trickling heads and bodies (past MAX_CONNECTIONS), and 20
    keyless 29 MB bodies, while a keyed client sends 100 requests on fresh connections: all
    100 succeed (before: past the limit they were reset for about 11 s), and serve's RSS is
    back within 20 MB of where it started within 10 s of the flood (before: +500 MB)."""
    path = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    proc, port = start_serve(path, "--api-key", "k1", "--no-access-log")
    keyed = {"Authorization": "Bearer k1"}
    flood, stop = [], threading.Event()
    try:
        assert request(port, "POST", "/v1/chat/completions", CHAT, headers=keyed)[0] == 200
        start_rss = _rss_kib(proc.pid)

        def trickle():
            for i in range(1030):
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                    s.setblocking(False)
                    s.send(_POST + (b"Content-Length: 100000\r\n\r\n" if i % 2 else b"X-A: "))
                    flood.append(s)
                except OSError:
                    pass
            while not stop.wait(0.5):
                for s in list(flood):
                    try:
                        s.send(b"a")
                    except OSError:
                        pass

        def big():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
                    s.sendall(_POST + b"Content-Length: 29000000\r\n\r\n" + b"x" * 29000000)
            except OSError:
                pass  # (refused unread: the upload is cut)

        threads = [threading.Thread(target=trickle)] + [
            threading.Thread(target=big) for _ in range(20)]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(flood) >= 1000)
        results = []
        for _ in range(100):
            status, _, raw = request(port, "POST", "/v1/chat/completions", CHAT, headers=keyed)
            results.append(status)
        assert results == [200] * 100
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
        for s in flood:
            s.close()
        # the memory the flood took is given back (as it was: within 10 s)
        assert wait_until(lambda: _rss_kib(proc.pid) - start_rss < 20 * 1024, 10), \
            (start_rss, _rss_kib(proc.pid))
    finally:
        stop.set()
        for s in flood:
            s.close()
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)


def test_malformed_table_while_a_good_client_keeps_working(gateway):
    stop = threading.Event()
    good = []

    def well_formed():
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
        while not stop.is_set():
            conn.request("POST", "/v1/chat/completions", body=_BODY,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            good.append((resp.status, json.loads(resp.read())["choices"][0]["message"]))
        conn.close()

    thread = threading.Thread(target=well_formed)
    thread.start()
    try:
        for name, payload, expected in MALFORMED:
            status = parse_response(raw_exchange(gateway.port, payload))[0]
            assert status == expected, name
    finally:
        stop.set()
        thread.join(TIMEOUT)
    assert len(good) > 0 and all(status == 200 for status, _ in good)


def test_byte_by_byte_request_is_parsed(gateway):
    payload = _POST + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BODY), _BODY)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(payload)):
            s.sendall(payload[i:i + 1])
        raw = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            raw += data
    status, _, body, _ = parse_response(raw)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "echo: x"


def test_pipelined_requests_answered_in_order(gateway):
    one = _POST + b"Content-Length: %d\r\nX-Request-Id: first\r\n\r\n%s" % (len(_BODY), _BODY)
    two = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: second\r\n\r\n"
    three = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Request-Id: third\r\nConnection: close\r\n\r\n"
    raw = raw_exchange(gateway.port, one + two + three, half_close=False)
    ids = []
    while raw:
        status, headers, body, raw = parse_response(raw)
        assert status == 200
        ids.append(headers["x-request-id"])
    assert ids == ["first", "second", "third"]


def test_pipelined_garbage_after_good_request(gateway):
    raw = raw_exchange(gateway.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n",
                       half_close=False)
    status, _, _, rest = parse_response(raw)
    assert status == 200
    status, headers, _, rest = parse_response(rest)
    assert status == 400 and headers["connection"] == "close" and rest == b""


def test_slow_clients_time_out(gateway, monkeypatch):
    monkeypatch.setattr(llmhost, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(llmhost, "KEEPALIVE_IDLE", 0.5)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and never the end
        started = time.monotonic()
        raw = s.recv(65536)
        assert raw.startswith(b"HTTP/1.1 408 ") and s.recv(10) == b""
        assert parse_response(raw)[2].find(b'"type":"invalid_request_error"') > 0
        assert time.monotonic() - started < 2
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /health HTTP/1.1\nHost: x\n\n")  # bare LFs: its CRLF end never comes
        status, _, data, _ = parse_response(s.recv(65536))
        assert status == 400 and b"must end with CRLF" in data
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # one request, then idle
        assert parse_response(s.recv(65536))[0] == 200
        assert s.recv(10) == b""  # idle keep-alive closed (silently)


def test_body_timeout_is_for_silence_not_for_the_whole_upload(gateway, monkeypatch):
    """A slow upload that keeps sending is read to its end (nginx's client_body_timeout); a
    body that stops arriving gets a 408."""
    monkeypatch.setattr(llmhost, "BODY_TIMEOUT", 1.0)
    monkeypatch.setattr(llmhost, "BODY_MIN_RATE", 10)  # (bytes/s: this upload's is ~60)
    body = json.dumps(CHAT).encode()

    def chunked():  # the same in one chunk, on a connection of its own, meanwhile
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body))
            for i in range(0, len(body), len(body) // 5 + 1):
                time.sleep(0.3)  # (pacing, as below)
                s.sendall(body[i:i + len(body) // 5 + 1])
            s.sendall(b"\r\n0\r\n\r\n")
            return parse_response(s.recv(65536))[0]

    other = in_background(chunked)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), len(body) // 5 + 1):  # 1.5 s in all, 0.3 s gaps
            time.sleep(0.3)  # (pacing: the slow upload under test)
            s.sendall(body[i:i + len(body) // 5 + 1])
        status, headers, data, _ = parse_response(s.recv(65536))
        assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == \
            "echo: hello there"
        assert float(headers["x-llmhost-overhead-ms"]) < 500  # the upload's 1.5 s: not ours
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10]))  # then silence
        started = time.monotonic()
        assert s.recv(65536).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 3
    assert other.result(TIMEOUT) == 200


def test_a_body_that_trickles_below_the_minimum_rate_gets_408(gateway, monkeypatch):
    """A byte now and then renews an idle timeout for ever; the body also has an overall
    deadline, BODY_TIMEOUT plus a second per BODY_MIN_RATE bytes (Apache's mod_reqtimeout),
    so a trickle cannot hold a connection (before: it held it as long as it kept trickling)."""
    monkeypatch.setattr(llmhost, "BODY_TIMEOUT", 1.0)
    monkeypatch.setattr(llmhost, "BODY_MIN_RATE", 20)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000\r\n\r\n")
        started = time.monotonic()
        s.settimeout(0.2)
        answer = b""
        while not answer and time.monotonic() - started < 8:
            try:
                s.sendall(b"{")  # 5 bytes/s: the idle timeout alone never runs out
                answer = s.recv(65536)
            except socket.timeout:
                pass
        # 1 s + 5 bytes/s for ~1.3 s / 20 -> about 1.3 s, within a sweep tick or two
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 3


def test_a_client_that_stops_reading_is_closed_and_frees_its_slot(gateway, fake, monkeypatch,
                                                                    caplog):
    """A client that takes none of a long answer for SEND_TIMEOUT (nginx's send_timeout) is
    closed, so it holds neither its slot nor the model's for good; one that reads is served."""
    monkeypatch.setattr(llmhost, "SEND_TIMEOUT", 0.5)
    for stream, words, close in ((True, 100_000, False), (False, 4_000_000, False),
                                 (False, 4_000_000, True)):  # more than every buffer on the
        body = json.dumps(dict(CHAT, stream=stream, messages=[  # way holds (8 MB echoed)
            {"role": "user", "content": "x " * words}])).encode()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(TIMEOUT)
            s.connect(("127.0.0.1", gateway.port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%s"
                      b"Content-Length: %d\r\n\r\n%s" % (
                          b"Connection: close\r\n" if close else b"", len(body), body))
            assert wait_until(lambda: any(  # every buffer on the way is full
                c.transport.get_write_buffer_size() for c in gateway.gateway.http.connections))
            assert wait_until(lambda: get_status(gateway.port)["in_flight"] == 0, 10)
            assert server_status(gateway.port, "local")["in_flight"] == 0
            # ... and closed: a whole answer in llmhost's buffer has ended its request, but
            # not the connection (before this wait, the drain below could race the close and
            # take all 8 MB through the small window, five seconds)
            assert wait_until(lambda: not gateway.gateway.http.connections)
            try:  # what had come before is dropped with it, or read: then the close
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    status, doc = jpost(gateway.port, "/v1/chat/completions", CHAT)
    assert status == 200
    # what the upstream had sent meanwhile is not written to the closed connection (asyncio
    # logs each such write: hundreds of lines per client)
    assert not [r for r in caplog.records if "socket.send() raised" in r.getMessage()]


def test_a_slow_client_that_keeps_reading_gets_all_of_a_big_answer(gateway, fake, monkeypatch):
    """SEND_TIMEOUT is for a client that takes nothing, not for the whole answer (nginx's
    send_timeout is between two writes): one reading 4 MB slowly for longer, or pausing past
    the keep-alive timeout once it has most of it, gets every byte."""
    monkeypatch.setattr(llmhost, "SEND_TIMEOUT", 1.0)
    monkeypatch.setattr(llmhost, "KEEPALIVE_IDLE", 0.5)
    body = json.dumps(dict(CHAT, messages=[{"role": "user", "content": "x " * 2_000_000}]))

    def one(pause, reading=None):  # (the passes overlap: the second begins once the first reads)
        fake.script({"delay": 0.5})
        asked = len(fake.posts())
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            s.settimeout(TIMEOUT)
            s.connect(("127.0.0.1", gateway.port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
            assert wait_until(lambda: len(fake.posts()) > asked)  # the upstream has it
            for conn in gateway.gateway.http.connections:  # (while the upstream thinks) so
                conn.transport.get_extra_info("socket").setsockopt(  # the answer waits in
                    socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # llmhost, not the kernel
            if reading is not None:
                reading.set()
            received = b""
            started = time.monotonic()
            total = None  # head and body, once the head is in
            while total is None or len(received) < total:
                if total is None and b"\r\n\r\n" in received:
                    head = received.split(b"\r\n\r\n")[0].decode("latin-1").lower()
                    total = len(head) + 4 + int(head.split("content-length: ")[1].split()[0])
                if pause and total and len(received) > total - 30_000:
                    time.sleep(pause)  # (pacing) past the keep-alive timeout, with the end
                    pause = 0.0  # of the answer still to come (its drain is over: idle)
                data = s.recv(16384)
                assert data, f"cut after {len(received)} bytes"
                received += data
                time.sleep(0.005)  # pacing: about 2 MB/s, 2 s in all, twice SEND_TIMEOUT
            assert time.monotonic() - started > 1.0
            status, _, data, _ = parse_response(received)
            assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] \
                .startswith("echo: x x")

    reading = threading.Event()
    first = in_background(lambda: one(0.0, reading))
    assert reading.wait(TIMEOUT)
    one(0.8)
    first.result(TIMEOUT)


def test_two_hundred_slowloris_connections_do_not_block_service(gateway):
    sockets = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            sockets.append(s)
        started = time.monotonic()
        status, doc = jpost(gateway.port, "/v1/chat/completions", CHAT)
        # served now, not after the 10 s head timeout has cleared the half-sent requests
        assert status == 200 and time.monotonic() - started < 5.0
    finally:
        for s in sockets:
            s.close()


def test_connection_cap_closes_the_oldest_waiting_connection_to_let_a_new_one_in(gateway):
    """At the limit, the connection that has waited longest without sending a request is
    closed for the new one (before: the new one was refused, so connections that send nothing
    kept every client out)."""
    http = gateway.gateway.http
    http.max_connections = len(http.connections) + 2
    held = [socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT)
            for _ in range(2)]
    try:
        assert wait_until(lambda: len(http.connections) >= http.max_connections)
        for _ in range(3):
            status, _, _ = request(gateway.port, "GET", "/health")
            assert status == 200
        assert held[0].recv(100) == b""  # the oldest: closed
    finally:
        for s in held:
            s.close()


def test_dns_rebinding_guard(fake, tmp_path):
    path = write_registry(tmp_path / "s.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, allowed_hosts=["my-box.lan"])
    try:
        for host, expected in [("attacker.example", 403), ("attacker.example:4000", 403),
                               ("localhost:4000", 200), ("127.0.0.1", 200), ("[::1]:4000", 200),
                               ("my-box.lan:4000", 200), ("127.0.0.1.nip.io", 403)]:
            status, _, raw = request(running.port, "GET", "/v1/models", headers={"Host": host})
            assert status == expected, host
            if expected == 403:
                assert json.loads(raw)["error"]["code"] == "host_not_allowed"
        # no Host at all (HTTP/1.0, as HAProxy's health checks send): no browser sends that
        raw = raw_exchange(running.port, b"GET /health HTTP/1.0\r\n\r\n")
        assert parse_response(raw)[0] == 200
        # an absolute-form target: its authority is checked, not Host (RFC 9112 §3.2.2)
        for line, host, expected in [
                (b"GET http://attacker.example/v1/models HTTP/1.1", b"127.0.0.1", 403),
                (b"GET http://attacker.example:4000/v1/models HTTP/1.0", b"", 403),
                (b"GET http://127.0.0.1:4000/v1/models HTTP/1.1", b"attacker.example", 200)]:
            raw = raw_exchange(running.port, line + b"\r\n" + (
                b"Host: " + host + b"\r\n" if host else b"") + b"Connection: close\r\n\r\n")
            status, _, body, _ = parse_response(raw)
            assert status == expected, line  # (before: 200, 200, 403)
            if expected == 403:
                assert json.loads(body)["error"]["code"] == "host_not_allowed"
    finally:
        running.stop()


def test_cors_off_by_default_and_on_when_asked(fake, tmp_path, gateway):
    status, headers, _ = request(gateway.port, "OPTIONS", "/v1/chat/completions",
                                 headers={"Origin": "http://app.example",
                                          "Access-Control-Request-Method": "POST"})
    assert status == 403 and "access-control-allow-origin" not in headers
    path = write_registry(tmp_path / "c.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, cors_origins=["http://app.example"], api_keys=["k"])
    try:
        status, headers, _ = request(running.port, "OPTIONS", "/v1/chat/completions",
                                     headers={"Origin": "http://app.example",
                                              "Access-Control-Request-Method": "POST"})
        assert status == 204 and headers["access-control-allow-origin"] == "http://app.example"
        assert "content-length" not in headers  # RFC 9110 §8.6: never with a 204
        assert "Authorization" in headers["access-control-allow-headers"]
        asked = "authorization,content-type,x-stainless-os,x-stainless-retry-count"
        status, headers, _ = request(running.port, "OPTIONS", "/v1/chat/completions",
                                     headers={"Origin": "http://app.example",
                                              "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": asked})
        assert status == 204 and headers["access-control-allow-headers"] == asked  # openai-node
        status, headers, _ = post(running.port, "/v1/chat/completions", CHAT, headers={
            "Origin": "http://app.example", "Authorization": "Bearer k"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
        assert "X-Request-Id" in headers["access-control-expose-headers"]
        status, headers, _ = post(running.port, "/v1/chat/completions", CHAT, headers={
            "Origin": "http://other.example", "Authorization": "Bearer k"})
        assert status == 403 and "access-control-allow-origin" not in headers
    finally:
        running.stop()


@pytest.mark.parametrize("origin, host, same", [
    ("http://127.0.0.1:4000", "127.0.0.1:4000", True),
    ("HTTP://LocalHost:4000", "localhost:4000", True),
    ("http://[::1]:4000", "[::1]:4000", True),
    ("https://llm.example", "llm.example", True),  # (behind a TLS proxy that keeps the Host)
    ("https://llm.example", "llm.example:443", True),
    ("http://llm.example:80", "llm.example", True),
    ("http://127.0.0.1:4001", "127.0.0.1:4000", False),
    ("https://127.0.0.1:4000", "127.0.0.1", False),
    ("http://evil.example", "127.0.0.1:4000", False),
    ("null", "127.0.0.1:4000", False),
    ("http://127.0.0.1:4000", "", False),  # (no Host: HTTP/1.0)
    ("file://127.0.0.1:4000", "127.0.0.1:4000", False),
])
def test_same_origin_compares_scheme_default_ports(origin, host, same):
    assert llmhost.same_origin(origin, host) is same


# What browsers send (the Fetch standard): Origin on every cross-origin POST, Sec-Fetch-Site
# since Chrome 76, Firefox 90, Safari 16.4.
CROSS_SITE = [
    b"Origin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: no-cors\r\n",
    b"Origin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: navigate\r\n",
    b"Origin: https://evil.example\r\n",  # (a browser without Sec-Fetch-*)
    b"Origin: null\r\nSec-Fetch-Site: cross-site\r\n",  # a sandboxed frame, a file:// page
    b"Sec-Fetch-Site: cross-site\r\n",
    b"Origin: http://127.0.0.1:1\r\nSec-Fetch-Site: same-site\r\n",  # another local port
]
SAME_SITE = [
    b"",  # curl, the SDKs: no Origin, whatever the Content-Type
    b"Origin: http://127.0.0.1:%(port)d\r\nSec-Fetch-Site: same-origin\r\n",
    b"Origin: http://127.0.0.1:%(port)d\r\n",
    # a page served beside llmhost by one reverse proxy, which set Host to llmhost's address
    b"Origin: https://ai.example\r\nSec-Fetch-Site: same-origin\r\n",
    b"Sec-Fetch-Site: none\r\n",
]


def test_a_cross_site_request_never_reaches_an_upstream_or_a_tool(mcp_env, tmp_path):
    """A web page's "simple" POST (text/plain: no preflight) naming a model with an MCP tool
    attached: neither the upstream nor the tool sees it; the same request from curl or from
    llmhost's own origin runs the tool."""
    running, fake = mcp_env
    for i, fields in enumerate(CROSS_SITE + SAME_SITE):
        ran = tmp_path / f"ran-{i}"
        fake.steps.clear()
        fake.requests.clear()
        fake.script({"calls": [("t__tally", {"path": str(ran)})]})
        body = json.dumps({"model": "agent", "messages": [{"role": "user", "content": "go"}]})
        raw = raw_exchange(running.port, b"POST /v1/chat/completions HTTP/1.1\r\n"
                           b"Host: 127.0.0.1:%d\r\n" % running.port +
                           fields % {b"port": running.port} +
                           b"Content-Type: text/plain;charset=UTF-8\r\nConnection: close\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()),
                           timeout=TIMEOUT * 3, half_close=False)
        status, headers, payload, _ = parse_response(raw)
        if fields in CROSS_SITE:
            error = json.loads(payload)["error"]
            assert status == 403 and error["code"] == "origin_not_allowed", (fields, payload)
            assert "--cors-origin" in error["message"]
            assert "access-control-allow-origin" not in headers
            assert fake.requests == [] and not ran.exists(), fields  # (before: both ran)
        else:
            assert status == 200, (fields, payload)
            assert len(fake.posts()) == 2 and ran.read_text() == "ran\n", fields
    fake.steps.clear()


def test_cors_origin_lets_its_origin_through_preflight_included(fake, tmp_path):
    path = write_registry(tmp_path / "c.json",
                          [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    running = Running(path, cors_origins=["https://app.example"])
    try:
        for origin, expected in (("https://app.example", 204), ("https://evil.example", 403)):
            status, headers, raw = request(running.port, "OPTIONS", "/v1/chat/completions",
                                           headers={"Origin": origin,
                                                    "Sec-Fetch-Site": "cross-site",
                                                    "Access-Control-Request-Method": "POST"})
            assert status == expected, origin  # (before: 405 for evil.example)
            assert ("access-control-allow-origin" in headers) is (expected == 204)
        status, headers, _ = post(running.port, "/v1/chat/completions", CHAT, headers={
            "Origin": "https://app.example", "Sec-Fetch-Site": "cross-site",
            "Content-Type": "text/plain"})
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        status, headers, raw = post(running.port, "/v1/chat/completions", CHAT, headers={
            "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site",
            "Content-Type": "text/plain"})
        assert status == 403 and "--cors-origin https://evil.example" in raw.decode()
        assert len(fake.posts()) == 1
        # a GET too: /v1/mcp/tools starts MCP servers (a <script src> sends no Origin)
        status, _, _ = request(running.port, "GET", "/v1/mcp/tools",
                               headers={"Sec-Fetch-Site": "cross-site"})
        assert status == 403
    finally:
        running.stop()
    running = Running(path, cors_origins=["*"])
    try:
        status, headers, _ = request(running.port, "OPTIONS", "/v1/chat/completions",
                                     headers={"Origin": "https://any.example",
                                              "Access-Control-Request-Method": "POST"})
        assert status == 204 and headers["access-control-allow-origin"] == "*"
        assert "DELETE" in headers["access-control-allow-methods"]  # (DELETE /v1/responses/ID)
    finally:
        running.stop()


def test_non_loopback_without_key_refuses_to_start(tmp_path):
    registry = write_registry(tmp_path / "s.json", [])
    result = subprocess.run([sys.executable, LLMHOST_PY, "--registry",
                             registry, "serve", "--host", "0.0.0.0", "--port", "0"],
                            capture_output=True, text=True, timeout=TIMEOUT,
                            env={k: v for k, v in os.environ.items() if k != "LLMHOST_API_KEY"})
    assert result.returncode == 1
    assert "refusing to serve on 0.0.0.0 without an API key" in result.stderr
    assert "--no-auth" in result.stderr


def test_api_key_flag_wins_over_the_variable_and_a_variable_without_a_key_is_refused(
        fake, tmp_path):
    registry = write_registry(tmp_path / "s.json", [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    proc, port = start_serve(registry, "--api-key", "new-key",
                             env={"LLMHOST_API_KEY": "old-key"})
    try:  # (before: both keys taken, so a key replaced on the command line still worked)
        for key, status in (("old-key", 401), ("new-key", 200)):
            assert post(port, "/v1/chat/completions", CHAT,
                        headers={"Authorization": "Bearer " + key})[0] == status
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)
    result = subprocess.run([sys.executable, LLMHOST_PY, "--registry",
                             registry, "serve", "--port", "0"], capture_output=True, text=True,
                            timeout=TIMEOUT, env=dict(os.environ, LLMHOST_API_KEY=" , "))
    assert result.returncode == 1 and "LLMHOST_API_KEY holds no key" in result.stderr


def test_no_key_appears_in_any_output(fake, tmp_path):
    secrets = ["sk-client-key-123", "sk-upstream-env-456", "sk-upstream-literal-789",
               "sk-wrong-guess-000"]
    registry = write_registry(tmp_path / "s.json", [
        {"name": "a", "url": fake.url, "models": ["fake-model"], "api_key_env": "UP"},
        {"name": "b", "url": "http://127.0.0.1:1/v1", "models": ["m2"],
         "api_key": secrets[2]}])
    proc, port = start_serve(registry, "--api-key", secrets[0], "--log-level", "debug",
                             env={"UP": secrets[1]})
    outputs = []
    try:
        auth = {"Authorization": "Bearer " + secrets[0]}
        outputs.append(post(port, "/v1/chat/completions", CHAT, headers=auth)[2])
        outputs.append(post(port, "/v1/chat/completions", dict(CHAT, model="m2"), headers=auth)[2])
        outputs.append(post(port, "/v1/chat/completions", CHAT,
                            headers={"Authorization": "Bearer " + secrets[3]})[2])
        outputs.append(request(port, "GET", "/v1/status", headers=auth)[2])
        assert fake.posts()[0]["headers"]["authorization"] == "Bearer " + secrets[1]
        for argv in (["list"], ["list", "--json"], ["show", "a"], ["show", "b"]):
            outputs.append(subprocess.run(
                [sys.executable, LLMHOST_PY, "--registry", registry,
                 *argv], capture_output=True, timeout=TIMEOUT).stdout)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=TIMEOUT)
    outputs += [out.encode(), err.encode()]
    assert b"status=401" in outputs[-1]  # the failed auth was logged ...
    for blob in outputs:
        for secret in secrets:
            assert secret.encode() not in blob  # ... and no key appears anywhere


def test_no_url_password_appears_in_any_output(fake, tmp_path):
    """A password in a registry URL is never shown: an MCP server's (kept: its client sends
    it) nor an LLM server's (refused, so it shows in errors): not by list, show, add, serve's
    log, /v1/status, a reload's error, nor an error of the MCP client that names the URL."""
    secret = "pw-s3cret-42"
    # (the fake answers GET /sse with a 404, and the SSE client's error names the URL)
    mcp = {"docs": {"url": f"http://reader:{secret}@127.0.0.1:{fake.port}/sse", "type": "sse"}}
    good = [{"name": "a", "url": fake.url, "models": ["fake-model"], "mcp": ["docs"]}]
    bad = [dict(good[0], url=fake.url.replace("http://", f"http://user:{secret}@"))]
    registry = write_registry(tmp_path / "s.json", good, mcp)
    outputs = []

    def cli(*argv):
        result = subprocess.run([sys.executable, LLMHOST_PY, "--registry",
                                 registry, *argv], capture_output=True, text=True,
                                timeout=TIMEOUT * 3)
        outputs.extend([result.stdout, result.stderr])
        return result

    proc, port = start_serve(registry, "--log-level", "debug")
    log, reloaded = [], threading.Event()

    def read_log():
        for line in proc.stderr:
            log.append(line)
            if "registry not reloaded" in line:
                reloaded.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        outputs.append(post(port, "/v1/chat/completions", CHAT)[2].decode())
        for path in ("/v1/status", "/v1/mcp/servers"):
            status, _, raw = request(port, "GET", path)
            assert status == 200
            outputs.append(raw.decode())
        listed, mcp_listed, _, _, tools = at_once(  # (none changes anything)
            lambda: cli("list"), lambda: cli("mcp", "list", "--json"),
            lambda: cli("list", "--json"), lambda: cli("show", "a"),
            lambda: cli("mcp", "tools", "docs"))
        assert listed.returncode == 0 and "docs" in mcp_listed.stdout
        assert "HTTPStatusError" in tools.stderr  # (it names the URL)
        write_registry(registry, bad, mcp)
        assert reloaded.wait(TIMEOUT)  # (the file is watched about once a second)
        listed, _, _, added = at_once(
            lambda: cli("list"), lambda: cli("show", "a"), lambda: cli("list", "--json"),
            lambda: cli("add", "b", bad[0]["url"], "--no-check"))
        assert listed.returncode == 1 and "user:***@" in listed.stderr
        assert added.returncode == 1
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        reader.join(TIMEOUT)
    outputs += log
    assert any("reader:***@" in text for text in outputs)
    for text in outputs:
        assert secret not in text, text


def test_fuzzed_requests_never_break_the_server(gateway):
    """Seeded mutations of valid requests, split at random boundaries, some cut off: every
    answer is a well-formed response, the server keeps serving, and nothing leaks."""
    import random
    rng = random.Random(20261125)
    seeds = [
        _POST + b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY),
        _POST + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_BODY), _BODY),
        b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        b"GET /health HTTP/1.0\r\n\r\n",
    ]
    alphabet = b"\r\n\x00 :;\t0123456789abcdefABCDEF-/\x7f\xff"
    connections = gateway.gateway.http.connections
    loop_tasks = lambda: gateway.call(_count_tasks())  # noqa: E731
    baseline = loop_tasks()
    answered = 0
    for i in range(2000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(0, 6)):
            op = rng.random()
            pos = rng.randrange(len(data) + 1)
            if op < 0.4:
                data[pos:pos + 1] = bytes([rng.choice(alphabet)])
            elif op < 0.7:
                data[pos:pos] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            elif op < 0.85:
                del data[pos:pos + rng.randint(1, 8)]
            else:
                data = data[:pos]  # cut off
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cuts = sorted(rng.sample(range(len(data) + 1), min(len(data), rng.randint(0, 3))))
            start = 0
            try:
                for cut in cuts + [len(data)]:
                    s.sendall(bytes(data[start:cut]))
                    start = cut
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # answered and closed before we were done sending: read the answer
            raw = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                raw += chunk
        while raw:
            status, headers, body, raw = parse_response(raw)
            assert 200 <= status < 600
            answered += 1
    assert answered > 1000
    assert jpost(gateway.port, "/v1/chat/completions", CHAT)[0] == 200
    assert wait_until(lambda: not connections, 2)  # every connection was closed and forgotten
    assert loop_tasks() <= baseline  # no task left behind


async def _count_tasks():
    return len(asyncio.all_tasks())


# =============================================================================
# Performance features: workers, bench
# =============================================================================

def test_workers_share_one_port(fake, tmp_path):
    registry = write_registry(tmp_path / "s.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    proc, port = start_serve(registry, "--workers", "2", "--max-concurrency", "7")
    try:
        pids, limits = set(), set()
        deadline = time.monotonic() + TIMEOUT
        while len(pids) < 2 and time.monotonic() < deadline:  # new connections spread out
            doc = json.loads(request(port, "GET", "/v1/status")[2])
            pids.add(doc["pid"])
            limits.add((doc["pid"], doc["max_concurrency"]))
        assert len(pids) == 2 and proc.pid not in pids
        assert sorted(limit for _, limit in limits) == [3, 4]  # 7 split: the total holds
        assert jpost(port, "/v1/chat/completions", CHAT)[0] == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0 and err.count("serving on") == 2
    for pid in pids:  # no worker outlives serve
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def workers_up(port, n, seconds=0.0):
    """The pids of serve's n workers once each has said in its /v1/status (the kernel hands
    each new connection to one or the other) that it has been up more than `seconds`."""
    uptimes = {}

    def look():
        doc = get_status(port)
        uptimes[doc["pid"]] = doc["uptime_seconds"]  # (to a tenth of a second)
        return len(uptimes) == n and all(t > seconds for t in uptimes.values())
    assert wait_until(look, TIMEOUT + seconds), uptimes
    return set(uptimes)


@pytest.mark.parametrize("sig, how, code", [(signal.SIGTERM, "code 0", 1),
                                             (signal.SIGKILL, "SIGKILL", 128 + 9)])
def test_a_worker_that_exits_at_start_stops_serve(fake, tmp_path, sig, how, code):
    registry = write_registry(tmp_path / "s.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    proc, port = start_serve(registry, "--workers", "2")
    try:
        worker = json.loads(request(port, "GET", "/v1/status")[2])["pid"]
        os.kill(worker, sig)  # well within WORKER_MIN_UPTIME: it failed to start
        assert proc.wait(TIMEOUT) == code  # so serve says so, instead of respawning it in a
    finally:  # loop (a signal's death as a shell reports it: 128 + its number)
        proc.kill()
        _, err = proc.communicate()
    assert f"exited ({how}) at start; stopping the others" in err


def test_a_worker_that_dies_is_replaced_and_no_request_is_lost(fake, tmp_path):
    """As nginx's master replaces a worker: the dead one's socket stays open in serve, so the
    connections the kernel hands it wait for the new worker instead of being refused."""
    registry = write_registry(tmp_path / "s.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    proc, port = start_serve(registry, "--workers", "2", "--max-concurrency", "7")
    try:  # (up longer than WORKER_MIN_UPTIME: a death now is no failed start)
        pids = workers_up(port, 2, llmhost.WORKER_MIN_UPTIME)
        victim = pids.pop()
        os.kill(victim, signal.SIGKILL)  # the OOM killer's way
        statuses = [jpost(port, "/v1/chat/completions", CHAT)[0] for _ in range(30)]
        assert statuses == [200] * 30
        seen = {}

        def look():
            doc = get_status(port)
            seen[doc["pid"]] = doc["max_concurrency"]
            return len(seen) >= 2
        assert wait_until(look)
        assert len(seen) == 2 and victim not in seen and pids <= set(seen)
        assert sorted(seen.values()) == [3, 4]  # the new worker took the dead one's share
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0 and err.count("serving on") == 3
    assert f"(pid {victim}) exited (SIGKILL) on its own; starting a new one" in err


# llmhost.py run as a script whose os.fork fails (as out of processes) from fork number N on;
# every worker forked is written to the file PIDS names
FAILING_FORK = ("-c", """
import errno, os, runpy, sys
real_fork, forks = os.fork, []
def fork():
    if len(forks) == int(os.environ["FORK_FAILS_AT"]):
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    pid = real_fork()
    if pid:
        forks.append(pid)
        with open(os.environ["PIDS"], "a") as f:
            f.write(f"{pid}\\n")
    return pid
os.fork = fork
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""")


def test_a_worker_that_cannot_be_forked_stops_serve_with_a_clear_message(fake, tmp_path):
    registry = write_registry(tmp_path / "s.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    pids = tmp_path / "pids"
    proc = subprocess.run([sys.executable, *FAILING_FORK, LLMHOST_PY,
                           "--registry", registry, "serve", "--port", "0", "--workers", "2"],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, FORK_FAILS_AT="1", PIDS=str(pids)))
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(
        "llmhost: error: cannot start worker 2/2: Resource temporarily unavailable")
    (first,) = map(int, pids.read_text().split())
    with pytest.raises(ProcessLookupError):  # the worker started first is stopped, not left
        os.kill(first, 0)
    # and one that cannot replace a dead worker later stops serve too, the other worker first
    proc, port = start_serve(registry, "--workers", "2", python=FAILING_FORK,
                             env={"FORK_FAILS_AT": "2", "PIDS": str(tmp_path / "pids2")})
    try:  # (up longer than WORKER_MIN_UPTIME: a death now is no failed start)
        pids = workers_up(port, 2, llmhost.WORKER_MIN_UPTIME)
        assert wait_until(lambda: (tmp_path / "pids2").exists() and  # (serve accepts once a
                          len((tmp_path / "pids2").read_text().split()) == 2)  # worker runs)
        victim, other = map(int, (tmp_path / "pids2").read_text().split())
        assert {victim, other} == pids
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(TIMEOUT) == 1
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert "cannot start worker" in err and \
        "/2: Resource temporarily unavailable; stopping the others" in err
    with pytest.raises(ProcessLookupError):
        os.kill(other, 0)


def test_a_worker_at_its_share_of_the_limits_says_so(fake, tmp_path):
    """The kernel spreads connections over workers unevenly, so a worker can refuse while
    another has room: its 429 says the numbers are its share, not the totals."""
    registry = write_registry(tmp_path / "s.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    proc, port = start_serve(registry, "--workers", "2", "--max-concurrency", "2",
                             "--queue-size", "2")
    try:
        fake.script(*[{"delay": 1}] * 10)
        threads, results = held_requests(port, 10)  # room for 4 in all
        for t in threads:
            t.join(TIMEOUT)
        refused = [json.loads(r[2])["error"]["message"] for r in results if r[0] == 429]
        assert len(refused) >= 6, results
        assert all("(this worker's share of --max-concurrency 2 and --queue-size 2)" in m
                   for m in refused), refused
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)


def test_a_worker_replaced_while_the_registry_is_broken_serves_the_last_good_one(fake, tmp_path):
    """Its peers keep their last good registry while the file is broken (or deleted): the new
    worker starts with the same one, which serve follows as they do (not the one at start)."""
    servers = [{"name": "local", "url": fake.url, "models": ["fake-model"]}]
    registry = write_registry(tmp_path / "s.json", servers)
    proc, port = start_serve(registry, "--workers", "2", "--log-level", "debug")
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()

    def said(*needles):  # how many lines say all of these
        return sum(all(n in line for n in needles) for line in lines)

    try:
        serve_read = "read: a worker started from now on gets it"
        assert wait_until(lambda: said(serve_read))  # serve has read the file once
        before = said(serve_read)
        write_registry(registry, servers + [
            {"name": "later", "url": fake.url, "models": ["later-model"]}])  # a good edit
        assert wait_until(lambda: said(serve_read) > before)  # serve has read the edit
        assert wait_until(lambda: said("registry reloaded") >= 2)  # so have both workers
        # (up longer than WORKER_MIN_UPTIME: a death now is no failed start)
        pids = workers_up(port, 2, llmhost.WORKER_MIN_UPTIME)
        later = dict(CHAT, model="later-model")
        with open(registry, "w") as f:
            f.write('{"servers": [')  # then an editor's half-saved file
        os.kill(pids.pop(), signal.SIGKILL)
        statuses = [jpost(port, "/v1/chat/completions", later)[0] for _ in range(30)]
        assert statuses == [200] * 30  # both workers serve the edit's model
        os.remove(registry)  # workers refuse a registry that is gone: they keep theirs
        assert wait_until(lambda: said("keeping the last good one", "is gone") == 2)
        os.kill(pids.pop(), signal.SIGKILL)
        statuses = [jpost(port, "/v1/chat/completions", later)[0] for _ in range(30)]
        assert statuses == [200] * 30
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)
        reader.join(TIMEOUT)
    err = "".join(lines)
    assert proc.returncode == 0 and err.count("serving on") == 4, err
    assert err.count("registry not loaded, starting with the last good one") == 2


def test_workers_neither_share_their_port_nor_outlive_serve(fake, tmp_path):
    """SO_REUSEPORT would let a second serve (other keys, other registry) join the port; and a
    serve killed with SIGKILL must not leave its workers serving unsupervised."""
    registry = write_registry(tmp_path / "s.json",
                              [{"name": "local", "url": fake.url, "models": ["fake-model"]}])
    proc, port = start_serve(registry, "--workers", "2")
    try:
        second = subprocess.run([sys.executable, LLMHOST_PY, "--registry",
                                 registry, "serve", "--port", str(port), "--workers", "2"],
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert second.returncode == 1 and "Address already in use" in second.stderr
        assert request(port, "GET", "/health")[0] == 200
        proc.kill()
        proc.wait(TIMEOUT)
        # both workers stopped once their serve was gone (a worker's exit is seen at the
        # port: reaping it is not ours to wait for)
        assert wait_until(lambda: not accepts(port))
    finally:
        proc.kill()
        proc.communicate()


def test_bench_direct_and_through_llmhost(gateway, fake):
    for url in (fake.url, f"http://127.0.0.1:{gateway.port}/v1"):
        for extra in ([], ["--stream"]):
            code, out, err = run_cli("unused", "bench", url, "--model", "fake-model", "-c", "3",
                                     "-n", "12", "--json", *extra)
            result = json.loads(out)
            assert code == 0 and result["requests"] == 12 and result["errors"] == {}
            assert result["output_tokens_per_second"] > 0
            if extra:
                assert 0 < result["ttft_ms"]["p50"] <= result["latency_ms"]["p50"]
                assert result["itl_ms"]["p50"] >= 0
            else:  # no first token to time without a stream
                assert result["ttft_ms"] is None and result["latency_ms"]["p50"] > 0
    code, out, err = run_cli("unused", "bench", f"http://127.0.0.1:{gateway.port}/v1",
                             "--model", "nope-model", "-n", "3", "--json")
    result = json.loads(out)
    assert code == 1 and result["errors"] == {"HTTP 404": 3}
    assert "'nope-model'" in result["error_messages"]["HTTP 404"]  # the server's own words


def test_bench_sends_each_prompt_once_and_says_why_requests_failed(fake):
    fake.script({}, {"status": 400, "body": {"error": {"message": "request (40009 tokens) "
                                                       "exceeds the context size"}}})
    code, out, err = run_cli("unused", "bench", fake.url, "--model", "fake-model", "-n", "3",
                             "--prompt", "same words")
    assert code == 1  # one request failed
    prompts = [json.loads(r["body"])["messages"][0]["content"] for r in fake.posts()]
    assert len(set(prompts)) == 3 and all(p.endswith("same words") for p in prompts)
    assert "2 requests in" in out
    assert "errors: HTTP 400: 1 (first: request (40009 tokens) exceeds the context size)" in out


@pytest.mark.parametrize("step, stream, kind, words", [
    ({"status": 200, "raw": b"plain words"}, True, "bad answer", "asked for a stream, got text"),
    ({"status": 200, "body": {"error": "busy"}}, False, "bad answer", "not a chat completion: busy"),
    ({"drop_after": 1}, True, "broken", "broke mid-answer"),
])
def test_bench_counts_broken_answers_as_errors(fake, step, stream, kind, words):
    fake.script(step)
    code, out, err = run_cli("unused", "bench", fake.url, "--model", "fake-model", "-n", "1",
                             "--json", *(["--stream"] if stream else []))
    result = json.loads(out)
    assert code == 1 and result["requests"] == 0 and result["errors"] == {kind: 1}
    assert words in result["error_messages"][kind]
    assert result["itl_ms"] is None  # a broken stream's token gaps are not counted


def test_bench_duration_ends_the_run_on_time(fake):
    release = threading.Event()
    fake.script({"hold": release})  # a request that would never end
    try:
        started = time.monotonic()
        code, out, err = run_cli("unused", "bench", fake.url, "--model", "fake-model", "-d", "1",
                                 "--json")
        took = time.monotonic() - started
    finally:
        release.set()
    result = json.loads(out)
    assert took < 3 and result["unfinished"] == 1 and result["requests"] == 0 and code == 1


def test_bench_ctrl_c_prints_what_finished(fake):
    fake.script(*[{"delay": 0.2}] * 40)
    proc = subprocess.Popen([sys.executable, LLMHOST_PY, "bench", fake.url,
                             "--model", "fake-model", "-c", "2", "-n", "40", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: len(fake.posts()) >= 5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=TIMEOUT)
    result = json.loads(out)
    assert proc.returncode == 130 and result["interrupted"] is True, err
    assert result["requests"] >= 2 and result["unfinished"] == 2 and result["errors"] == {}


def test_sse_decoder_incremental():
    decoder = llmhost.SSEDecoder()
    stream = b"data: a\r\n\r\n: comment\n\ndata: b\ndata: c\n\nevent: x\ndata:d\n\n"
    events = []
    for i in range(len(stream)):
        events += decoder.feed(stream[i:i + 1])
    assert events == ["a", "b\nc", "d"]


@pytest.mark.parametrize("chunk", [
    b"data: {\"a\":1}\n\n", b"data: \n\n", b"data:  two spaces\n\n", b"data: cr\r\n\n",
    b"data: cr\r\n\r\n", b"data: \xff\xfe bad utf-8\n\n", b"data:x\n\n", b"data: a\ndata: b\n\n",
    b"data: a\n\ndata: b\n\n", b"data: a\n", b"data: a\n\n\n", b"data: \xe2\x82\xac\n\n"])
def test_sse_decoder_gives_a_whole_event_as_its_lines_do(chunk):
    """A read that is one whole event (the decoder's short way) gives what the same bytes give
    fed byte by byte (line by line), and leaves the decoder as they do."""
    whole, split = llmhost.SSEDecoder(), llmhost.SSEDecoder()
    bytewise = []
    for i in range(len(chunk)):
        bytewise += split.feed(chunk[i:i + 1])
    assert whole.feed(chunk) == bytewise
    assert whole.feed(b"data: next\n\n") == split.feed(b"data: next\n\n")
    # and after a partial event the short way is not taken
    decoder = llmhost.SSEDecoder()
    assert decoder.feed(b"data: a\n") == [] and decoder.feed(b"data: b\n\n") == ["a\nb"]
