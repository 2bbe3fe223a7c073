"""The HTTP face of trained runs: a page to draw on and the JSON API it calls.

Endpoints (OpenAPI docs at /docs, served offline):
    GET  /              the drawing page (static/index.html: one file, no build step, no CDN)
    GET  /healthz       {"status": "ok"}, answered on the event loop between two pieces of work (a drawing's
                        preparation or a model call: milliseconds; large pictures are prepared in threads)
    GET  /api/models    the served runs, the default first: name (the run folder's name), dataset, architecture,
                        classes, threshold (null: none, nothing is "unsure"), temperature
    POST /api/predict   one picture -> PredictionOut: status, label, index, probability, top (every class),
                        image (the 28x28 view the model saw, 784 ints), model, path

POST /api/predict takes any one of
    multipart/form-data      field `file` (a PNG or JPEG), optional field `model`
    image/png, image/jpeg    the picture itself as the body
    application/json         {"pixels": [784 numbers in 0..255], "model": optional}: an already prepared 28x28
                             view, row-major, light ink on black (the model's own input; no preprocessing)
and an optional `?model=NAME` query parameter (a field in the body wins). The default model is the first run.

Bad input is a 4xx, never a 5xx: a picture over max_upload (8 MiB by default) or a JSON body over 64 KiB 413
(counted while reading, so a chunked body is refused too), a picture over 4096 px a side 413 (read from the
header, before decoding), a multipart body that does not parse 400, other formats 415, damaged pictures and
invalid pixels 422, an unknown model 404.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import to_json

from mnistlab.deploy.batcher import MAX_BATCH, Ask, LoopBatcher, predict_asks
from mnistlab.deploy.preprocess import UnreadableImage
from mnistlab.deploy.serve.inference import NotAPicture, Picture, PictureTooLarge, ServedModel, answer

if TYPE_CHECKING:
    from mnistlab.deploy.predict import Prediction

MAX_JSON = 64 * 1024  # 784 pixels as JSON are about 4 KiB
MAX_UPLOAD = 8 * 1024 * 1024  # a phone photo is a few MB; the drawing page sends a few KiB
FORM_OVERHEAD = 64 * 1024  # a multipart body's boundaries, part headers and `model` field around the picture
PREPARE_CALLS = 2  # large pictures (inference.INLINE_PIXELS) prepared at once in worker threads
READ_TIMEOUT = 10.0  # seconds for a body to arrive in full: a phone photo over a slow link takes ~1 s
PICTURE_TYPES = ("image/png", "image/jpeg")
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
    path: str = Field(description='the uploaded file\'s name, "upload" for a raw body, "pixels" for JSON')
    status: str = Field(description='"ok", "unsure" (below the run\'s threshold) or "blank" (nothing drawn)')
    label: str | None
    index: int | None
    probability: float | None
    top: list[TopEntry] = Field(description="every class, most probable first (empty when blank)")
    image: list[int] = Field(description="the 28x28 view the model saw, row-major, light ink on black")
    model: str
    runtime: str | None = Field(default=None, description='what computed the answer: "torch-fp32", "torch-bf16", '
                                '"onnxruntime-fp32" or "onnxruntime-int8" (null when blank: no model ran)')


class ModelOut(BaseModel):
    name: str = Field(description="the run folder's name; pass it as `model` to choose this run")
    dataset: str
    architecture: str
    classes: list[str]
    threshold: float | None = Field(description="answers below this probability are unsure; null: no threshold")
    temperature: float


class Health(BaseModel):
    status: str


class Problem(BaseModel):
    detail: str | list[dict[str, Any]]


@dataclass
class Served:
    """What the handlers are given (by Depends): the models by name, the first the default, the limiter that the
    preparing of large pictures shares, and each model's batcher."""

    models: dict[str, ServedModel]
    limiter: anyio.CapacityLimiter  # the threads that decode and prepare large pictures
    batchers: dict[str, LoopBatcher[Ask, Any]]  # each model's calls, by the model's name
    max_upload: int  # bytes of a picture


async def served(request: Request) -> Served:
    # async, though it awaits nothing: FastAPI runs a plain `def` dependency in a worker thread, a hand-over
    # to another thread and back for every request
    return request.app.state.served


def size_text(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 1024:g} KiB"


def upload_too_large(limit: int) -> str:
    return f"the picture is larger than {size_text(limit)}, this server's limit (mnistlab serve --max-upload-mb)"


class BodyTooLarge(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


class BodyTimeout(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(408, detail)


class LimitBody:
    """ASGI middleware: refuse bodies over their limit (a picture's or JSON's, by content type), by
    Content-Length and by counting what arrives, and bodies that take longer than read_timeout seconds to
    arrive (408). A slow client holds only its own connection (the reading awaits it on the event loop,
    no thread waits), and this frees that connection too."""

    def __init__(self, app, picture_limit: int = MAX_UPLOAD, json_limit: int = MAX_JSON,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self.app, self.picture_limit, self.json_limit = app, picture_limit, json_limit
        self.read_timeout = read_timeout

    def limit(self, headers: dict[bytes, bytes]) -> tuple[int, str]:
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        if kind in PICTURE_TYPES or kind == "multipart/form-data":
            overhead = FORM_OVERHEAD if kind == "multipart/form-data" else 0  # the file's own size: read_picture
            return self.picture_limit + overhead, upload_too_large(self.picture_limit)
        return self.json_limit, f"the body is larger than {size_text(self.json_limit)}, the limit for JSON " \
                                "(784 pixels take about 4 KiB)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        limit, too_large = self.limit(headers)
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await self._refuse(send, 400, "the Content-Length header is not a number")
        if length is not None and int(length) > limit:
            return await self._refuse(send, 413, too_large)
        received, started, complete = 0, False, False
        deadline = anyio.current_time() + self.read_timeout

        async def counting_receive():
            nonlocal received, complete
            if complete:  # the body is in: what is left to hear is a disconnect, however late
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()) as waiting:
                message = await receive()
            if waiting.cancelled_caught:
                raise BodyTimeout(f"the body did not arrive within {self.read_timeout:g} s")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > limit:
                    # an HTTPException, so FastAPI's body parsing passes it on rather than making it a 400
                    raise BodyTooLarge(too_large)
            return message

        async def watching_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except (BodyTooLarge, BodyTimeout) as e:
            if started:
                raise
            await self._refuse(send, e.status_code, e.detail)

    async def _refuse(self, send, status: int, detail: str) -> None:
        response = JSONResponse({"detail": detail}, status_code=status,
                                headers={"Connection": "close"})  # the unread body is not worth reading
        await response({"type": "http"}, None, send)


def validation_error(e: ValidationError) -> HTTPException:
    """A pydantic error as a 422 whose detail is plain JSON (the raw input may be NaN, which JSON cannot carry)."""
    return HTTPException(422, [dict(loc=list(err["loc"]), msg=err["msg"], type=err["type"]) for err in e.errors()])


async def read_picture(request: Request, s: Served) -> Picture:
    """The request body as a Picture, by its content type (async: reading the body awaits the client)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            body = PixelsIn.model_validate_json(await request.body())
        except ValidationError as e:
            raise validation_error(e) from None
        view = np.rint(np.asarray(body.pixels, dtype=np.float64)).astype(np.uint8).reshape(28, 28)
        return Picture(name="pixels", view=view, model=body.model)
    if kind in PICTURE_TYPES:
        return Picture(name="upload", data=await request.body())
    if kind == "multipart/form-data":
        async with request.form(max_files=1, max_fields=4) as form:  # a body that does not parse: Starlette's 400
            upload, model = form.get("file"), form.get("model")
            if unknown := sorted(set(form.keys()) - {"file", "model"}):
                raise HTTPException(422, f"unknown form fields {unknown}: send `file` and, if you like, `model`")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, 'the form needs a picture in the field "file"')
            if model is not None and not isinstance(model, str):
                raise HTTPException(422, 'the form field "model" is a name, not a file')
            if upload.size is not None and upload.size > s.max_upload:
                raise HTTPException(413, upload_too_large(s.max_upload))
            return Picture(name=upload.filename or "upload", data=await upload.read(), model=model)
    raise HTTPException(415, "send multipart/form-data (field file), image/png, image/jpeg or application/json")


def predict_body(max_upload: int) -> dict[str, Any]:
    """The OpenAPI request body of /api/predict (read by hand in read_picture: four content types, one route)."""
    picture = {"type": "string", "format": "binary",
               "description": f"a PNG or JPEG picture, at most {size_text(max_upload)} and 4096 px a side"}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "additionalProperties": False,
                           "properties": {"file": picture,
                                          "model": {"type": "string", "description": "a name from /api/models"}}},
                "encoding": {"file": {"contentType": ", ".join(PICTURE_TYPES)}}},
            **{kind: {"schema": picture} for kind in PICTURE_TYPES},
            "application/json": {"schema": PixelsIn.model_json_schema()},
        },
    }


PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text} for code, text in [
        (400, "a multipart body that does not parse, or a Content-Length that is not a number"),
        (404, "no model of that name"),
        (413, "the picture or the JSON body is too large, or the picture over 4096 px a side"),
        (415, "not PNG, JPEG or JSON"),
        (422, "a damaged picture, a form without `file`, or pixels that are not 784 numbers in 0..255")]}


async def healthz() -> Health:
    return Health(status="ok")


async def list_models(s: Annotated[Served, Depends(served)]) -> list[ModelOut]:
    """The served runs, the default (first) one first."""
    return [ModelOut(name=name, dataset=m.dataset, architecture=m.meta["config"]["model"], classes=m.classes,
                     threshold=m.threshold, temperature=m.temperature) for name, m in s.models.items()]


async def predict(request: Request) -> Response:
    """One picture (or prepared 28x28 view) -> the calibrated answer and the view the model saw.

    Written by hand where FastAPI would do it for us, because here it costs more than the model: declared
    dependencies (the body, the served models, the `model` query parameter) and a returned PredictionOut,
    which FastAPI validates again before writing it, cost about 0.15 ms a request (in one process, 32 callers:
    0.49 -> 0.32 ms above the bare prepare-and-predict path), against 0.07 ms for the model's share of a batch
    (docs/deploy.md, "A server that batches"). The OpenAPI description is declared
    on the route instead (create_app), and tests/test_serve.py checks every answer against PredictionOut."""
    s: Served = request.app.state.served
    picture = await read_picture(request, s)
    name = picture.model or request.query_params.get("model") or next(iter(s.models))
    if name not in s.models:
        raise HTTPException(404, f"no model {name!r}; serving {', '.join(s.models)}")
    result = await answer(s.models[name], picture, s.limiter, s.batchers[name])
    return Response(prediction_json(result, name), media_type="application/json")


def prediction_json(result: Prediction, model: str) -> bytes:
    """PredictionOut's JSON for one answer, in its field order: written by pydantic's serializer from plain
    values (a 784-int list is checked once, by the test, not on every request)."""
    return to_json(dict(path=result.path, status=result.status, label=result.label, index=result.index,
                        probability=result.probability, top=result.top, image=result.image.reshape(-1).tolist(),
                        model=model, runtime=result.runtime))


MODEL_PARAMETER = {"name": "model", "in": "query", "required": False,
                   "description": "a name from /api/models (a `model` in the body wins)", "schema": {"type": "string"}}


def _offline_docs(app: FastAPI) -> None:
    """/docs with Swagger UI served from the fastapi-offline package's copy: FastAPI's default loads it from
    a CDN, which shows nothing on a machine without the internet. Only its files are used, not its FastAPIOffline
    class: the app stays a plain FastAPI, and /redoc (which would need more of its assets) stays off."""
    import fastapi_offline
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="mnistlab API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")

    app.add_api_route("/docs", docs, include_in_schema=False)


def create_app(models: dict[str, ServedModel], *, max_upload: int = MAX_UPLOAD, max_batch: int = MAX_BATCH,
               prepare_calls: int = PREPARE_CALLS, read_timeout: float = READ_TIMEOUT) -> FastAPI:
    """The app serving these models, already loaded and checked (server.load_models; the first is the default).
    Each model's calls go through its own LoopBatcher (deploy/batcher.py): up to max_batch pictures a call, made
    of the requests prepared while the loop was busy; prepare_calls large pictures are decoded and prepared at
    once in worker threads; a body must arrive within read_timeout seconds."""
    if not models:
        raise ValueError("create_app needs at least one model")
    page = resources.files("mnistlab.deploy.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    app = FastAPI(title="mnistlab", summary="Draw a picture; see what a trained run makes of it.",
                  docs_url=None, redoc_url=None)
    batchers = {name: LoopBatcher(predict_asks(model), max_batch=max_batch) for name, model in models.items()}
    app.state.served = Served(models=dict(models), limiter=anyio.CapacityLimiter(prepare_calls), batchers=batchers,
                              max_upload=max_upload)
    app.add_middleware(LimitBody, picture_limit=max_upload, json_limit=MAX_JSON, read_timeout=read_timeout)
    # /api/predict first: Starlette tries the routes in order, each a regular expression, for every request
    app.add_api_route("/api/predict", predict, methods=["POST"], response_model=PredictionOut,
                      responses=PREDICT_ERRORS,
                      openapi_extra={"requestBody": predict_body(max_upload), "parameters": [MODEL_PARAMETER]})
    _offline_docs(app)
    for error, status in ((NotAPicture, 415), (PictureTooLarge, 413), (UnreadableImage, 422)):
        app.add_exception_handler(error, lambda request, e, status=status: JSONResponse({"detail": str(e)}, status))

    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    app.add_api_route("/", index, include_in_schema=False)
    app.add_api_route("/healthz", healthz)
    app.add_api_route("/api/models", list_models)
    return app
