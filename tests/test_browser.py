"""The drawing page in a real browser: Debian's chromium driven by Playwright, against uvicorn on
127.0.0.1 started and stopped by the test. Draw a digit stroke by stroke, see a prediction and the
28x28 view appear, clear, see them go. Skipped where chromium or Playwright is not installed
(.ci/run installs both).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# a closed network: no background connections, no component updates (env/machines: Chromium flags)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def browser_ready() -> None:
    pytest.importorskip("playwright.sync_api")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A trained digits CNN under uvicorn on 127.0.0.1."""
    browser_ready()
    from serve_fakes import serving

    from mnistlab.cli import main
    from mnistlab.deploy.serve.app import create_app
    from mnistlab.deploy.serve.server import load_models

    run = tmp_path_factory.mktemp("served") / "digits-cnn"
    assert main(["train", "--dataset", "digits", "--epochs", "8", "--threads", "1", "--run-dir", str(run)]) == 0
    with serving(create_app(load_models([str(run)]))) as url:
        yield url


def canvas_ink(page, selector: str) -> int:
    """How many pixels of a canvas differ from its top-left (background) pixel."""
    return page.evaluate("""(sel) => {
        const c = document.querySelector(sel); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) {
            if (Math.abs(d[i] - d[0]) + Math.abs(d[i+1] - d[1]) + Math.abs(d[i+2] - d[2]) > 30) n++; }
        return n; }""", selector)


def test_draw_a_digit_see_the_prediction_clear_it(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    errors, foreign = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(server) else foreign.append(r.url))
            page.goto(server)
            expect(page.locator("#model")).not_to_be_empty()
            expect(page.locator("h1")).to_have_text("Draw a digit")
            box = page.locator("#canvas").bounding_box()
            x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]

            def stroke(points):
                page.mouse.move(x0 + points[0][0] * w, y0 + points[0][1] * h)
                page.mouse.down()
                for fx, fy in points[1:]:
                    page.mouse.move(x0 + fx * w, y0 + fy * h, steps=12)
                page.mouse.up()

            stroke([(0.28, 0.22), (0.72, 0.22), (0.45, 0.82)])  # a 7: the bar, then the stem
            expect(page.locator("#prediction")).to_contain_text("7", timeout=10_000)
            assert canvas_ink(page, "#canvas") > 500 and canvas_ink(page, "#view") > 10
            expect(page.locator("#probs")).to_contain_text("%")
            page.screenshot(path=str(tmp_path / "drawn.png"), animations="disabled")
            if os.environ.get("MNISTLAB_SCREENSHOT"):
                shutil.copy(tmp_path / "drawn.png", os.environ["MNISTLAB_SCREENSHOT"])
            page.click("#clear")
            expect(page.locator("#prediction")).not_to_contain_text("7", timeout=5_000)
            assert canvas_ink(page, "#canvas") == 0 and canvas_ink(page, "#view") == 0
            page.screenshot(path=str(tmp_path / "cleared.png"), animations="disabled")
        finally:
            browser.close()
    assert not errors, errors
    assert not foreign, foreign  # no CDN, no network beyond the server
    assert Path(tmp_path / "drawn.png").stat().st_size > 10_000


def test_the_heading_asks_for_clothing_when_a_clothing_model_is_served(tmp_path):
    """The page's heading and title follow /api/models: "Draw a digit" over a clothing model was a defect."""
    browser_ready()
    from playwright.sync_api import expect, sync_playwright
    from serve_fakes import CLOTHES, FakeModel, serving

    from mnistlab.deploy.serve.app import create_app

    with serving(create_app({"fashion-cnn": FakeModel(CLOTHES, "fashion-mnist", answer=8)})) as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url)
            expect(page.locator("h1")).to_have_text("Draw a piece of clothing")
            expect(page).to_have_title("mnistlab: draw a piece of clothing")
            expect(page.locator("#probs")).to_contain_text("Ankle boot")
            box = page.locator("#canvas").bounding_box()
            page.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + 0.3 * box["height"])
            page.mouse.down()
            page.mouse.move(box["x"] + 0.7 * box["width"], box["y"] + 0.7 * box["height"], steps=12)
            page.mouse.up()
            expect(page.locator("#prediction")).to_contain_text("Bag", timeout=10_000)
            page.screenshot(path=str(tmp_path / "clothing.png"), animations="disabled")
            if os.environ.get("MNISTLAB_CLOTHING_SCREENSHOT"):
                shutil.copy(tmp_path / "clothing.png", os.environ["MNISTLAB_CLOTHING_SCREENSHOT"])
        finally:
            browser.close()
    assert (tmp_path / "clothing.png").stat().st_size > 10_000


def test_the_api_docs_render_offline(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    foreign = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: None if r.url.startswith(server) else foreign.append(r.url))
            page.goto(server + "/docs")
            expect(page.locator(".swagger-ui")).to_contain_text("/api/predict", timeout=10_000)
            page.screenshot(path=str(tmp_path / "docs.png"))
        finally:
            browser.close()
    assert not foreign, foreign  # Swagger UI from the package, not a CDN


def test_the_report_opens_from_disk_without_errors_or_requests(tmp_path):
    """A run's report in chromium from file://: no console error, no request but the file itself, and a
    screenshot that is not blank (many distinct colours, not one background)."""
    pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from mnistlab.cli import main

    run = tmp_path / "digits-cnn"
    assert main(["train", "--dataset", "digits", "--epochs", "3", "--threads", "1", "--run-dir", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    url = (run / "report.html").as_uri()
    errors, foreign = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url == url or r.url.startswith("data:") else foreign.append(r.url))
            page.goto(url)
            page.wait_for_load_state("load")
            broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            if os.environ.get("MNISTLAB_REPORT_SCREENSHOT"):
                shutil.copy(tmp_path / "report.png", os.environ["MNISTLAB_REPORT_SCREENSHOT"])
        finally:
            browser.close()
    assert not errors, errors
    assert not foreign, foreign
    assert broken == 0
    shot = Image.open(tmp_path / "report.png").convert("RGB")
    assert shot.height > 2000  # every section laid out, not an error page
    assert len(shot.getcolors(maxcolors=1 << 20) or []) > 200  # figures drawn, not a blank page
