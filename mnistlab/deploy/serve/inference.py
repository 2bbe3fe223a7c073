"""Below the HTTP layer: a request's picture -> the served model's answer.

Each server process does its work on its event loop's one thread: a picture of up to INLINE_PIXELS is decoded
and prepared right there (0.8-1.3 ms for a 280x280 drawing, bench/preprocess_speed.py), and the model call
goes through the model's LoopBatcher (deploy/batcher.py), which answers a lone request in the loop's next turn
and gathers the requests prepared meanwhile into one call. Handing each request to a worker thread and back
cost more than it saved: the threads share one interpreter lock, so they add no core, only hand-overs
(docs/deploy.md, "A server that batches"); the second core is used by a second worker process (`--workers
2`). Only a larger picture (a phone photo: 8-30 ms) is prepared in a worker thread, so that it does not hold up
every other request and /healthz.

Nothing here knows FastAPI: app.py turns these exceptions into status codes, and anything shaped like
a Predictor (ServedModel: a fake one in the tests) can be served.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import numpy as np

from mnistlab.deploy.batcher import Ask, LoopBatcher
from mnistlab.deploy.preprocess import (
    BLANK_INK,
    Prepared,
    UnreadableImage,
    ink_from_image,
    view_of,
)

if TYPE_CHECKING:
    from PIL import Image

    from mnistlab.deploy.predict import Prediction

MAX_SIDE = 4096  # pixels a side, read from the header before a picture is decoded
# A JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps both sides >= DRAFT_SIDE (Pillow's
# draft mode: the DCT skips the detail): a 4032x3024 phone photo becomes 1008x756, plenty for a 20 px box.
DRAFT_SIDE = 512
INLINE_PIXELS = 512 * 512  # a picture up to this size is prepared on the event loop (a few ms), a larger in a thread
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


class NotAPicture(ValueError):
    """The bytes are neither a PNG nor a JPEG."""


class PictureTooLarge(Exception):
    """More than MAX_SIDE pixels a side (refused before decoding)."""


class ServedModel(Protocol):
    """What the server needs of a model: mnistlab.deploy.predict.Predictor has it."""

    classes: list[str]
    dataset: str
    temperature: float
    threshold: float | None  # None: no threshold, so no answer is "unsure"
    meta: dict[str, Any]  # the checkpoint's metadata; meta["config"]["model"] names the architecture

    def predict_prepared(self, prepared: list[tuple[str, Prepared]], top_k: int = 3) -> list[Prediction]: ...


@dataclass
class Picture:
    """What a request asked about: picture bytes, or a prepared 28x28 view (uint8); and which model."""

    name: str
    data: bytes | None = None
    view: np.ndarray | None = None
    model: str | None = None


def open_picture(data: bytes) -> Image.Image:
    """PNG or JPEG bytes opened (Pillow reads the header only, ~25 us), the format and the size checked."""
    from PIL import Image, UnidentifiedImageError

    if not data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        raise NotAPicture("send a PNG or JPEG picture")
    try:
        im = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
    except Image.DecompressionBombError:
        raise PictureTooLarge(f"the picture is too large (at most {MAX_SIDE}x{MAX_SIDE})") from None
    except UnidentifiedImageError:  # its message would show the BytesIO's repr
        raise UnreadableImage("not a readable PNG or JPEG picture (Pillow cannot read its header)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"not a readable PNG or JPEG picture ({e})") from None
    if im.width > MAX_SIDE or im.height > MAX_SIDE:
        im.close()
        raise PictureTooLarge(f"the picture is {im.width}x{im.height}; at most {MAX_SIDE}x{MAX_SIDE}")
    return im


def decode_opened(im: Image.Image) -> tuple[np.ndarray, bool]:
    """(ink, inverted) of an opened picture: a JPEG decoded reduced (draft mode) and in grey, a PNG whole (its ink
    may be in its alpha channel: ink_from_image knows)."""
    with im:
        try:
            if im.format == "JPEG":  # no alpha channel: the grey levels are all there is
                im.draft("L", (DRAFT_SIDE, DRAFT_SIDE))
            im.load()
        except (OSError, SyntaxError, ValueError) as e:  # damaged data
            raise UnreadableImage(f"not a readable PNG or JPEG picture ({e})") from None
        return ink_from_image(im)


def decode(data: bytes) -> tuple[np.ndarray, bool]:
    """(ink, inverted) of PNG or JPEG bytes: the format and the header's size checked first, then decoded."""
    return decode_opened(open_picture(data))


def model_view(picture: Picture, dataset: str) -> Prepared:
    """The 28x28 view a model of `dataset` sees: the picture prepared by its recipe, or the view as sent."""
    if picture.view is not None:
        blank = int(picture.view.max()) < BLANK_INK * 255  # no ink above the black background
        return Prepared(image=picture.view, blank=blank, inverted=False)
    return prepare_opened(open_picture(picture.data or b""), dataset)


async def answer(model: ServedModel, picture: Picture, limiter: anyio.CapacityLimiter,
                 batcher: LoopBatcher[Ask, Prediction]) -> Prediction:
    """The picture prepared (on the loop when small, else in a worker thread: at most limiter.total_tokens at
    once, requests beyond wait for a token without holding a thread), then its model call through the batcher,
    every class ranked. `batcher` is LoopBatcher(predict_asks(model))."""
    if picture.data is None:
        prepared = model_view(picture, model.dataset)
    else:
        im = open_picture(picture.data)  # the header: its size says where to prepare it
        if im.width * im.height <= INLINE_PIXELS:
            prepared = prepare_opened(im, model.dataset)
        else:
            prepared = await anyio.to_thread.run_sync(prepare_opened, im, model.dataset, limiter=limiter)
    return await batcher.run(Ask(picture.name, prepared, len(model.classes)))


def prepare_opened(im: Image.Image, dataset: str) -> Prepared:
    """The 28x28 view a model of `dataset` sees of an opened picture (open_picture)."""
    return view_of(*decode_opened(im), dataset)
