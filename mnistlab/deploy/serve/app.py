"""The HTTP face of a trained run: a page to draw on and the JSON API it calls.

    mnistlab serve runs/digits-mlp [more runs...] [--host 127.0.0.1] [--port 8000]

Endpoints (OpenAPI docs at /docs):
    GET  /              the drawing page (static/index.html: one file, no build step, no CDN)
    GET  /healthz       {"status": "ok"}
    GET  /api/models    the served runs: name (the run folder's name), dataset, classes, threshold, temperature
    POST /api/predict   one picture -> the Prediction dict + "image" (the 28x28 the model saw, 784 ints) + "model"

POST /api/predict takes any one of
    multipart/form-data      field `file` (a PNG or JPEG), optional field `model`
    image/png, image/jpeg    the picture itself as the body
    application/json         {"pixels": [784 numbers in 0..255], "model": optional}: an already prepared 28x28
                             view, row-major, light ink on black (the model's own input; no preprocessing)
and an optional `?model=NAME` query parameter (a field in the body wins). The default model is the first run.

Bad input is a 4xx, never a 5xx: bodies over 64 KiB 413 (counted while reading, so a chunked body is
refused too), pictures over 4096 px a side 413 (read from the header, before decoding), other formats
415, damaged pictures and invalid pixels 422, an unknown model 404.
"""

from __future__ import annotations

import io
import ipaddress
import sys
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError

from mnistlab.deploy.preprocess import BLANK_INK, Prepared, UnreadableImage, convention_for, load_ink, to_model_input

MAX_BODY = 64 * 1024  # a 280x280 canvas PNG is a few KiB; JSON pixels about 4 KiB
MAX_SIDE = 4096  # pixels a side; checked from the header before a picture is decoded
MODEL_CALLS = 2  # concurrent decode + inference calls: more would only fight over the same cores
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
PAGE_HEADERS = {
    # the page is self-contained: nothing may load from elsewhere
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:",
    "X-Content-Type-Options": "nosniff",
}

Pixel = Annotated[float, Field(ge=0, le=255, allow_inf_nan=False)]


class PixelsIn(BaseModel):
    """A prepared 28x28 view: 784 numbers in 0..255, row-major, light ink on black."""

    pixels: Annotated[list[Pixel], Field(min_length=784, max_length=784)]
    model: str | None = None


class TopEntry(BaseModel):
    label: str
    index: int
    probability: float


class PredictionOut(BaseModel):
    path: str
    status: str = Field(description='"ok", "unsure" (below the run\'s threshold) or "blank" (nothing drawn)')
    label: str | None
    index: int | None
    probability: float | None
    top: list[TopEntry] = Field(description="every class, most probable first (empty when blank)")
    image: list[int] = Field(description="the 28x28 view the model saw, row-major, light ink on black")
    model: str


class ModelOut(BaseModel):
    name: str
    dataset: str
    architecture: str
    classes: list[str]
    threshold: float
    temperature: float


@dataclass
class Picture:
    """What a request asked about: picture bytes, or a prepared 28x28 view (uint8)."""

    name: str
    data: bytes | None = None
    view: np.ndarray | None = None
    model: str | None = None


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"the body is larger than {MAX_BODY // 1024} KiB")


class LimitBody:
    """ASGI middleware: refuse bodies over `limit` bytes, by Content-Length and by counting what arrives."""

    def __init__(self, app, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            return await self._refuse(send, 400, "the Content-Length header is not a number")
        if length is not None and int(length) > self.limit:
            return await self._refuse(send)
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # an HTTPException, so FastAPI's body parsing passes it on rather than making it a 400
                    raise BodyTooLarge()
            return message

        async def watching_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send, status: int = 413, detail: str | None = None) -> None:
        response = JSONResponse({"detail": detail or BodyTooLarge().detail}, status_code=status,
                                headers={"Connection": "close"})  # the unread body is not worth reading
        await response({"type": "http"}, None, send)


def decode_upload(data: bytes) -> tuple[np.ndarray, bool]:
    """(ink, inverted) of PNG or JPEG bytes, after the format and the header's size are checked."""
    from PIL import Image, UnidentifiedImageError

    if not data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        raise HTTPException(415, "send a PNG or JPEG picture")
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as im:  # reads the header only
            width, height = im.size
    except Image.DecompressionBombError:
        raise HTTPException(413, f"the picture is too large (at most {MAX_SIDE}x{MAX_SIDE})") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise HTTPException(422, f"not a readable PNG or JPEG picture ({e})") from None
    if width > MAX_SIDE or height > MAX_SIDE:
        raise HTTPException(413, f"the picture is {width}x{height}; at most {MAX_SIDE}x{MAX_SIDE}")
    return load_ink(io.BytesIO(data))  # UnreadableImage (damaged data) -> 422 by the app's handler


def validation_error(e: ValidationError) -> HTTPException:
    """A pydantic error as a 422 whose detail is plain JSON (the raw input may be NaN, which JSON cannot carry)."""
    return HTTPException(422, [dict(loc=list(err["loc"]), msg=err["msg"], type=err["type"]) for err in e.errors()])


async def read_picture(request: Request) -> Picture:
    """The request body as a Picture, by its content type (async: reading the body awaits the client)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            body = PixelsIn.model_validate_json(await request.body())
        except ValidationError as e:
            raise validation_error(e) from None
        view = np.rint(np.asarray(body.pixels, dtype=np.float64)).astype(np.uint8).reshape(28, 28)
        return Picture(name="pixels", view=view, model=body.model)
    if kind in ("image/png", "image/jpeg"):
        return Picture(name="upload", data=await request.body())
    if kind == "multipart/form-data":
        async with request.form(max_files=1, max_fields=4) as form:
            upload, model = form.get("file"), form.get("model")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, 'the form needs a picture in the field "file"')
            if model is not None and not isinstance(model, str):
                raise HTTPException(422, 'the form field "model" is a name, not a file')
            return Picture(name=upload.filename or "upload", data=await upload.read(), model=model)
    raise HTTPException(415, "send multipart/form-data (field file), image/png, image/jpeg or application/json")


PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary", "description": "a PNG or JPEG"},
                           "model": {"type": "string"}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": PixelsIn.model_json_schema()},
    },
}


def _offline_docs(app: FastAPI) -> None:
    """/docs with Swagger UI served from the fastapi-offline package's copy (only its files are used):
    FastAPI's default loads it from a CDN, which shows nothing on a machine without the internet."""
    import fastapi_offline
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="mnistlab API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")


def create_app(run_dirs: list[str]) -> FastAPI:
    """The app serving these runs; their models load in the lifespan (the first run is the default model)."""
    if not run_dirs:
        raise ValueError("create_app needs at least one run folder")
    page = resources.files("mnistlab.deploy.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from mnistlab.deploy.predict import Predictor

        predictors: dict[str, Predictor] = {}
        for run_dir in run_dirs:
            name = base = Path(run_dir).resolve().name
            n = 1
            while name in predictors:  # two runs called the same in different folders
                n += 1
                name = f"{base}-{n}"
            predictors[name] = Predictor(run_dir)
        app.state.predictors = predictors
        app.state.model_calls = threading.Semaphore(MODEL_CALLS)
        yield

    app = FastAPI(title="mnistlab", summary="Draw a digit; see what a trained run makes of it.", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.add_middleware(LimitBody, limit=MAX_BODY)
    _offline_docs(app)

    @app.exception_handler(UnreadableImage)
    def unreadable(request: Request, e: UnreadableImage) -> JSONResponse:
        return JSONResponse({"detail": str(e).split(": ", 1)[-1]}, status_code=422)  # drop the BytesIO's repr

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/models", response_model=list[ModelOut])
    def models(request: Request) -> list[dict[str, Any]]:
        """The served runs, the default (first) one first."""
        return [dict(name=name, dataset=p.dataset, architecture=p.meta["config"]["model"], classes=p.classes,
                     threshold=p.threshold, temperature=p.temperature)
                for name, p in request.app.state.predictors.items()]

    @app.post("/api/predict", response_model=PredictionOut, openapi_extra={"requestBody": PREDICT_BODY},
              responses={404: {"description": "no such model"}, 413: {"description": "body or picture too large"},
                         415: {"description": "not PNG, JPEG or JSON"}, 422: {"description": "unreadable input"}})
    def predict(request: Request, picture: Annotated[Picture, Depends(read_picture)],
                model: Annotated[str | None, Query(description="a name from /api/models")] = None) -> dict[str, Any]:
        """One picture (or prepared 28x28 view) -> the calibrated answer and the view the model saw."""
        import torch

        predictors = request.app.state.predictors
        name = picture.model or model or next(iter(predictors))
        if name not in predictors:
            raise HTTPException(404, f"no model {name!r}; serving {', '.join(predictors)}")
        predictor = predictors[name]
        with request.app.state.model_calls, torch.inference_mode():
            if picture.view is not None:
                blank = int(picture.view.max()) < BLANK_INK * 255  # no ink above the black background
                prepared = Prepared(image=picture.view, blank=blank, inverted=False)
            else:
                ink, inverted = decode_upload(picture.data)
                image, blank = to_model_input(ink, convention_for(predictor.dataset))
                prepared = Prepared(image=image, blank=blank, inverted=inverted)
            (result,) = predictor.predict_prepared([(picture.name, prepared)], top_k=len(predictor.classes))
        return result.to_dict() | dict(image=result.image.reshape(-1).tolist(), model=name)

    return app


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost: assume it is reachable


def run_server(run_dirs: list[str], host: str, port: int) -> None:
    """Serve the runs with uvicorn until interrupted; warn on stderr when others can reach the server."""
    import uvicorn

    from mnistlab.errors import UserError
    from mnistlab.run import CHECKPOINT

    for run_dir in run_dirs:  # the common mistake, caught before uvicorn starts (the lifespan loads the rest)
        if not (Path(run_dir) / CHECKPOINT).is_file():
            raise UserError(f"{run_dir}: no {CHECKPOINT} (not a run folder, or it never finished an epoch)")
    if not is_loopback(host):
        print(f"mnistlab serve: warning: listening on {host}, reachable from other machines; "
              "the API has no authentication", file=sys.stderr)
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    print(f"mnistlab serve: {len(run_dirs)} model(s) at http://{shown}:{port}/ (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(create_app(run_dirs), host=host, port=port, log_level="warning")
