"""`mnistlab serve`: the JSON API and the page through FastAPI's TestClient, and the command itself.

The HTTP layer is tested in the quick loop against fake models (serve_fakes.FakeModel: shaped like a
Predictor, injected through create_app); a trained digits run is served end to end in the slow tests.
Every bad input gets its own test and must come back as a 4xx, never a 5xx.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from serve_fakes import CLOTHES, FakeModel  # noqa: E402

from mnistlab.cli import main  # noqa: E402
from mnistlab.deploy import preprocess  # noqa: E402
from mnistlab.deploy.serve import inference  # noqa: E402
from mnistlab.deploy.serve.app import MAX_JSON, MAX_UPLOAD, PREPARE_CALLS, create_app  # noqa: E402
from mnistlab.deploy.serve.server import is_loopback, run_server  # noqa: E402


@pytest.fixture(autouse=True)
def own_threads():
    """run_server sets this process's torch and BLAS threads to one, as a server process has them: each test gets
    back the counts it began with, so no later test runs on one thread by accident."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores every BLAS library's own count on leaving
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fakes():
    return {"fake-digits": FakeModel(), "fake-clothes": FakeModel(CLOTHES, "fashion-mnist", threshold=0.9, answer=8)}


@pytest.fixture(scope="module")
def client(fakes):
    with TestClient(create_app(fakes)) as c:
        yield c


def png_bytes(image: np.ndarray | Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format=fmt, **save)
    return buf.getvalue()


def drawn(image28: np.ndarray) -> bytes:
    """A 28x28 image as a person's drawing: 280x280, dark ink on white paper, as a PNG."""
    return png_bytes(Image.fromarray(255 - image28).resize((280, 280), Image.Resampling.BILINEAR))


def a_seven() -> np.ndarray:
    image = np.zeros((28, 28), dtype=np.uint8)
    image[6:9, 7:21] = 255  # the bar
    for row in range(9, 23):
        image[row, 19 - (row - 9) // 2 : 22 - (row - 9) // 2] = 255  # the stem, leaning left
    return image


@pytest.fixture(scope="module")
def phone_jpeg() -> bytes:
    """A 1600x1200 photo-like JPEG over 0.5 MB: a dark stroke on noisy grey paper (noise keeps it large)."""
    rng = np.random.default_rng(0)
    paper = rng.normal(190, 6, size=(1200, 1600)).clip(0, 255)
    paper[300:900, 760:840] = rng.normal(40, 6, size=(600, 80)).clip(0, 255)
    data = png_bytes(Image.fromarray(paper.astype(np.uint8)).convert("RGB"), "JPEG", quality=95)
    assert 500_000 < len(data) < MAX_UPLOAD, len(data)
    return data


def upload(client, data: bytes, name: str = "a.png", kind: str = "image/png", **params):
    return client.post("/api/predict", files={"file": (name, data, kind)}, params=params)


def assert_4xx(response, *codes):
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if codes:
        assert response.status_code in codes, (response.status_code, response.text)
    assert "detail" in response.json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what works ---------------------------------------------------------------------------------------------

def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models_lists_every_model_in_order_with_its_classes_and_threshold(client):
    r = client.get("/api/models")
    assert r.status_code == 200
    digits, clothes = r.json()
    assert digits == dict(name="fake-digits", dataset="digits", architecture="fake",
                          classes=[str(i) for i in range(10)], threshold=None, temperature=1.0)  # null, not a 500
    assert clothes["name"] == "fake-clothes" and clothes["classes"] == CLOTHES and clothes["threshold"] == 0.9


def test_a_drawn_png_upload_is_prepared_and_answered(client, fakes):
    r = upload(client, drawn(a_seven()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fake-digits" and body["path"] == "a.png" and body["status"] == "ok"
    assert body["label"] == "3" and body["probability"] == 0.5 and len(body["top"]) == 10
    assert body["top"][0] == dict(label="3", index=3, probability=0.5)
    assert len(body["image"]) == 784 and max(body["image"]) > 200  # the 28x28 view, ink found on the paper
    assert np.array_equal(np.array(body["image"]).reshape(28, 28), fakes["fake-digits"].seen[-1][1].image)


def test_a_raw_png_body_is_answered(client):
    r = client.post("/api/predict", content=drawn(a_seven()), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["path"] == "upload" and r.json()["label"] == "3"


def test_a_jpeg_upload_is_answered(client):
    jpeg = png_bytes(Image.fromarray(255 - a_seven()).resize((280, 280)), "JPEG")
    r = upload(client, jpeg, name="a.jpg", kind="image/jpeg")
    assert r.status_code == 200 and max(r.json()["image"]) > 200


def test_json_pixels_are_the_view_itself(client):
    pixels = a_seven().reshape(-1).tolist()
    r = client.post("/api/predict", json={"pixels": pixels})
    assert r.status_code == 200 and r.json()["image"] == pixels and r.json()["path"] == "pixels"


def test_a_phone_photo_of_half_a_megabyte_is_answered(client, phone_jpeg):
    """Defect: a 1600x1200 JPEG of ~0.6 MB got 413 (the 64 KiB body limit) while `mnistlab predict` read it."""
    for r in (upload(client, phone_jpeg, name="photo.jpg", kind="image/jpeg"),
              client.post("/api/predict", content=phone_jpeg, headers={"content-type": "image/jpeg"})):
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok" and max(r.json()["image"]) > 200


def test_a_phone_jpeg_is_decoded_reduced_in_grey(phone_jpeg, monkeypatch):
    seen = []
    real = preprocess.ink_from_grey  # the server decodes through preprocess.ink_from_image, which calls it
    monkeypatch.setattr(preprocess, "ink_from_grey", lambda grey: seen.append(grey.shape) or real(grey))
    inference.decode(phone_jpeg)
    assert seen == [(600, 800)]  # draft mode: 1/2 scale keeps both sides >= 512; never the full 1600x1200


def test_the_model_is_chosen_by_query_parameter_and_by_body_field(client):
    pixels = a_seven().reshape(-1).tolist()
    r = client.post("/api/predict", json={"pixels": pixels}, params={"model": "fake-clothes"})
    assert r.json()["label"] == "Bag"
    r = client.post("/api/predict", json={"pixels": pixels, "model": "fake-clothes"}, params={"model": "fake-digits"})
    assert r.json()["model"] == "fake-clothes"  # the body's field wins
    r = client.post("/api/predict", files={"file": ("a.png", drawn(a_seven()), "image/png")},
                    data={"model": "fake-clothes"})
    assert r.status_code == 200 and r.json()["model"] == "fake-clothes" and r.json()["status"] == "unsure"


def test_blank_png_is_answered_blank(client):
    r = upload(client, png_bytes(np.full((280, 280), 255, dtype=np.uint8)))
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "blank" and body["label"] is None and body["top"] == [] and max(body["image"]) == 0


def test_blank_pixels_are_answered_blank(client):
    r = client.post("/api/predict", json={"pixels": [0] * 784})
    assert r.status_code == 200 and r.json()["status"] == "blank"


def test_the_model_runs_under_inference_mode(fakes, client):
    client.post("/api/predict", json={"pixels": a_seven().reshape(-1).tolist()})
    assert fakes["fake-digits"].seen[-1][2] is True


def test_the_served_app_moves_its_objects_out_of_the_garbage_collectors_reach(untrained_run):
    """app_for freezes what is alive once the app is built (gc.freeze): a full collection no longer walks torch's
    and FastAPI's objects while requests wait."""
    import gc

    from mnistlab.deploy.serve.server import ServeSettings, app_for

    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        app_for(ServeSettings(run_dirs=[str(untrained_run)]))
        assert gc.get_freeze_count() > 10_000  # torch alone is tens of thousands of objects
    finally:
        gc.unfreeze()


def test_small_pictures_are_prepared_on_the_loop_and_large_ones_in_threads(monkeypatch):
    """A 280x280 drawing is prepared on the event loop's thread (no hand-over); a picture over INLINE_PIXELS in
    a worker thread, so that it does not hold up the other requests."""
    threads: list[str] = []
    prepare = inference.prepare_opened

    def watched(im, dataset):
        threads.append(threading.current_thread().name)
        return prepare(im, dataset)

    monkeypatch.setattr(inference, "prepare_opened", watched)
    side = int(inference.INLINE_PIXELS ** 0.5) + 1
    with TestClient(create_app({"fake": FakeModel()})) as c:
        assert upload(c, drawn(a_seven())).status_code == 200
        big = png_bytes(Image.fromarray(255 - a_seven()).resize((side, side), Image.Resampling.BILINEAR))
        assert upload(c, big).status_code == 200
        loop_thread = c.portal.call(lambda: threading.current_thread().name)
    assert threads[0] == loop_thread and threads[1] != loop_thread


def test_healthz_answers_while_large_pictures_are_being_prepared(monkeypatch):
    """Requests beyond the limiter wait for a thread without holding one, and /healthz runs on the event loop: 45
    large pictures held in preparation (a gate) leave /healthz answering at once."""
    import anyio

    gate, running, lock = threading.Event(), [0], threading.Lock()
    prepare = inference.prepare_opened

    def held(im, dataset):
        with lock:
            running[0] += 1
        gate.wait(10)
        return prepare(im, dataset)

    monkeypatch.setattr(inference, "prepare_opened", held)
    side = int(inference.INLINE_PIXELS ** 0.5) + 1
    big = png_bytes(Image.fromarray(255 - a_seven()).resize((side, side), Image.Resampling.BILINEAR))
    model = FakeModel()
    app = create_app({"fake": model})

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            async with anyio.create_task_group() as tasks:
                try:
                    for _ in range(45):
                        tasks.start_soon(lambda: http.post("/api/predict", content=big,
                                                           headers={"content-type": "image/png"}))
                    with anyio.fail_after(5):
                        while running[0] < PREPARE_CALLS:
                            await anyio.sleep(0.005)
                    with anyio.fail_after(2):
                        assert (await http.get("/healthz")).json() == {"status": "ok"}
                    assert running[0] == PREPARE_CALLS and not model.seen  # still saturated
                finally:
                    gate.set()

    anyio.run(scenario)
    assert len(model.seen) == 45


def test_page_is_served_with_its_ids_and_no_outside_urls(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element in ("heading", "canvas", "clear", "prediction", "probs", "view", "model"):
        assert f'id="{element}"' in r.text
    assert "Draw a digit</h1>" not in r.text  # the heading follows the served model (set from /api/models)
    assert not re.search(r"https?:", r.text), "the page must load nothing from elsewhere (no CDN)"
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_openapi_documents_every_request_format_and_error(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/api/predict"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "image/png", "image/jpeg", "application/json"}
    form = content["multipart/form-data"]
    assert form["encoding"] == {"file": {"contentType": "image/png, image/jpeg"}}
    assert form["schema"]["additionalProperties"] is False and set(form["schema"]["properties"]) == {"file", "model"}
    assert "8 MiB" in content["image/jpeg"]["schema"]["description"]
    assert {"200", "400", "404", "413", "415", "422"} <= set(post["responses"])
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictionOut")
    assert [(q["name"], q["in"], q["required"]) for q in post["parameters"]] == [("model", "query", False)]
    assert {"/healthz", "/api/models"} <= set(spec["paths"])


@pytest.mark.parametrize("kind", ["ok", "unsure", "blank", "pixels"])
def test_every_answer_is_exactly_a_prediction_out(client, kind):
    """/api/predict writes its JSON itself (app.prediction_json), not through FastAPI's response_model: each kind of
    answer must still be a PredictionOut, field for field, with nothing added and nothing that validation would
    have to convert."""
    from mnistlab.deploy.serve.app import PredictionOut

    if kind == "pixels":
        r = client.post("/api/predict", json={"pixels": a_seven().reshape(-1).tolist()})
    else:
        picture = np.full((280, 280), 255, np.uint8) if kind == "blank" else drawn(a_seven())
        r = upload(client, picture if kind != "blank" else png_bytes(picture),
                   model="fake-clothes" if kind == "unsure" else "fake-digits")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    body = r.json()
    assert body["status"] == ("ok" if kind == "pixels" else kind)
    assert list(body) == list(PredictionOut.model_fields)
    assert PredictionOut.model_validate_json(r.content, strict=True).model_dump(mode="json") == body


# --- bad input: a clear 4xx each, never a 5xx ---------------------------------------------------------------

@pytest.fixture(scope="module")
def small_limit():
    """A server that takes pictures up to 100 KiB."""
    with TestClient(create_app({"fake": FakeModel()}, max_upload=100 * 1024)) as c:
        yield c


def test_a_picture_over_the_upload_limit_is_413_naming_the_limit(client, small_limit):
    body = b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD)
    r = client.post("/api/predict", content=body, headers={"content-type": "image/png"})
    assert_4xx(r, 413)
    assert "8 MiB" in r.json()["detail"] and "--max-upload-mb" in r.json()["detail"]
    r = small_limit.post("/api/predict", content=body[: 101 * 1024], headers={"content-type": "image/jpeg"})
    assert_4xx(r, 413)
    assert "100 KiB" in r.json()["detail"]


def test_a_multipart_upload_over_the_limit_is_413(small_limit):
    assert_4xx(upload(small_limit, b"\x89PNG\r\n\x1a\n" + bytes(120 * 1024)), 413)


def test_a_chunked_picture_over_the_limit_without_content_length_is_413(small_limit):
    r = small_limit.post("/api/predict", content=iter([bytes(8 * 1024)] * 13), headers={"content-type": "image/png"})
    assert "content-length" not in r.request.headers
    assert_4xx(r, 413)


def test_json_over_64_kib_is_413_though_pictures_may_be_larger(client):
    body = b'{"pixels": [' + b"0," * 40_000 + b"0]}"
    r = client.post("/api/predict", content=body, headers={"content-type": "application/json"})
    assert int(r.request.headers["content-length"]) > MAX_JSON
    assert_4xx(r, 413)
    assert "64 KiB" in r.json()["detail"]


def test_chunked_json_over_64_kib_is_413(client):
    def chunks():
        yield b'{"pixels": ['
        for _ in range(20):
            yield b"0," * 2048

    assert_4xx(client.post("/api/predict", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_small_chunked_body_is_read(client):
    data = drawn(a_seven())
    r = client.post("/api/predict", content=iter([data[:100], data[100:]]), headers={"content-type": "image/png"})
    assert r.status_code == 200


def test_a_content_length_that_is_not_a_number_is_400(client):
    r = client.post("/api/predict", content=b"{}", headers={"content-type": "application/json", "content-length": "x"})
    assert_4xx(r, 400)


def test_a_multipart_body_that_does_not_parse_is_400(client):
    r = client.post("/api/predict", content=b"--b\r\nnot a part header\r\n",
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert_4xx(r, 400)


def test_gif_upload_is_refused(client):
    assert_4xx(upload(client, png_bytes(Image.new("L", (28, 28)), "GIF"), name="a.gif", kind="image/gif"), 415)


def test_bmp_upload_is_refused(client):
    assert_4xx(upload(client, png_bytes(Image.new("L", (28, 28)), "BMP"), name="a.bmp", kind="image/bmp"), 415)


def test_garbage_upload_is_refused(client):
    assert_4xx(upload(client, b"this is not a picture at all"), 415)


def test_damaged_png_is_422(client):
    good = png_bytes(np.zeros((280, 280), dtype=np.uint8))
    assert_4xx(upload(client, good[:40] + bytes(200)), 422)
    assert_4xx(upload(client, good[:8] + b"garbage after the signature"), 422)


def test_truncated_jpeg_is_422(client, phone_jpeg):
    r = upload(client, phone_jpeg[:2000], name="a.jpg", kind="image/jpeg")
    assert_4xx(r, 422)
    assert "BytesIO" not in r.json()["detail"]


def test_a_form_with_fields_beyond_file_and_model_is_refused(client):
    png = drawn(a_seven())
    assert_4xx(client.post("/api/predict", files={"file": ("a.png", png, "image/png")}, data={"colour": "red"}), 422)
    many = {f"f{i}": "x" for i in range(5)}  # past the parser's own cap: Starlette's 400, documented
    assert_4xx(client.post("/api/predict", files={"file": ("a.png", png, "image/png")}, data=many), 400)


def test_unsupported_content_type_is_415(client):
    assert_4xx(client.post("/api/predict", content=b"1,2,3", headers={"content-type": "text/csv"}), 415)


def test_form_without_a_file_is_422(client):
    assert_4xx(client.post("/api/predict", data={"model": "fake-clothes"}, files={"other": ("x", b"y")}), 422)


@pytest.mark.parametrize("pixels", [[0] * 783, [300] + [0] * 783, [-1] + [0] * 783], ids=["783", "300", "-1"])
def test_pixels_that_are_not_784_values_in_0_255_are_422(client, pixels):
    assert_4xx(client.post("/api/predict", json={"pixels": pixels}), 422)


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_non_finite_pixel_is_422(client, value):
    body = f'{{"pixels": [{value}' + ", 0" * 783 + "]}"  # Python's json would accept these: the API must not
    assert_4xx(client.post("/api/predict", content=body, headers={"content-type": "application/json"}), 422)


def test_malformed_json_is_422(client):
    r = client.post("/api/predict", content=b'{"pixels": [0, 0', headers={"content-type": "application/json"})
    assert_4xx(r, 422)


def test_unknown_model_is_404(client):
    assert_4xx(client.post("/api/predict", json={"pixels": [0] * 784}, params={"model": "nope"}), 404)
    assert_4xx(client.post("/api/predict", json={"pixels": [0] * 784, "model": "nope"}), 404)


def patched_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (the CRC fixed, so only the size is a lie)."""
    data = bytearray(png_bytes(np.zeros((4, 4), dtype=np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_huge_dimensions_are_refused_before_decoding(client):
    assert_4xx(upload(client, patched_png(100_000, 100_000)), 413)


@pytest.mark.parametrize("width, height", [(4097, 10), (10, 4097)])
def test_dimensions_over_4096_a_side_are_refused(client, width, height):
    r = upload(client, patched_png(width, height))
    assert_4xx(r, 413)
    assert "4096" in r.json()["detail"]


def test_4096_a_side_passes_the_size_check(client):
    assert_4xx(upload(client, patched_png(4096, 4096)), 422)  # past the size check; then damaged (4x4 of data)


# --- the command: everything that can fail fails before uvicorn starts, as one line -------------------------

@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.5", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.fixture
def no_uvicorn(monkeypatch):
    """uvicorn.Server.run recorded instead of serving: a test that reaches it cannot hang."""
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append((self.config, sockets)))
    return served


def assert_one_error_line(err: str, *words: str) -> None:
    assert err.count("\n") == 1 and err.startswith("mnistlab: error: "), err
    assert "at http://" not in err and "Traceback" not in err  # nothing claimed to serve
    for word in words:
        assert word in err, err


def test_serve_on_a_port_in_use_is_one_line_before_loading_anything(capsys, no_uvicorn):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "no-such-run", "--port", str(busy.getsockname()[1])]) == 2
    assert_one_error_line(capsys.readouterr().err, "in use", "--port")
    assert not no_uvicorn


def test_serve_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys, no_uvicorn):
    assert main(["serve", str(tmp_path), "--port", str(free_port())]) == 2
    assert_one_error_line(capsys.readouterr().err, "checkpoint")
    assert not no_uvicorn


def test_serve_on_a_host_that_does_not_resolve_is_one_line(capsys, no_uvicorn):
    assert main(["serve", "no-such-run", "--host", "no-such-host.invalid", "--port", str(free_port())]) == 2
    assert_one_error_line(capsys.readouterr().err, "no-such-host.invalid")


def test_serve_without_the_serve_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "mnistlab.deploy.serve.server")
    assert main(["serve", "no-such-run"]) == 2
    assert_one_error_line(capsys.readouterr().err, 'pip install "mnistlab[serve]"')


def test_max_upload_mb_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "run", "--max-upload-mb", "0"])
    assert "--max-upload-mb" in capsys.readouterr().err


# --- a trained digits run, end to end (slow) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A digits MLP, a copy of it under another folder name, and three folders `serve` must refuse: a
    pre-training run, a scratch-engine run and a copy whose checkpoint fails its hash."""
    root = tmp_path_factory.mktemp("serve")
    quick = ["--dataset", "digits", "--epochs", "3", "--model", "mlp"]
    assert main(["train", *quick, "--threads", "1", "--run-dir", str(root / "digits-mlp")]) == 0
    shutil.copytree(root / "digits-mlp", root / "second")
    assert main(["train", *quick, "--engine", "scratch", "--run-dir", str(root / "scratch")]) == 0
    assert main(["pretrain", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--threads", "1",
                 "--decoder-dim", "32", "--decoder-heads", "2", "--model-arg", "dim=32", "--model-arg", "depth=1",
                 "--model-arg", "heads=2", "--run-dir", str(root / "pretrain")]) == 0
    shutil.copytree(root / "digits-mlp", root / "damaged")
    ckpt = root / "damaged" / "checkpoint.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the last tensor
    ckpt.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def digits_test():
    from mnistlab.data.dataset import load_dataset

    ds = load_dataset("digits")
    return ds.test_images[:20].numpy(), ds.test_labels[:20].numpy()


@pytest.fixture(scope="module")
def real_client(runs):
    from mnistlab.deploy.serve.server import load_models

    with TestClient(create_app(load_models([str(runs / "digits-mlp"), str(runs / "second")]))) as c:
        yield c


@pytest.mark.slow
@pytest.mark.parametrize("folder, words", [("pretrain", ["pre-training run"]), ("scratch", ["scratch engine"]),
                                           ("damaged", ["checksum", "damaged"])])
def test_serve_a_run_it_cannot_load_is_one_line_before_uvicorn(runs, folder, words, capsys, no_uvicorn):
    """Defect: each printed "serving at http://..." and then a Starlette traceback, exit 3."""
    capsys.readouterr()
    assert main(["serve", str(runs / "digits-mlp"), str(runs / folder), "--port", str(free_port())]) == 2
    assert_one_error_line(capsys.readouterr().err, folder, *words)
    assert not no_uvicorn


@pytest.mark.slow
def test_serve_says_serving_only_once_the_port_answers(runs):
    port = free_port()
    command = [sys.executable, "-m", "mnistlab", "serve", str(runs / "digits-mlp"), "--port", str(port)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "serving" not in line:
            assert server.poll() is None and time.monotonic() < deadline, line
            line = server.stderr.readline()
        assert f"http://127.0.0.1:{port}/" in line
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)  # no retry: the socket already listens
        assert r.status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_run_server_warns_on_stderr_when_not_loopback(runs, capsys, no_uvicorn):
    run_server([str(runs / "digits-mlp")], "127.0.0.1", free_port())
    assert "warning" not in capsys.readouterr().err
    run_server([str(runs / "digits-mlp")], "0.0.0.0", free_port())
    assert "warning" in capsys.readouterr().err
    assert len(no_uvicorn) == 2 and all(len(sockets) == 1 for _, sockets in no_uvicorn)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_each_server_process_runs_torch_and_blas_on_one_thread(runs, monkeypatch, workers):
    """The event loop does all of a request's work on one thread: a second torch thread only spun (OpenMP waits
    busily after each model call), so one worker or each of several serves on one thread, whatever the cores."""
    import torch
    import uvicorn
    from threadpoolctl import threadpool_info, threadpool_limits

    from mnistlab.deploy.serve import server

    def threads() -> tuple[int, list[int]]:
        blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        return torch.get_num_threads(), blas

    def many() -> None:  # as on a 2-core machine, so the test can fail on any machine
        torch.set_num_threads(2)
        threadpool_limits(2, user_api="blas")

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(threads()))
    monkeypatch.setattr(server, "serve_processes", lambda config, sockets: seen.append("worker processes"))
    # run_server sets it for its workers: set here first, so that monkeypatch removes it afterwards
    monkeypatch.setenv(server.SETTINGS_VARIABLE, "{}")
    monkeypatch.delenv(server.SETTINGS_VARIABLE)
    before = threads()
    if not before[1]:
        pytest.skip("threadpoolctl sees no BLAS library under numpy here")
    many()  # the own_threads fixture puts back what this test changes
    run_server([str(runs / "digits-mlp")], "127.0.0.1", free_port(),
               settings=server.ServeSettings(run_dirs=[str(runs / "digits-mlp")], workers=workers))
    if workers > 1:  # what each worker process does when uvicorn starts it
        many()
        server.app_from_environment()
        seen.append(threads())
    one = (1, [1] * len(before[1]))
    assert seen == ([one] if workers == 1 else ["worker processes", one])


@pytest.mark.slow
def test_models_of_a_trained_run_by_folder_name(real_client):
    models = real_client.get("/api/models").json()
    assert [m["name"] for m in models] == ["digits-mlp", "second"]
    assert models[0]["dataset"] == "digits" and models[0]["architecture"] == "mlp"


@pytest.mark.slow
def test_drawn_test_digits_are_mostly_read_right(real_client, digits_test):
    images, labels = digits_test
    right = 0
    for image, label in zip(images[:5], labels[:5], strict=True):
        r = upload(real_client, drawn(image))
        assert r.status_code == 200, r.text
        body = r.json()
        assert abs(sum(t["probability"] for t in body["top"]) - 1) < 1e-4 and body["top"][0]["index"] == body["index"]
        right += body["label"] == str(label)
    assert right >= 3, f"{right}/5 drawn test digits predicted right"


@pytest.mark.slow
def test_json_pixels_of_test_images_are_mostly_read_right(real_client, digits_test):
    images, labels = digits_test
    right = 0
    for image, label in zip(images, labels, strict=True):
        r = real_client.post("/api/predict", content=json.dumps({"pixels": image.reshape(-1).tolist()}),
                             headers={"content-type": "application/json"}, params={"model": "second"})
        assert r.status_code == 200 and r.json()["model"] == "second", r.text
        right += r.json()["label"] == str(label)
    assert right >= 15, f"{right}/20 test images predicted right"
