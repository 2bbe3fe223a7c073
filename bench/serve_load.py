"""A bounded load test of `mnistlab serve` on 127.0.0.1: concurrent clients posting PNG digits.

    python bench/serve_load.py RUN_DIR [--clients 8] [--seconds 20]

Starts `mnistlab serve RUN_DIR` on a free loopback port in its own process, waits for /healthz,
then runs CLIENTS threads, each posting PNG pictures of the run's dataset test images to
/api/predict over one keep-alive connection, for SECONDS. Prints requests/s, p50 and p99 latency
and the number of errors (any status but 200), then stops the server. Loopback only, bounded in
time. The clients share the machine's cores with the server, so the figure is a floor.
"""

from __future__ import annotations

import argparse
import http.client
import io
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid

from common import machine_line


def pictures(run_dir: str, n: int = 64) -> list[bytes]:
    from PIL import Image

    from mnistlab.data.dataset import load_dataset
    from mnistlab.record import load_run_checkpoint

    _, meta = load_run_checkpoint(run_dir)
    ds = load_dataset(meta["config"]["dataset"], data_dir=meta["config"]["data_dir"])
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(255 - ds.test_images[i].numpy()).resize((140, 140)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def multipart(png: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    bodies = [multipart(p) for p in pictures(args.run_dir)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mnistlab", "serve", args.run_dir, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit(f"the server did not start: {server.stderr.read() if server.poll() is not None else ''}")
            time.sleep(0.2)
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def client(k: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            mine, i = [], k
            while time.monotonic() < stop_at:
                body, ctype = bodies[i % len(bodies)]
                i += args.clients
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/api/predict", body=body, headers={"Content-Type": ctype})
                    resp = conn.getresponse()
                    resp.read()
                    ok = resp.status == 200
                except OSError:
                    ok = False
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                mine.append(time.perf_counter() - t0)
                if not ok:
                    with lock:
                        errors[0] += 1
            with lock:
                latencies.extend(mine)

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
    finally:
        server.terminate()
        server.wait(timeout=10)
    lat = sorted(latencies)
    print(machine_line())
    print(f"{args.clients} clients, {elapsed:.1f} s: {len(lat)} requests, {len(lat) / elapsed:.0f} requests/s, "
          f"p50 {statistics.median(lat) * 1000:.1f} ms, p99 {lat[int(0.99 * (len(lat) - 1))] * 1000:.1f} ms, "
          f"errors {errors[0]}")


if __name__ == "__main__":
    main()
