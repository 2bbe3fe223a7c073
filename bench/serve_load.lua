-- wrk posts one picture file as the body of every request, and prints its figures as one JSON line.
--   wrk -t1 -c32 -d10s -s bench/serve_load.lua http://127.0.0.1:8000/api/predict -- picture.png [image/png]
-- bench/serve_load.py runs it; the request is built once per wrk thread (a static request: no Lua per call).

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = args[2] or "image/png"
end

function done(summary, latency, requests)
  local e = summary.errors
  -- latency is in microseconds, duration too; status counts answers outside 200-399
  io.write(string.format('{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, '
    .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, e.connect, e.read, e.write, e.status, e.timeout))
end
