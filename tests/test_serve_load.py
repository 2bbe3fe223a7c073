"""A short load mix against a real `mnistlab serve` process (one worker and two): many connections posting valid
pictures, malformed and damaged bodies, bodies over the limit, and clients that send a byte a second, while
/healthz is asked every 0.25 s. No 5xx, every valid picture answered with the class it gets alone, /healthz
answering throughout, each bad request a 4xx. The mix is bench/serve_load.py's (`--mix 60` is the long run)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from conftest import train_digits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["serve_load"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    return train_digits(tmp_path_factory.mktemp("load"), "--model", "mlp", "--epochs", "2")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_load_mix_gets_no_5xx_every_valid_picture_answered_right_and_healthz_throughout(bench, digits_run, workers):
    pngs, expected = bench.pictures(str(digits_run), n=24, side=140)
    port = bench.free_port()
    command = [sys.executable, "-m", "mnistlab", "serve", str(digits_run), "--port", str(port), "--workers",
               str(workers), "--max-upload-mb", "0.25", "--read-timeout", "2"]
    with bench.running(command, port) as server:
        result = bench.load_mix(port, 6.0, pngs, expected, connections=24, max_upload=2**18, slow_clients=2)
        assert server.poll() is None
    kinds = {kind for kind, _ in result.counts}
    assert kinds == {"valid", "malformed", "damaged", "oversized", "json", "slow"}, result.counts
    assert result.server_errors == 0, result.counts
    assert result.counts[("valid", 200)] > 20 and result.wrong == 0 and result.unanswered == 0, result.counts
    assert result.health_checks >= 10 and result.health_failures == 0
    for (kind, status), n in result.counts.items():
        if kind in ("malformed", "damaged", "json"):
            assert status in (415, 422), (kind, status, n)
        elif kind == "oversized":
            assert status == 413, (kind, status, n)
        elif kind == "slow":  # given up on after --read-timeout: 408, never a hang or a 5xx
            assert status == 408, (kind, status, n)


@pytest.mark.slow
def test_workers_2_runs_two_server_processes(digits_run, bench):
    """--workers 2: two worker processes under uvicorn's supervisor, each building the app by its import string."""
    port = bench.free_port()
    command = [sys.executable, "-m", "mnistlab", "serve", str(digits_run), "--port", str(port), "--workers", "2"]
    with bench.running(command, port) as server:
        children = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
        workers = [pid for pid in children
                   if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        assert len(workers) == 2, children


def test_a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closed():
    import anyio

    from mnistlab.deploy.serve.app import LimitBody

    async def app(scope, receive, send):  # reads the whole body, as the predict route does
        while (await receive()).get("more_body"):
            pass
        raise AssertionError("the body never completes")

    async def trickle():  # one byte, then nothing more
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b"\x89", "more_body": True}
        await anyio.sleep(60)

    sent, answer = [], []

    async def send(message):
        answer.append(message)

    scope = {"type": "http", "headers": [(b"content-type", b"image/png")]}
    anyio.run(lambda: LimitBody(app, read_timeout=0.05)(scope, trickle, send))
    assert answer[0]["status"] == 408 and (b"connection", b"close") in answer[0]["headers"]


def test_the_serve_help_states_the_settings_defaults(capsys):
    """The flags default to None and ServeSettings fills them in: the help's "(default: N)" must say the same."""
    import re

    from mnistlab.cli import main
    from mnistlab.deploy.serve.server import ServeSettings

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())
    defaults = ServeSettings(run_dirs=[])
    for flag, value in [("--workers", defaults.workers), ("--max-batch", defaults.max_batch),
                        ("--keep-alive", defaults.keep_alive), ("--read-timeout", defaults.read_timeout)]:
        said = re.search(re.escape(flag) + r" \S+ .*?\(default: ([0-9.]+)", text)
        assert said and float(said.group(1)) == value, (flag, value)


def test_cpu_seconds_counts_a_process_tree_and_only_its_work(bench):
    """The bench's CPU-per-request column: a child that burns 0.3 s of CPU under a parent that sleeps is counted
    in the parent's tree (both its descendants and itself), and an idle tree adds next to nothing."""
    import os
    import time

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        while len(bench.process_tree(parent.pid)) < 2 or bench.cpu_seconds(parent.pid) < 0.3:
            assert time.monotonic() < deadline, (bench.process_tree(parent.pid), bench.cpu_seconds(parent.pid))
            time.sleep(0.1)
        assert bench.process_tree(parent.pid)[0] == parent.pid
        before = bench.cpu_seconds(parent.pid)
        time.sleep(0.5)  # both now sleep
        assert bench.cpu_seconds(parent.pid) - before < 0.05
        assert bench.cpu_seconds(os.getpid()) > 0  # this process has worked: its own time is there too
    finally:
        for pid in bench.process_tree(parent.pid)[::-1]:
            os.kill(pid, 9)
        parent.wait()
