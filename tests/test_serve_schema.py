"""`schemathesis run --checks all` against the served app's own OpenAPI schema, as the CLI runs it: every
request it generates must get a documented status with a documented body (no 5xx), schema-valid ones must
be accepted and invalid ones refused. The app serves fake models (serve_fakes.py): the HTTP layer is under
test, not a trained run. Bounded: a fixed seed, 40 examples per operation and phase, a timeout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from serve_fakes import CLOTHES, FakeModel  # noqa: E402

from mnistlab.deploy.serve.app import create_app  # noqa: E402
from mnistlab.deploy.serve.server import bind  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent  # the config names its hooks file from here


@pytest.fixture(scope="module")
def server():
    """The app on a free loopback port, in a thread (uvicorn on a socket bound as `mnistlab serve` binds it)."""
    app = create_app({"fake-digits": FakeModel(),
                      "fake-clothes": FakeModel(CLOTHES, "fashion-mnist", threshold=0.9, answer=8)})
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_schemathesis_with_every_check_finds_nothing(server):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if cli is None:
        pytest.skip("the schemathesis command is not installed")
    run = subprocess.run([cli, "--config-file", "tests/schemathesis.toml", "run", f"{server}/openapi.json",
                          "--checks", "all", "--max-examples", "40", "--seed", "0", "--workers", "1"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_COLOR="1"), cwd=ROOT)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", report).groups())
    assert generated == passed >= 100, report[-3000:]
