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
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from serve_fakes import CLOTHES, FakeModel, serving  # noqa: E402

from mnistlab.deploy.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent  # the config names its hooks file from here


@pytest.fixture(scope="module")
def server():
    app = create_app({"fake-digits": FakeModel(),
                      "fake-clothes": FakeModel(CLOTHES, "fashion-mnist", threshold=0.9, answer=8)})
    with serving(app) as url:
        yield url


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
