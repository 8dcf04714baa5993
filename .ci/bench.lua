-- wrk script for .ci/bench: POST an OpenAI request and print one parseable result line.
-- env BENCH_MODEL: model name; BENCH_KIND: chat | stream | emb (the URL path picks the endpoint)
local model = os.getenv("BENCH_MODEL") or "bench-json"
local kind = os.getenv("BENCH_KIND") or "chat"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
if kind == "emb" then
  wrk.body = '{"model":"' .. model .. '","input":"hello world"}'
else
  wrk.body = '{"model":"' .. model .. '","max_tokens":20,'
    .. '"messages":[{"role":"user","content":"Say hello"}]'
    .. (kind == "stream" and ',"stream":true' or '') .. '}'
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d rps=%.1f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f max_ms=%.3f "
      .. "sock_errors=%d status_errors=%d\n",
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    e.connect + e.read + e.write + e.timeout, e.status))
end
