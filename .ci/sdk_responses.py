"""The Responses API through llmhost, checked with the official SDKs (run by .ci/sdk-check).

Starts the test file's fake upstream (chat completions only) and `llmhost.py serve` in front of
it, as subprocesses on loopback, then drives them with the `openai` client and the
`openai-agents` SDK. The `openai` client does not validate what it parses (it builds its models
without checks), so every object and every stream event is also validated here with the SDK's
own pydantic types: Response, ResponseItemList, InputTokenCountResponse and the
ResponseStreamEvent union (an unknown event type fails it).

Usage: python sdk_responses.py REPO_DIR    (a python with openai and openai-agents installed)
"""

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import http.client

import pydantic
from openai import AsyncOpenAI, NotFoundError, OpenAI
from openai.types.responses import (InputTokenCountResponse, Response, ResponseItemList,
                                    ResponseStreamEvent)

REPO = os.path.abspath(sys.argv[1] if sys.argv[1:] else os.path.join(os.path.dirname(__file__),
                                                                     ".."))
MODEL = "fake-model"
# llmhost and the fake upstream run on the project's python (the MCP test server needs `mcp`),
# the SDKs on this venv's
PYTHON = shutil.which("python3") or sys.executable
KEY = "sk-sdk-check"
EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAA"
       "AABJRU5ErkJggg==")
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"type": "string"}},
                          "required": ["city", "unit"], "additionalProperties": False},
           "strict": True}
checked = {"objects": 0, "events": 0}
failures = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url, proc, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)  # (polling a server that is starting: nothing to wait on)
    raise SystemExit(f"{url} did not answer within {seconds} s")


def valid(model, doc):
    model.model_validate(doc)
    checked["objects"] += 1
    return doc


def raw_create(client, **body):
    """responses.create, its JSON validated as a Response -> the parsed Response."""
    raw = client.responses.with_raw_response.create(**body)
    valid(Response, raw.http_response.json())
    return raw.parse()


def raw_stream(port, body):
    """POST a streamed request, validating each event -> the events."""
    events = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/responses", body=json.dumps(dict(body, stream=True)),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    kind = None
    for line in resp:
        line = line.decode().rstrip("\r\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            doc = json.loads(line[6:])
            assert doc["type"] == kind, (doc["type"], kind)
            EVENTS.validate_python(doc)
            checked["events"] += 1
            events.append(doc)
    conn.close()
    numbers = [e["sequence_number"] for e in events]
    assert numbers == list(range(len(events))), numbers
    assert events[0]["type"] == "response.created" and events[1]["type"] == "response.in_progress"
    assert events[-1]["type"] in ("response.completed", "response.incomplete"), events[-1]["type"]
    return events


def case(name):
    def wrap(fn):
        def run(*args):
            try:
                fn(*args)
                print(f"PASS {name}")
            except Exception as exc:  # (each case says what failed, the others still run)
                failures.append(name)
                print(f"FAIL {name}: {exc.__class__.__name__}: {exc}")
        run.__name__ = fn.__name__
        return run
    return wrap


@case("create: text")
def text_create(client, port):
    resp = raw_create(client, model=MODEL, instructions="Be brief.", input="hello there")
    assert resp.status == "completed" and resp.output_text == "echo: hello there", resp
    assert resp.usage.input_tokens == 7 and resp.usage.output_tokens == 3


@case("stream: text (responses.stream and every event validated)")
def text_stream(client, port):
    events = raw_stream(port, {"model": MODEL, "input": "hello there"})
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "echo: hello there", text
    valid(Response, events[-1]["response"])
    with client.responses.stream(model=MODEL, input="hello there") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "echo: hello there"


@case("create and stream: an image")
def image(client, port):
    content = [{"type": "input_text", "text": "what is this"},
               {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}]
    resp = raw_create(client, model=MODEL, input=[{"role": "user", "content": content}])
    assert resp.output_text == "echo: what is this [1 images]", resp.output_text
    events = raw_stream(port, {"model": MODEL, "input": [{"role": "user", "content": content}]})
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == \
        "echo: what is this [1 images]"


@case("function tool round trip with previous_response_id (create and stream)")
def tool_previous(client, port):
    first = raw_create(client, model=MODEL, input="weather in Paris?", tools=[WEATHER])
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] == "Paris"
    second = raw_create(client, model=MODEL, previous_response_id=first.id, tools=[WEATHER],
                        input=[{"type": "function_call_output", "call_id": call.call_id,
                                "output": "sunny"}])
    assert second.output_text == "tool result: sunny", second.output_text
    events = raw_stream(port, {"model": MODEL, "input": "weather?", "tools": [WEATHER]})
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done and json.loads(done[0]["arguments"])["city"] == "Paris"
    streamed = events[-1]["response"]
    call_id = next(i["call_id"] for i in streamed["output"] if i["type"] == "function_call")
    with client.responses.stream(model=MODEL, previous_response_id=streamed["id"],
                                 tools=[WEATHER], input=[{"type": "function_call_output",
                                                          "call_id": call_id,
                                                          "output": "rain"}]) as stream:
        assert stream.get_final_response().output_text == "tool result: rain"


@case("function tool round trip with the full input replayed")
def tool_replayed(client, port):
    asked = [{"role": "user", "content": "weather in Paris?"}]
    first = raw_create(client, model=MODEL, input=asked, tools=[WEATHER], store=False)
    (call,) = [item for item in first.output if item.type == "function_call"]
    replay = asked + [item.model_dump(exclude_none=True) for item in first.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": "cloudy"}]
    second = raw_create(client, model=MODEL, input=replay, tools=[WEATHER], store=False)
    assert second.output_text == "tool result: cloudy", second.output_text
    try:
        client.responses.retrieve(first.id)
        raise AssertionError("a response made with store=False was kept")
    except NotFoundError:
        pass


@case("text.format json_schema")
def json_schema(client, port):
    fmt = {"type": "json_schema", "name": "city", "strict": True, "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
        "additionalProperties": False}}
    resp = raw_create(client, model=MODEL, input="name a city", text={"format": fmt})
    assert resp.text.format.type == "json_schema" and resp.text.format.name == "city"
    events = raw_stream(port, {"model": MODEL, "input": "name a city", "text": {"format": fmt}})
    assert events[-1]["response"]["text"]["format"]["name"] == "city"


@case("retrieve, input_items, input_tokens, delete")
def stored(client, port):
    resp = raw_create(client, model=MODEL, input="keep me", metadata={"topic": "sdk"})
    got = client.responses.with_raw_response.retrieve(resp.id)
    doc = valid(Response, got.http_response.json())
    assert doc["id"] == resp.id and doc["metadata"] == {"topic": "sdk"}
    items = client.responses.input_items.with_raw_response.list(resp.id)
    listed = valid(ResponseItemList, items.http_response.json())
    assert listed["data"][0]["content"][0]["text"] == "keep me", listed
    count = client.responses.input_tokens.with_raw_response.count(model=MODEL, input="keep me")
    assert valid(InputTokenCountResponse, count.http_response.json())["input_tokens"] > 0
    client.responses.delete(resp.id)
    try:
        client.responses.retrieve(resp.id)
        raise AssertionError("a deleted response is still there")
    except NotFoundError:
        pass


@case("MCP tools (stream and not) and an approval round trip")
def mcp(client, port):
    # The fake calls the first tool it is offered, t__weather, with {"city": "Paris", ...}.
    tool = {"type": "mcp", "server_label": "t", "allowed_tools": ["weather"],
            "require_approval": "never"}
    resp = raw_create(client, model=MODEL, input="weather?", tools=[tool])
    kinds = [item.type for item in resp.output]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"], kinds
    assert resp.output[1].name == "weather" and "Paris" in resp.output[1].output, resp.output[1]
    events = raw_stream(port, {"model": MODEL, "input": "weather?", "tools": [tool]})
    assert "response.mcp_call.completed" in [e["type"] for e in events]
    ask = dict(tool, require_approval="always")
    first = raw_create(client, model=MODEL, input="weather?", tools=[ask])
    (request,) = [item for item in first.output if item.type == "mcp_approval_request"]
    second = raw_create(client, model=MODEL, tools=[ask], previous_response_id=first.id,
                        input=[{"type": "mcp_approval_response", "approve": True,
                                "approval_request_id": request.id}])
    (call,) = [item for item in second.output if item.type == "mcp_call"]
    assert call.approval_request_id == request.id and "Paris" in call.output, call
    assert second.output_text.startswith("tool result: "), second.output_text


@case("openai-agents: an agent with a function tool runs to its final output")
def agent(client, port):
    from agents import (Agent, OpenAIResponsesModel, Runner, function_tool,
                        set_tracing_disabled)
    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: str, unit: str) -> str:
        """The weather of a city."""
        calls.append((city, unit))
        return f"22 degrees {unit} in {city}"

    model = OpenAIResponsesModel(model=MODEL, openai_client=AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY))
    agent = Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather],
                  model=model)

    async def both():
        result = await Runner.run(agent, "What is the weather in Paris?")
        run = Runner.run_streamed(agent, "And in Paris again?")
        async for _ in run.stream_events():
            pass
        return result.final_output, run.final_output
    final, streamed = asyncio.run(both())
    assert calls == [("Paris", "celsius")] * 2, calls
    assert final == streamed == "tool result: 22 degrees celsius in Paris", (final, streamed)


def main():
    work = tempfile.mkdtemp(prefix="llmhost-sdk-")
    upstream_port, port = free_port(), free_port()
    fake = subprocess.Popen([PYTHON, os.path.join(REPO, "test_llmhost.py"),
                             "fake-upstream", str(upstream_port), MODEL],
                            stdout=subprocess.DEVNULL)
    registry = os.path.join(work, "servers.json")
    with open(registry, "w") as f:
        json.dump({"version": 1, "servers": [{"name": "fake", "models": [MODEL],
                                              "url": f"http://127.0.0.1:{upstream_port}/v1"}],
                   "mcpServers": {"t": {"command": PYTHON, "args": [
                       os.path.join(REPO, "test_llmhost.py"), "mcp-server", "stdio"]}}}, f)
    serve = subprocess.Popen([PYTHON, os.path.join(REPO, "llmhost.py"), "serve",
                              "--port", str(port), "--api-key", KEY, "--no-access-log"],
                             env=dict(os.environ, LLMHOST_REGISTRY=registry))
    checks = (text_create, text_stream, image, tool_previous, tool_replayed, json_schema, stored,
              mcp, agent)
    try:
        wait_for(f"http://127.0.0.1:{upstream_port}/health", fake)
        wait_for(f"http://127.0.0.1:{port}/health", serve)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY)
        for check in checks:
            check(client, port)
    finally:
        for proc in (serve, fake):
            proc.terminate()
            proc.wait(10)
    print(f"validated {checked['objects']} objects and {checked['events']} stream events "
          "against the SDK's types")
    print(f"{len(checks) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
