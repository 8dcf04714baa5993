"""tools/call latency through llmhost's /mcp/NAME against the backend directly, at each
protocol revision: the SDK's own client, one call at a time, on loopback. The backend is the
test file's streamable-HTTP MCP server (the SDK's MCPServer under uvicorn); llmhost runs as
`serve` would, in a process of its own. What is compared is the same client's round trip, so
the difference is what llmhost adds (a hop over loopback, parsing, the hub's session).

Usage: python3 .ci/bench_mcp.py [CALLS]        (default 300 calls per case, after 30 warm-up)
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def measure(url, mode, calls, warmup=30):
    from mcp import Client
    async with Client(url, mode=mode) as c:
        for _ in range(warmup):
            await c.call_tool("echo", {"text": "warm"})
        times = []
        for i in range(calls):
            t0 = time.perf_counter()
            r = await c.call_tool("echo", {"text": f"call {i}"})
            times.append((time.perf_counter() - t0) * 1000)
            assert r.content[0].text == f"call {i}", r
        return c.protocol_version, times


def serve_in_front(name, port):
    """`serve` with one registered MCP server, NAME, the HTTP one on 127.0.0.1:PORT (a temp
    registry) -> (its process, its port)."""
    registry = os.path.join(tempfile.mkdtemp(prefix="llmhost-bench-mcp-"), "servers.json")
    with open(registry, "w") as f:
        json.dump({"version": 1, "servers": [], "mcpServers": {
            name: {"url": f"http://127.0.0.1:{port}/mcp"}}}, f)
    gateway_port = free_port()
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "llmhost.py"), "--registry",
                             registry, "serve", "--port", str(gateway_port), "--no-discover",
                             "--no-access-log", "--log-level", "warning"]), gateway_port


def main():
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    backend = subprocess.Popen([sys.executable, os.path.join(ROOT, "test_llmhost.py"),
                                "mcp-server", "http"], stdout=subprocess.PIPE, text=True)
    port = int(backend.stdout.readline().split()[1])
    serve, gateway_port = serve_in_front("h", port)
    try:
        wait_port(gateway_port, serve)
        rows = []
        for mode in ("legacy", "auto"):
            for where, url in (("direct", f"http://127.0.0.1:{port}/mcp"),
                               ("llmhost /mcp/h", f"http://127.0.0.1:{gateway_port}/mcp/h")):
                version, times = asyncio.run(measure(url, mode, calls))
                rows.append((version, where, percentile(times, 50), percentile(times, 99)))
        print(f"tools/call 'echo', {calls} calls each, one at a time (SDK client, loopback)")
        print(f"{'revision':<12} {'path':<16} {'p50 ms':>8} {'p99 ms':>8}")
        for version, where, p50, p99 in rows:
            print(f"{version:<12} {where:<16} {p50:8.2f} {p99:8.2f}")
        for i in range(0, len(rows), 2):
            print(f"{rows[i][0]}: llmhost adds {rows[i + 1][2] - rows[i][2]:+.2f} ms at p50, "
                  f"{rows[i + 1][3] - rows[i][3]:+.2f} ms at p99")
    finally:
        serve.terminate()
        backend.terminate()
        serve.wait(10)
        backend.wait(10)


if __name__ == "__main__":
    main()
