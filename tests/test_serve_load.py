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


# a process that burns `seconds` of CPU, in user and in system time (reading /dev/zero copies in the kernel),
# prints what os.times says it used, then sleeps; {child} is code it starts first (or nothing)
BURNER = """import os, subprocess, sys, time
{child}
zero = os.open("/dev/zero", os.O_RDONLY)
while sum(os.times()[:2]) < {seconds}:
    os.read(zero, 1 << 20)
    sum(i * i for i in range(20000))
print(sum(os.times()[:2]), flush=True)
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_cpu_seconds_counts_a_process_and_its_descendants_and_nothing_while_they_sleep(bench):
    """The bench's CPU-per-request column: a parent that burns 0.2 s of CPU and a child that burns 0.3 s (user and
    system time both) are counted as each says it used, the child under its parent, and nothing more while both
    sleep."""
    import os
    import time

    child = BURNER.format(child="", seconds=0.3)
    start = f"kid = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, text=True)"
    parent = subprocess.Popen([sys.executable, "-c", BURNER.format(child=start, seconds=0.2)],
                              stdout=subprocess.PIPE, text=True)
    try:
        parent_used = float(parent.stdout.readline())
        tree = []
        deadline = time.monotonic() + 60
        while len(tree) < 2:
            assert time.monotonic() < deadline, tree
            tree = bench.process_tree(parent.pid)
            time.sleep(0.05)
        assert tree[0] == parent.pid
        kid = tree[1]
        while bench.cpu_seconds(kid) < 0.3:  # its burning done (it prints into a pipe nobody reads here)
            assert time.monotonic() < deadline, bench.cpu_seconds(kid)
            time.sleep(0.05)
        time.sleep(0.3)  # its last lines run, then it sleeps
        kid_used = bench.cpu_seconds(kid)
        assert 0.3 <= kid_used < 0.4
        both = bench.cpu_seconds(parent.pid)
        assert abs(both - (parent_used + kid_used)) < 0.06, (both, parent_used, kid_used)
        time.sleep(0.5)  # both asleep: nothing more
        assert bench.cpu_seconds(parent.pid) - both < 0.03
    finally:
        for pid in bench.process_tree(parent.pid)[::-1]:
            os.kill(pid, 9)
        parent.wait()
