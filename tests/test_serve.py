"""`mnistlab serve`: the JSON API and the page, through FastAPI's TestClient (the lifespan included).

Every bad input gets its own test and must come back as a 4xx, never a 5xx.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from mnistlab.deploy.serve.app import MAX_BODY, create_app, is_loopback, run_server  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two served runs: a digits MLP, and a copy of it under another folder name (a second model)."""
    from mnistlab.cli import main

    root = tmp_path_factory.mktemp("serve")
    run = root / "digits-mlp"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "3", "--threads", "1",
                 "--run-dir", str(run)]) == 0
    shutil.copytree(run, root / "second")
    return [str(run), str(root / "second")]


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app(runs)) as c:
        yield c


@pytest.fixture(scope="module")
def digits_test():
    from mnistlab.data.dataset import load_dataset

    ds = load_dataset("digits")
    return ds.test_images[:20].numpy(), ds.test_labels[:20].numpy()


def png_bytes(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format=fmt)
    return buf.getvalue()


def drawn(image28: np.ndarray) -> bytes:
    """A 28x28 test image as a person's drawing: 280x280, dark ink on white paper, as a PNG."""
    big = Image.fromarray(255 - image28).resize((280, 280), Image.Resampling.BILINEAR)
    return png_bytes(big)


def upload(client, data: bytes, name: str = "a.png", kind: str = "image/png", **params):
    return client.post("/api/predict", files={"file": (name, data, kind)}, params=params)


def pixels_body(values) -> str:
    return json.dumps({"pixels": list(values)})


def assert_4xx(response, *codes):
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if codes:
        assert response.status_code in codes, (response.status_code, response.text)
    assert "detail" in response.json()


# --- what works ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.slow
def test_models_lists_every_run_by_folder_name_first_is_default(client):
    r = client.get("/api/models")
    assert r.status_code == 200
    models = r.json()
    assert [m["name"] for m in models] == ["digits-mlp", "second"]
    first = models[0]
    assert first["dataset"] == "digits" and first["architecture"] == "mlp"
    assert first["classes"] == [str(i) for i in range(10)]
    assert 0 < first["threshold"] < 1 and first["temperature"] > 0


@pytest.mark.slow
def test_predict_a_drawn_png_answers_with_the_label_and_the_view(client, digits_test):
    images, labels = digits_test
    right = 0
    for image, label in zip(images[:5], labels[:5], strict=True):
        r = upload(client, drawn(image))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "digits-mlp" and body["path"] == "a.png"
        assert body["status"] in ("ok", "unsure") and len(body["top"]) == 10
        assert abs(sum(t["probability"] for t in body["top"]) - 1) < 1e-4
        assert body["top"][0]["index"] == body["index"]
        assert len(body["image"]) == 784 and all(0 <= v <= 255 for v in body["image"]) and max(body["image"]) > 200
        right += body["label"] == str(label)
    assert right >= 3, f"{right}/5 drawn test digits predicted right"


@pytest.mark.slow
def test_predict_a_raw_png_body(client, digits_test):
    r = client.post("/api/predict", content=drawn(digits_test[0][0]), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["status"] in ("ok", "unsure")


@pytest.mark.slow
def test_predict_a_jpeg_upload(client, digits_test):
    big = Image.fromarray(255 - digits_test[0][0]).resize((280, 280))
    r = upload(client, png_bytes(big, "JPEG"), name="a.jpg", kind="image/jpeg")
    assert r.status_code == 200 and r.json()["status"] in ("ok", "unsure")


@pytest.mark.slow
def test_predict_json_pixels_of_test_images_mostly_right(client, digits_test):
    images, labels = digits_test
    right = 0
    for image, label in zip(images, labels, strict=True):
        r = client.post("/api/predict", content=pixels_body(image.reshape(-1).tolist()),
                        headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image"] == image.reshape(-1).tolist()  # already the model's view: no preprocessing
        right += body["label"] == str(label)
    assert right >= 15, f"{right}/20 test images predicted right"


@pytest.mark.slow
def test_model_chosen_by_query_parameter_and_by_body_field(client, digits_test):
    image = digits_test[0][0].reshape(-1).tolist()
    assert client.post("/api/predict", json={"pixels": image}, params={"model": "second"}).json()["model"] == "second"
    assert client.post("/api/predict", json={"pixels": image, "model": "second"}).json()["model"] == "second"
    r = client.post("/api/predict", files={"file": ("a.png", drawn(digits_test[0][0]), "image/png")},
                    data={"model": "second"})
    assert r.status_code == 200 and r.json()["model"] == "second"


@pytest.mark.slow
def test_blank_png_is_answered_blank(client):
    r = upload(client, png_bytes(np.full((280, 280), 255, dtype=np.uint8)))
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "blank" and body["label"] is None and body["top"] == [] and max(body["image"]) == 0


@pytest.mark.slow
def test_blank_pixels_are_answered_blank(client):
    r = client.post("/api/predict", json={"pixels": [0] * 784})
    assert r.status_code == 200 and r.json()["status"] == "blank"


@pytest.mark.slow
def test_page_is_served_with_its_ids_and_no_outside_urls(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element in ("canvas", "clear", "prediction", "probs", "view", "model"):
        assert f'id="{element}"' in r.text
    assert not re.search(r"https?:", r.text), "the page must load nothing from elsewhere (no CDN)"
    assert "default-src 'self'" in r.headers["content-security-policy"]


@pytest.mark.slow
def test_openapi_documents_every_request_format(client):
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "image/png", "image/jpeg", "application/json"}
    assert {"/healthz", "/api/models"} <= set(spec["paths"])


# --- bad input: a clear 4xx each, never a 5xx ---------------------------------------------------------------

@pytest.mark.slow
def test_body_over_64_kib_with_content_length_is_413(client):
    body = b"\x89PNG\r\n\x1a\n" + bytes(70 * 1024)
    r = client.post("/api/predict", content=body, headers={"content-type": "image/png"})
    assert int(r.request.headers["content-length"]) > MAX_BODY
    assert_4xx(r, 413)


@pytest.mark.slow
def test_chunked_body_over_64_kib_without_content_length_is_413(client):
    def chunks():
        for _ in range(10):
            yield bytes(8 * 1024)

    r = client.post("/api/predict", content=chunks(), headers={"content-type": "image/png"})
    assert "content-length" not in r.request.headers
    assert_4xx(r, 413)


@pytest.mark.slow
def test_chunked_json_over_64_kib_is_413(client):
    def chunks():
        yield b'{"pixels": ['
        for _ in range(20):
            yield b"0," * 2048

    r = client.post("/api/predict", content=chunks(), headers={"content-type": "application/json"})
    assert_4xx(r, 413)


@pytest.mark.slow
def test_small_chunked_body_is_read(client, digits_test):
    data = drawn(digits_test[0][0])
    r = client.post("/api/predict", content=iter([data[:100], data[100:]]), headers={"content-type": "image/png"})
    assert r.status_code == 200


@pytest.mark.slow
def test_gif_upload_is_refused(client):
    assert_4xx(upload(client, png_bytes(Image.new("L", (28, 28)), "GIF"), name="a.gif", kind="image/gif"), 415)


@pytest.mark.slow
def test_bmp_upload_is_refused(client):
    assert_4xx(upload(client, png_bytes(Image.new("L", (28, 28)), "BMP"), name="a.bmp", kind="image/bmp"), 415)


@pytest.mark.slow
def test_garbage_upload_is_refused(client):
    assert_4xx(upload(client, b"this is not a picture at all"), 415)


@pytest.mark.slow
def test_damaged_png_is_422(client):
    good = png_bytes(np.zeros((280, 280), dtype=np.uint8))
    assert_4xx(upload(client, good[:40] + bytes(200)), 422)
    assert_4xx(upload(client, good[:8] + b"garbage after the signature"), 422)


@pytest.mark.slow
def test_unsupported_content_type_is_415(client):
    assert_4xx(client.post("/api/predict", content=b"1,2,3", headers={"content-type": "text/csv"}), 415)


@pytest.mark.slow
def test_form_without_a_file_is_422(client):
    assert_4xx(client.post("/api/predict", data={"model": "second"}, files={"other": ("x", b"y")}), 422)


@pytest.mark.slow
def test_783_pixels_is_422(client):
    assert_4xx(client.post("/api/predict", json={"pixels": [0] * 783}), 422)


@pytest.mark.slow
def test_nan_pixel_is_422(client):
    body = '{"pixels": [NaN' + ", 0" * 783 + "]}"  # Python's json would accept NaN: the API must not
    assert_4xx(client.post("/api/predict", content=body, headers={"content-type": "application/json"}), 422)


@pytest.mark.slow
def test_infinite_pixel_is_422(client):
    body = '{"pixels": [Infinity' + ", 0" * 783 + "]}"
    assert_4xx(client.post("/api/predict", content=body, headers={"content-type": "application/json"}), 422)


@pytest.mark.slow
def test_pixel_of_300_is_422(client):
    assert_4xx(client.post("/api/predict", json={"pixels": [300] + [0] * 783}), 422)


@pytest.mark.slow
def test_pixel_of_minus_1_is_422(client):
    assert_4xx(client.post("/api/predict", json={"pixels": [-1] + [0] * 783}), 422)


@pytest.mark.slow
def test_malformed_json_is_422(client):
    r = client.post("/api/predict", content=b'{"pixels": [0, 0', headers={"content-type": "application/json"})
    assert_4xx(r, 422)


@pytest.mark.slow
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


@pytest.mark.slow
def test_huge_dimensions_are_refused_before_decoding(client):
    assert_4xx(upload(client, patched_png(100_000, 100_000)), 413)


@pytest.mark.slow
def test_dimensions_over_4096_a_side_are_refused(client):
    assert_4xx(upload(client, patched_png(5000, 10)), 413)


# --- serving ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.5", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.slow
def test_run_server_warns_on_stderr_when_not_loopback(runs, monkeypatch, capsys):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw))
    run_server(runs[:1], "127.0.0.1", 8123)
    assert "warning" not in capsys.readouterr().err
    run_server(runs[:1], "0.0.0.0", 8123)
    assert "warning" in capsys.readouterr().err
    assert started == [dict(host="127.0.0.1", port=8123, log_level="warning"),
                       dict(host="0.0.0.0", port=8123, log_level="warning")]


def test_run_server_refuses_a_folder_that_is_not_a_run(tmp_path):
    from mnistlab.errors import UserError

    with pytest.raises(UserError, match="checkpoint"):
        run_server([str(tmp_path)], "127.0.0.1", 8123)
