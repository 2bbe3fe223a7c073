"""Real PNG and JPEG bytes for schemathesis. The API's schema says a picture is image/png or image/jpeg,
but no schema can say "decodable", so random bytes would be refused (415, 422) and schemathesis's
positive_data_acceptance check would call that a bug. tests/schemathesis.toml loads this file.
"""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def pictures(draw: st.DrawFn, fmt: str) -> bytes:
    """A noise picture of 1-64 px a side in one of the modes the format stores."""
    height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (height, width), dtype=np.uint8)
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "LA"] if fmt == "PNG" else ["L", "RGB"]))
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


schemathesis.openapi.media_type("image/png", pictures("PNG"))
schemathesis.openapi.media_type("image/jpeg", pictures("JPEG"))
