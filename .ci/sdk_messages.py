"""The official `anthropic` client against llmhost's Messages API, from outside, as a user runs
it: `python3 llmhost.py serve` (a subprocess) in front of the test file's fake upstream (chat
completions only) and its MCP test server over streamable HTTP.

Every answer and every stream event is validated with the SDK's own pydantic types (the SDK
itself only constructs them, unchecked): Message / BetaMessage, the RawMessageStreamEvent
unions, MessageTokensCount, ErrorResponse; an event whose name the API does not define fails.
Run by `.ci/sdk-check-messages`, which makes the venv (anthropic, and pytest for the test file
this imports); LLMHOST_PYTHON is the interpreter that runs serve and the MCP server (it needs
the `mcp` package). Exit status 0 when every check passed.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import anthropic  # noqa: E402
from anthropic._streaming import SSEDecoder  # noqa: E402  (the SDK's own SSE parser)
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent  # noqa: E402
from anthropic.types.beta import BetaMessage, BetaRawMessageStreamEvent  # noqa: E402
from anthropic.types.shared import ErrorResponse  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

import test_llmhost as t  # noqa: E402  (FakeUpstream, the MCP test server, PNG_1PX)

PYTHON = os.environ.get("LLMHOST_PYTHON", "python3")
KEY = "sk-sdk-check"
EVENT_NAMES = {"message_start", "content_block_start", "content_block_delta",
               "content_block_stop", "message_delta", "message_stop", "ping", "error"}
WEATHER = {"name": "get_weather", "description": "Weather of a city.", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
COUNTS = {"messages": 0, "events": 0, "errors": 0}
RESULTS = []


def check(name, fn):
    try:
        detail = fn()
    except Exception as exc:  # a check that fails says why, and the others still run
        RESULTS.append(False)
        print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
        return
    RESULTS.append(True)
    print(f"ok   {name}{': ' + detail if detail else ''}", flush=True)


def expect(condition, what):
    if not condition:
        raise AssertionError(what)


def message(doc, beta=False):
    """A Message (BetaMessage: with MCP blocks), validated from the JSON llmhost sent."""
    COUNTS["messages"] += 1
    return (BetaMessage if beta else Message).model_validate(doc)


def events(http_response, beta=False):
    """A stream's events through the SDK's SSE decoder, each validated; -> [(name, model)].
    An event without a name, or with one the API does not define, fails."""
    adapter = TypeAdapter(BetaRawMessageStreamEvent if beta else RawMessageStreamEvent)
    out = []
    for sse in SSEDecoder().iter_bytes(http_response.iter_bytes()):
        expect(sse.event in EVENT_NAMES, f"unknown event {sse.event!r}")
        data = sse.json()
        expect(data.get("type") == sse.event, f"event {sse.event} has type {data.get('type')}")
        if sse.event == "error":
            COUNTS["errors"] += 1
            out.append((sse.event, ErrorResponse.model_validate(data)))
        elif sse.event != "ping":
            out.append((sse.event, adapter.validate_python(data)))
        COUNTS["events"] += 1
    return out


def raw_stream(client, beta=False, **params):
    create = (client.beta.messages if beta else client.messages).with_streaming_response.create
    with create(stream=True, **params) as response:
        return events(response.http_response, beta)


def blocks(evs):
    """The content blocks a stream built, from its validated events."""
    built = {}
    for name, ev in evs:
        if name == "content_block_start":
            built[ev.index] = ev.content_block.model_dump()
        elif name == "content_block_delta":
            block, delta = built[ev.index], ev.delta
            if delta.type == "text_delta":
                block["text"] += delta.text
            elif delta.type == "thinking_delta":
                block["thinking"] += delta.thinking
            elif delta.type == "input_json_delta":
                block["_json"] = block.get("_json", "") + delta.partial_json
    return [built[i] for i in sorted(built)]


def start(argv, ready):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if ready():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{argv[2:4]} did not start: {proc.communicate()[1][-2000:]}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    fake = t.FakeUpstream()
    mcp = subprocess.Popen([PYTHON, os.path.join(HERE, "test_llmhost.py"), "mcp-server", "http"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    mcp_url = f"http://127.0.0.1:{int(mcp.stdout.readline().split()[1])}/mcp"
    folder = tempfile.mkdtemp(prefix="llmhost-sdk-")
    registry = t.write_registry(os.path.join(folder, "servers.json"), [
        {"name": "local", "url": fake.url, "models": ["fake-model"]}])
    port = free_port()
    serve = start([PYTHON, os.path.join(HERE, "llmhost.py"), "--registry", registry, "serve",
                   "--port", str(port), "--api-key", KEY, "--mcp-allow-url",
                   "http://127.0.0.1:", "--no-discover"], lambda: t.accepts(port))
    base = f"http://127.0.0.1:{port}"  # as ANTHROPIC_BASE_URL: no /v1
    client = anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0)
    try:
        run_checks(client, fake, base, mcp_url)
    finally:
        serve.terminate()
        mcp.terminate()
        serve.wait(10)
        mcp.wait(10)
        fake.close()
    passed = sum(RESULTS)
    print(f"\n{passed} passed, {len(RESULTS) - passed} failed ({COUNTS['messages']} messages "
          f"and {COUNTS['events']} stream events validated, {COUNTS['errors']} of them "
          "error events)")
    return 0 if all(RESULTS) else 1


def run_checks(client, fake, base, mcp_url):
    user = [{"role": "user", "content": "hello there"}]
    common = {"model": "fake-model", "max_tokens": 1024}

    def streamed(steps=(), beta=False, **params):
        """One stream asked for twice: raw (each event validated), then with messages.stream()
        (its final Message validated) -> (events, final message, text_stream's text)."""
        fake.script(*steps)
        evs = raw_stream(client, beta, **common, **params)
        names = [name for name, _ in evs]
        expect(names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"],
               names)
        fake.script(*steps)
        with (client.beta.messages if beta else client.messages).stream(**common,
                                                                        **params) as s:
            text = "".join(s.text_stream)
            final = message(s.get_final_message().model_dump(), beta)
        return evs, final, text

    def create_text():
        raw = client.messages.with_raw_response.create(system="Be brief.", messages=user,
                                                       **common)
        msg = message(raw.http_response.json())
        expect(msg.content[0].text == "echo: hello there", msg)
        expect(msg.stop_reason == "end_turn" and msg.usage.input_tokens == 7, msg)
        return f"{msg.id}, {msg.stop_reason}, usage {msg.usage.input_tokens}/" \
            f"{msg.usage.output_tokens}"

    def stream_text():
        evs, final, text = streamed(system=[{"type": "text", "text": "Be brief."}],
                                    messages=user)
        expect(text == "echo: hello there" == final.content[0].text, (text, final))
        expect(final.stop_reason == "end_turn" and final.usage.output_tokens == 3, final)
        return f"{len(evs)} events: {' '.join(name for name, _ in evs)}"

    image = [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": t.PNG_1PX}}]}]

    def create_image():
        msg = message(client.messages.with_raw_response.create(
            messages=image, **common).http_response.json())
        expect(msg.content[0].text == "echo: what is this [1 images]", msg)
        sent = fake.posts()[-1]["body"]
        expect(b"data:image/png;base64," + t.PNG_1PX.encode() in sent, "data URL not sent")
        return "base64 image reached the upstream as a data URL"

    def stream_image():
        evs, final, text = streamed(messages=image)
        expect(text == "echo: what is this [1 images]" == final.content[0].text, final)
        return f"{len(evs)} events"

    def tool_round_trip(stream):
        def run():
            if stream:
                evs, first, _ = streamed(tools=[WEATHER], messages=user)
                (start,) = [ev for name, ev in evs if name == "content_block_start"]
                expect(start.content_block.type == "tool_use", evs)
            else:
                first = message(client.messages.with_raw_response.create(
                    tools=[WEATHER], tool_choice={"type": "any"}, messages=user,
                    **common).http_response.json())
            (use,) = first.content
            expect(first.stop_reason == "tool_use" and use.type == "tool_use", first)
            expect(use.input == {"city": "Paris", "unit": "celsius"}, use)
            follow = user + [{"role": "assistant", "content": first.content},
                             {"role": "user", "content": [{"type": "tool_result",
                                                           "tool_use_id": use.id,
                                                           "content": "18 C"}]}]
            if stream:
                second = streamed(tools=[WEATHER], messages=follow)[1]
            else:
                second = message(client.messages.with_raw_response.create(
                    tools=[WEATHER], messages=follow, **common).http_response.json())
            expect(second.content[0].text == "tool result: 18 C", second)
            return f"tool_use {use.name}({use.input}) -> tool_result -> " \
                f"{second.content[0].text!r}"
        return run

    def stop_sequences(stream):
        def run():
            if stream:
                msg = streamed([{"stop_reason": "END"}], messages=user,
                               stop_sequences=["END"])[1]
            else:
                fake.script({"stop_reason": "END"})
                msg = message(client.messages.with_raw_response.create(
                    messages=user, stop_sequences=["END"], **common).http_response.json())
            expect(json.loads(fake.posts()[-1]["body"])["stop"] == ["END"], "stop not sent")
            expect((msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "END"), msg)
            return "stop -> upstream; stop_reason stop_sequence 'END'"
        return run

    def max_tokens_stop():
        msg = streamed([{"finish": "length"}], messages=user)[1]
        expect(msg.stop_reason == "max_tokens", msg)
        return "stop_reason max_tokens"

    def count_tokens():
        raw = client.messages.with_raw_response.count_tokens(
            model="fake-model", system="Be brief.", messages=image, tools=[WEATHER])
        count = MessageTokensCount.model_validate(raw.http_response.json())
        expect(raw.http_response.headers["x-llmhost-token-count"] == "estimate", raw)
        expect(count.input_tokens > 1600, count)
        return f"input_tokens {count.input_tokens} (an estimate, which the answer says)"

    def missing_max_tokens():
        try:
            # (a timeout given: the SDK computes its default one from max_tokens)
            client.messages.create(model="fake-model", messages=user,
                                   max_tokens=anthropic.omit, timeout=30)
        except anthropic.BadRequestError as exc:
            error = ErrorResponse.model_validate(exc.body)
            expect(error.error.type == "invalid_request_error", error)
            return f"BadRequestError: {error.error.message}"
        raise AssertionError("no error")

    def bad_key():
        other = anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0)
        try:
            other.messages.create(messages=user, **common)
        except anthropic.AuthenticationError as exc:
            error = ErrorResponse.model_validate(exc.body)
            expect(error.error.type == "authentication_error", error)
            return f"AuthenticationError: {error.error.message}"
        raise AssertionError("no error")

    def auth_token():
        other = anthropic.Anthropic(base_url=base, auth_token=KEY, max_retries=0)
        msg = other.messages.create(messages=user, **common)
        expect(msg.content[0].text == "echo: hello there", msg)
        return "Authorization: Bearer (ANTHROPIC_AUTH_TOKEN) accepted"

    def rate_limited():
        fake.script({"status": 429, "headers": [("Retry-After", "1")]})
        try:
            client.messages.create(messages=user, stream=True, **common)
        except anthropic.RateLimitError as exc:
            error = ErrorResponse.model_validate(exc.body)
            expect(error.error.type == "rate_limit_error", error)
            return "RateLimitError before the stream began"
        raise AssertionError("no error")

    def dies_mid_stream():
        fake.script({"drop_after": 1})
        evs = raw_stream(client, messages=user, **common)
        expect(evs[-1][0] == "error" and evs[-1][1].error.type == "api_error", evs)
        fake.script({"drop_after": 1})
        try:
            with client.messages.stream(messages=user, **common) as s:
                "".join(s.text_stream)
        except anthropic.APIStatusError as exc:
            return f"event: error -> the SDK raised {type(exc).__name__}"
        raise AssertionError("no error")

    mcp_servers = [{"type": "url", "name": "web", "url": mcp_url}]

    def mcp(stream):
        def run():
            steps = [{"calls": [("web__echo", {"text": "from mcp"})], "say": "Checking."}]
            params = dict(messages=user, mcp_servers=mcp_servers,
                          betas=["mcp-client-2025-04-04"])
            if stream:
                evs, msg, _ = streamed(steps, beta=True, **params)
                expect(blocks(evs) and [b["type"] for b in blocks(evs)] == [
                    b.type for b in msg.content], (evs, msg))
            else:
                fake.script(*steps)
                msg = message(client.beta.messages.with_raw_response.create(
                    **params, **common).http_response.json(), beta=True)
            kinds = [b.type for b in msg.content]
            with_result = [b.model_dump() for b in msg.content]
            expect(kinds == ["text", "mcp_tool_use", "mcp_tool_result", "text"], kinds)
            result = with_result[2]
            expect(result["content"][0]["text"] == "from mcp" and not result["is_error"], result)
            expect(with_result[3]["text"] == "tool result: from mcp", with_result)
            return " ".join(kinds)
        return run

    check("messages.create: system string + text", create_text)
    check("messages.stream: system blocks + text", stream_text)
    check("messages.create: an image (base64)", create_image)
    check("messages.stream: an image (base64)", stream_image)
    check("messages.create: tool_use -> tool_result", tool_round_trip(False))
    check("messages.stream: tool_use -> tool_result", tool_round_trip(True))
    check("messages.create: stop_sequences", stop_sequences(False))
    check("messages.stream: stop_sequences", stop_sequences(True))
    check("messages.stream: a length stop", max_tokens_stop)
    check("messages.count_tokens", count_tokens)
    check("missing max_tokens", missing_max_tokens)
    check("a bad x-api-key", bad_key)
    check("auth_token instead of api_key", auth_token)
    check("a 429 before the first event", rate_limited)
    check("an upstream dying mid-stream", dies_mid_stream)
    check("beta.messages.create: mcp_servers", mcp(False))
    check("beta.messages.stream: mcp_servers", mcp(True))


if __name__ == "__main__":
    sys.exit(main())
