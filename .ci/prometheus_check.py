"""GET /metrics checked by Prometheus' own tools (run by .ci/prometheus-check): `serve` in front
of the test file's fake upstream, requests of each kind, then `promtool check metrics` on the
exposition, then a real Prometheus (1 s scrapes, loopback) scraping llmhost while requests run,
and PromQL for the request rate per model and the p95 time to first byte of streams."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
sys.path.insert(0, ROOT)
import test_llmhost as t  # noqa: E402  (its FakeUpstream: usage, streams)

KEY = "prom-check-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, path, body=None, key=KEY):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if body else "GET",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_port(port, proc):
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"exited early: {proc.communicate()[1]}")
            time.sleep(0.05)
    sys.exit(f"port {port} never opened")


def traffic(port, until):
    chat = dict(t.CHAT)
    while time.monotonic() < until:
        call(port, "/v1/chat/completions", chat)
        call(port, "/v1/chat/completions", dict(chat, stream=True))
        call(port, "/v1/chat/completions", dict(chat, model="nope"))
        call(port, "/v1/models")
        time.sleep(0.02)


SCRAPE_MODELS = 60  # each model's requests make ~20 series (a counter, a histogram, tokens)
SCRAPE_BUDGET_MS = 10.0


def scrape_timing(port, models):
    """A scrape of 1,000 series or more answers in under SCRAPE_BUDGET_MS (the median of 50,
    over one keep-alive connection, as Prometheus scrapes)."""
    import http.client
    import statistics
    for model in models:
        call(port, "/v1/chat/completions", dict(t.CHAT, model=model))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        text = resp.read().decode()
        times.append((time.perf_counter() - start) * 1000)
        assert resp.status == 200, text[:200]
    conn.close()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    times.sort()
    median = statistics.median(times)
    print(f"scrape of {series} series: median {median:.2f} ms, p90 {times[44]:.2f} ms, "
          f"max {times[-1]:.2f} ms (50 scrapes)")
    if series < 1000 or median >= SCRAPE_BUDGET_MS:
        sys.exit(f"want >= 1000 series in under {SCRAPE_BUDGET_MS} ms")


def main():
    work = tempfile.mkdtemp(prefix="llmhost-prom-")
    fake = t.FakeUpstream()
    many = [f"model-{i}" for i in range(SCRAPE_MODELS)]  # (for the scrape timing: series)
    registry = t.write_registry(os.path.join(work, "servers.json"),
                                [{"name": "local", "url": fake.url, "models": ["fake-model"]},
                                 {"name": "many", "url": fake.url, "models": many}])
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(ROOT, "llmhost.py"),
                              "--registry", registry, "serve", "--port", str(port), "--api-key",
                              KEY, "--no-discover", "--no-access-log"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prom = None
    try:
        wait_port(port, serve)
        traffic(port, time.monotonic() + 1)
        status, text = call(port, "/metrics")
        assert status == 200, text
        check = subprocess.run(["promtool", "check", "metrics"], input=text,
                               capture_output=True)
        print("promtool check metrics:", check.returncode,
              (check.stdout + check.stderr).decode().strip() or "no problem")
        if check.returncode != 0:
            sys.exit(1)
        scrape_timing(port, many)
        if not shutil.which("prometheus"):
            print("prometheus not installed: scrape check skipped")
            return
        with open(os.path.join(work, "key"), "w") as f:
            f.write(KEY)
        with open(os.path.join(work, "prometheus.yml"), "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: llmhost
    authorization:
      credentials_file: {work}/key
    static_configs:
      - targets: ["127.0.0.1:{port}"]
""")
        prom_port = free_port()
        prom = subprocess.Popen(["prometheus", f"--config.file={work}/prometheus.yml",
                                 f"--storage.tsdb.path={work}/data",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_port(prom_port, prom)
        threading.Thread(target=traffic, args=(port, time.monotonic() + 12), daemon=True).start()
        time.sleep(12)

        def query(q):
            url = (f"http://127.0.0.1:{prom_port}/api/v1/query?" +
                   urllib.parse.urlencode({"query": q}))
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.load(resp)["data"]["result"]
        up = query('up{job="llmhost"}')
        assert up and up[0]["value"][1] == "1", up
        rate = query("sum by (model) (rate(llmhost_requests_total[5s]))")
        print("request rate per model:", {r["metric"].get("model", ""): r["value"][1]
                                          for r in rate if float(r["value"][1])})
        assert {"fake-model", "unknown"} <= {r["metric"].get("model") for r in rate}, rate
        p95 = query("histogram_quantile(0.95, sum by (le, model) "
                    "(rate(llmhost_stream_first_byte_seconds_bucket[5s])))")
        print("p95 time to first byte of streams:", [(r["metric"], r["value"][1]) for r in p95])
        assert p95 and p95[0]["value"][1] not in ("NaN", ""), p95
        print("ok")
    finally:
        for proc in (prom, serve):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        fake.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
