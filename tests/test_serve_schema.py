"""Schemathesis against the running app's own OpenAPI schema: whatever it generates, no 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from mnistlab.deploy.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from fastapi.testclient import TestClient

    from mnistlab.cli import main

    run = tmp_path_factory.mktemp("schema") / "digits-mlp"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--threads", "1",
                 "--run-dir", str(run)]) == 0
    application = create_app([str(run)])
    with TestClient(application):  # runs the lifespan: the models are loaded
        yield application


def test_no_generated_request_gets_a_server_error(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, calls = [], {}
    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call()
            calls[(case.method, case.path)] = calls.get((case.method, case.path), 0) + 1
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))

        check()
    assert not failures, failures
    assert calls.get(("POST", "/api/predict"), 0) >= 20, calls  # the endpoint that parses input was exercised
