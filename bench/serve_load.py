"""Load on `mnistlab serve`, measured with wrk beside a bare endpoint on the same stack, and the load mix.

    python bench/serve_load.py RUN_DIR [--seconds 10] [--connections 1,8,32,128] [--repeats 1]
                               [--servers bare,torch,torch-b1,onnxruntime,onnxruntime-b1] [--workers 1]
    python bench/serve_load.py RUN_DIR --in-process     # the same preprocessing and model, no HTTP
    python bench/serve_load.py RUN_DIR --mix 60          # 128 connections: valid, malformed, oversized, slow

Each server runs in its own process on a free 127.0.0.1 port: `mnistlab serve RUN_DIR` ("torch": the
defaults, batched; "-b1": --max-batch 1, every picture its own model call; "onnxruntime": --runtime
onnxruntime, which needs `mnistlab export RUN_DIR` first), or "bare": uvicorn with the same settings and
the same body-limit middleware, a POST /api/predict that reads the body and returns a constant. wrk
(apt: wrk) posts a 280x280 PNG of a test image (bench/serve_load.lua) for SECONDS at each connection
count, after a 2 s warm-up; the table gives requests/s, p50 and p99 latency, errors (socket errors plus
answers other than 2xx/3xx), and the server's resident memory (RSS, all its processes) after the load.
wrk runs on the same cores as the server (one wrk thread), so every figure is a floor.

--mix drives the server with 128 connections of Python asyncio clients: valid pictures (each answer checked
against the same picture predicted alone), malformed bodies, oversized bodies, and clients that send their
body a byte a second, while another client asks /healthz every 0.25 s. It prints the counts by kind and
status, the valid answers that were wrong or missing, the 5xx, and /healthz's slowest answer.
tests/test_serve_load.py runs the same mix for a few seconds (load_mix below).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request  # at the top: FastAPI reads the handler's annotation by name

HERE = Path(__file__).resolve().parent
LUA = HERE / "serve_load.lua"


# --- the pictures -------------------------------------------------------------------------------------------

def pictures(run_dir: str, n: int = 64, side: int = 280) -> tuple[list[bytes], list[int]]:
    """n test images of the run's dataset as side x side PNGs, dark ink on white as a person draws, and the
    index each gets when predicted alone (what the server must answer)."""
    import numpy as np
    import torch
    from PIL import Image

    from mnistlab.data.dataset import load_dataset
    from mnistlab.deploy.predict import Predictor
    from mnistlab.deploy.serve.inference import Picture, model_view

    predictor = Predictor.open(run_dir, warn_uncalibrated=False)
    ds = load_dataset(predictor.dataset, data_dir=predictor.meta["config"].get("data_dir"))
    pngs, expected = [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(255 - ds.test_images[i].numpy().astype(np.uint8)).resize(
            (side, side), Image.Resampling.BILINEAR).save(buf, "PNG")
        pngs.append(buf.getvalue())
        with torch.inference_mode():
            (answer,) = predictor.predict_prepared([("p", model_view(Picture("p", pngs[-1]), predictor.dataset))])
        expected.append(answer.index)
    return pngs, expected


# --- servers ------------------------------------------------------------------------------------------------

def bare_app():
    """The bare endpoint: FastAPI + the serve app's body-limit middleware, reading the body, answering a constant."""
    from fastapi import FastAPI

    from mnistlab.deploy.serve.app import LimitBody

    app = FastAPI()
    app.add_middleware(LimitBody)

    async def healthz() -> dict:
        return {"status": "ok"}

    async def predict(request: Request) -> dict:
        await request.body()
        return {"status": "ok", "label": "constant"}

    app.add_api_route("/healthz", healthz)
    app.add_api_route("/api/predict", predict, methods=["POST"])
    return app


def serve_bare(port: int, workers: int) -> None:
    """uvicorn as `mnistlab serve` runs it (server.uvicorn_config), serving bare_app."""
    import uvicorn

    from mnistlab.deploy.serve.server import ServeSettings, bind, serve_processes, uvicorn_config, worker_sockets

    settings = ServeSettings(run_dirs=[], workers=workers)
    sockets = worker_sockets(bind("127.0.0.1", port, reuse_port=workers > 1), workers)
    if workers == 1:
        uvicorn.Server(uvicorn_config(settings, bare_app())).run(sockets=sockets)
    else:
        serve_processes(uvicorn_config(settings, "serve_load:bare_app"), sockets)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    import http.client

    deadline = time.monotonic() + seconds
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {process.stderr.read() if process.stderr else ''}")
        time.sleep(0.2)


def server_command(kind: str, run_dir: str, port: int, workers: int, extra: list[str]) -> list[str]:
    if kind == "bare":
        return [sys.executable, str(HERE / "serve_load.py"), "--serve-bare", str(port), "--workers", str(workers)]
    runtime, _, batch = kind.partition("-")
    command = [sys.executable, "-m", "mnistlab", "serve", run_dir, "--port", str(port), "--workers", str(workers),
               "--runtime", runtime, *extra]
    return command + (["--max-batch", "1"] if batch == "b1" else [])


@contextmanager
def running(command: list[str], port: int):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_healthy(port, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants, alive now (Linux /proc)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:  # gone already
            continue
        tree.append(p)
        for task in tasks:  # a thread that ends meanwhile takes only its own children's listing with it
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return tree


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB (Linux /proc)."""
    total = 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        except (OSError, StopIteration):
            continue
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process and its descendants have used so far, seconds (Linux
    /proc): read before and after a load, it gives the server's own CPU per request, which wrk's figures do not
    separate from wrk's share of the same cores."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def wrk(url: str, picture: Path, connections: int, seconds: float) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(LUA), url, "--",
               str(picture), "image/png"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    result["errors"] = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    result["rps"] = result["requests"] / result["seconds"]
    return result


def measure(args: argparse.Namespace) -> None:
    """Every server started first (idle ones take no CPU), then the rows measured in rounds: in each round every
    connection count, and for each count every server one after the other. A slow spell of a shared machine then
    falls on the bare endpoint and on the others alike, and each round gives its own ratio to bare; the summary
    gives the medians over the rounds."""
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    pngs, _ = pictures(args.run_dir, n=1)
    connections = [int(c) for c in args.connections.split(",")]
    extra = args.serve_args.split() if args.serve_args else []
    kinds = args.servers.split(",")
    results: dict[tuple[str, int], list[dict]] = {(kind, c): [] for kind in kinds for c in connections}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        picture = Path(tmp) / "picture.png"
        picture.write_bytes(pngs[0])
        urls, pids = {}, {}
        for kind in kinds:
            port = free_port()
            urls[kind] = f"http://127.0.0.1:{port}/api/predict"
            pids[kind] = servers.enter_context(running(server_command(kind, args.run_dir, port, args.workers, extra),
                                                       port)).pid
            wrk(urls[kind], picture, 8, 2)  # warm-up: first calls, thread pools, allocator
        print("| round | server | workers | connections | requests/s | p50 ms | p99 ms | errors | CPU ms/request "
              "| RSS MiB |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for round_ in range(1, args.repeats + 1):
            for c in connections:
                for kind in kinds:
                    cpu = cpu_seconds(pids[kind])
                    r = wrk(urls[kind], picture, c, args.seconds)
                    r["cpu_ms"] = (cpu_seconds(pids[kind]) - cpu) / max(r["requests"], 1) * 1000
                    r["rss"] = rss_mib(pids[kind])
                    results[kind, c].append(r)
                    print(f"| {round_} | {kind} | {args.workers} | {c} | {r['rps']:,.0f} | {r['p50_ms']:.1f} "
                          f"| {r['p99_ms']:.1f} | {r['errors']} | {r['cpu_ms']:.2f} | {r['rss']:.0f} |", flush=True)
    print(f"\nmedians over {args.repeats} round(s); x bare: the median of each round's ratio to the bare endpoint; "
          "CPU ms/request: the server's own processes (user + system), wrk's excluded")
    print("| server | workers | connections | requests/s | x bare | p50 ms | p99 ms | errors | CPU ms/request "
          "| RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in kinds:
        for c in connections:
            rows = results[kind, c]
            ratio = ""
            if "bare" in kinds:
                ratios = [r["rps"] / b["rps"] for r, b in zip(rows, results["bare", c], strict=True)]
                ratio = f"{statistics.median(ratios):.3f}"
            rps, p50, p99, cpu = (statistics.median(r[key] for r in rows)
                                  for key in ("rps", "p50_ms", "p99_ms", "cpu_ms"))
            print(f"| {kind} | {args.workers} | {c} | {rps:,.0f} | {ratio} | {p50:.1f} | {p99:.1f} "
                  f"| {sum(r['errors'] for r in rows)} | {cpu:.2f} | {max(r['rss'] for r in rows):.0f} |")


# --- the same work without HTTP -----------------------------------------------------------------------------

def in_process(args: argparse.Namespace) -> None:
    """Decoding and preparing, the model alone, both as a server process does them, and the whole app over ASGI,
    in this process: per picture."""
    import torch

    from mnistlab.deploy.predict import Predictor
    from mnistlab.deploy.serve.inference import Picture, model_view
    from mnistlab.deploy.serve.server import one_thread_each

    one_thread_each()  # torch and BLAS on one thread, as in each server process
    pngs, _ = pictures(args.run_dir, n=64)
    options = dict(runtime=args.runtime) if args.runtime else {}
    predictor = Predictor.open(args.run_dir, warn_uncalibrated=False, **options)
    k = len(predictor.classes)

    def prepare(png: bytes):
        return model_view(Picture("p", png), predictor.dataset)

    def timed(label: str, fn, n: int, pictures_per_call: int = 1) -> None:
        fn(0)
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        per = (time.perf_counter() - t0) / n / pictures_per_call
        print(f"| {label} | {per * 1000:.2f} | {1 / per:,.0f} |", flush=True)

    views = [prepare(p) for p in pngs]
    print(f"| step (runtime {predictor.runtime if hasattr(predictor, 'runtime') else 'torch'}) "
          "| ms per picture | pictures/s |")
    print("|---|---:|---:|")
    timed("decode + prepare a 280x280 PNG, one thread", lambda i: prepare(pngs[i % 64]), 400)
    with torch.inference_mode():
        timed("model, batch of 1", lambda i: predictor.predict_prepared([("p", views[i % 64])], top_k=k), 400)
        timed("model, batches of 32 (per picture)",
              lambda i: predictor.predict_prepared([("p", v) for v in views[:32]], top_k=k), 100, 32)
    # what one server process does, without HTTP: callers on one event loop, each preparing its picture there and
    # awaiting the model through a LoopBatcher (inference.answer); then the same through the whole app over ASGI
    from mnistlab.deploy.serve.app import create_app
    from mnistlab.deploy.serve.inference import answer

    app = create_app({"m": predictor})
    served = app.state.served

    async def through(callers: int, n: int, via_app: bool) -> tuple[float, list[int]]:
        todo = iter(range(n))

        async def caller() -> None:
            for i in todo:
                if via_app:
                    await _asgi_post(app, pngs[i % 64])
                else:
                    await answer(predictor, Picture("p", pngs[i % 64]), served.limiter, served.batchers["m"])

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return (time.perf_counter() - t0) / n, served.batchers["m"].sizes

    for via_app, what in ((False, "prepare + model through the LoopBatcher, no HTTP"),
                          (True, "the whole app over ASGI in process (no sockets)")):
        for callers in (1, 32):
            asyncio.run(through(callers, 64, via_app))  # warm-up
            served.batchers["m"].sizes.clear()
            per, sizes = asyncio.run(through(callers, 1024, via_app))
            print(f"| {what}, {callers} concurrent (mean batch {statistics.mean(sizes or [1]):.1f}) "
                  f"| {per * 1000:.2f} | {1 / per:,.0f} |", flush=True)


async def _asgi_post(app, body: bytes) -> None:
    """POST body as image/png to /api/predict by calling the ASGI app directly: the app's own cost, no sockets."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/predict", "raw_path": b"/api/predict",
             "query_string": b"", "headers": [(b"content-type", b"image/png"),
                                              (b"content-length", str(len(body)).encode())],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
             "root_path": ""}
    await app(scope, receive, send)
    assert sent[0]["status"] == 200, sent


# --- the load mix -------------------------------------------------------------------------------------------

@dataclass
class MixResult:
    counts: Counter = field(default_factory=Counter)  # (kind, status or error name) -> requests
    wrong: int = 0  # valid pictures answered 200 with another class than alone
    unanswered: int = 0  # valid pictures with no 200 answer
    health_checks: int = 0
    health_failures: int = 0
    health_slowest_ms: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for (_, status), n in self.counts.items() if isinstance(status, int) and status >= 500)


async def _exchange(port: int, head: bytes, body: bytes, trickle: float = 0.0,
                    timeout: float = 30.0) -> tuple[int, bytes]:
    """One request on its own connection: (status, body); the body sent a byte every `trickle` seconds if set."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        if trickle:
            for i in range(len(body)):
                writer.write(body[i:i + 1])
                await writer.drain()
                try:  # the server may answer (408) before the body is in
                    head_in = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), trickle)
                    return int(head_in.split()[1]), b""
                except asyncio.TimeoutError:
                    continue
        else:
            writer.write(body)
            await writer.drain()
        async with asyncio.timeout(timeout):
            head_in = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head_in.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            return int(head_in.split()[1]), await reader.readexactly(length)
    finally:
        writer.close()


def _request(path: str, kind: str, body: bytes, length: int | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n").encode()


async def _load_mix(port: int, seconds: float, connections: int, pngs: list[bytes], expected: list[int],
                    max_upload: int, slow_clients: int) -> MixResult:
    result = MixResult()
    stop = time.monotonic() + seconds
    rng = random.Random(0)
    damaged = pngs[0][: len(pngs[0]) // 2]

    async def client(k: int) -> None:
        slow = k < slow_clients
        i = k
        while time.monotonic() < stop:
            i += connections
            if slow:  # headers at once, then the body a byte a second: the server gives up (408) or we stop
                kind = "slow"
                call = _exchange(port, _request("/api/predict", "image/png", pngs[0]), pngs[0], trickle=1.0)
            else:
                kind = rng.choices(["valid", "malformed", "damaged", "oversized", "json"], [70, 8, 8, 8, 6])[0]
                if kind == "valid":
                    png = pngs[i % len(pngs)]
                    call = _exchange(port, _request("/api/predict", "image/png", png), png)
                elif kind == "malformed":
                    junk = rng.randbytes(200)
                    call = _exchange(port, _request("/api/predict", "image/png", junk), junk)
                elif kind == "damaged":
                    call = _exchange(port, _request("/api/predict", "image/png", damaged), damaged)
                elif kind == "json":
                    call = _exchange(port, _request("/api/predict", "application/json", b"{\"pixels\": [1, 2"),
                                     b"{\"pixels\": [1, 2")
                else:  # declares more than the limit and starts sending it: refused on the header
                    call = _exchange(port, _request("/api/predict", "image/png", b"", length=max_upload + 1),
                                     b"\x89PNG\r\n\x1a\n" + bytes(4096))
            try:
                status, body = await call
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, TimeoutError) as e:
                status, body = type(e).__name__, b""
            result.counts[(kind, status)] += 1
            if kind == "valid":
                if status != 200:
                    result.unanswered += 1
                elif json.loads(body)["index"] != expected[i % len(pngs)]:
                    result.wrong += 1

    async def health() -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                status, _ = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                            b"", timeout=5)
                ok = status == 200
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, TimeoutError):
                ok = False
            result.health_checks += 1
            result.health_failures += not ok
            result.health_slowest_ms = max(result.health_slowest_ms, (time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.25)

    await asyncio.gather(health(), *(client(k) for k in range(connections)))
    return result


def load_mix(port: int, seconds: float, pngs: list[bytes], expected: list[int], connections: int = 128,
             max_upload: int = 8 * 2**20, slow_clients: int = 4) -> MixResult:
    """The mix against a server on 127.0.0.1:port for `seconds` (each client finishes its last request)."""
    return asyncio.run(_load_mix(port, seconds, connections, pngs, expected, max_upload, slow_clients))


def mix(args: argparse.Namespace) -> None:
    pngs, expected = pictures(args.run_dir, n=64)
    port = free_port()
    extra = args.serve_args.split() if args.serve_args else []
    command = server_command("torch", args.run_dir, port, args.workers, extra)
    with running(command, port) as server:
        t0 = time.monotonic()
        r = load_mix(port, args.mix, pngs, expected, connections=128)
        elapsed = time.monotonic() - t0
        rss = rss_mib(server.pid)
    total = sum(r.counts.values())
    print(f"load mix: 128 connections for {args.mix:g} s ({elapsed:.0f} s with the last answers), {total:,} requests,"
          f" server RSS {rss:.0f} MiB")
    for (kind, status), n in sorted(r.counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"  {kind:9} {status!s:22} {n:7,}")
    print(f"5xx: {r.server_errors}; valid pictures answered wrongly: {r.wrong}, unanswered: {r.unanswered}; "
          f"/healthz: {r.health_checks} checks, {r.health_failures} failed, slowest {r.health_slowest_ms:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=1, help="rounds over every server and connection count")
    ap.add_argument("--connections", default="1,8,32,128")
    ap.add_argument("--servers", default="bare,torch,torch-b1")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--serve-args", default="", help="more `mnistlab serve` flags, e.g. '--keep-alive 30'")
    ap.add_argument("--runtime", help="--in-process: the runtime to open the run with")
    ap.add_argument("--in-process", action="store_true")
    ap.add_argument("--mix", type=float, metavar="SECONDS")
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare:
        return serve_bare(args.serve_bare, args.workers)
    if not args.run_dir:
        ap.error("RUN_DIR is needed")
    sys.path.insert(0, str(HERE))
    from common import machine_line

    print(machine_line())
    if args.in_process:
        in_process(args)
    elif args.mix:
        mix(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
