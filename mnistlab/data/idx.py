"""Reading and writing IDX files (the MNIST container format), strictly.

Format (LeCun's MNIST page): 2 zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, then each dimension as a big-endian uint32, then the data in C order. We check all of
it before trusting a file: a file that is short by one byte, or carries one byte too many, is an
error, not a silent truncation.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from mnistlab.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08


class IdxError(UserError):
    """A file that is not a valid IDX file (or not a valid gzip around one)."""


def _describe_start(raw: bytes) -> str:
    head = raw[:64].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "it looks like an HTML/XML page (an error page saved in place of the data?)"
    if not raw:
        return "it is empty"
    return f"it starts with bytes {raw[:8].hex(' ')}"


def decompress_if_gzip(raw: bytes, name: str) -> bytes:
    """Return the payload of a gzip stream, or `raw` itself when it is not gzipped.

    A name ending in .gz must hold gzip data: an HTML page saved as `x.gz` is reported, not parsed.
    """
    if raw[:2] != GZIP_MAGIC:
        if name.endswith(".gz"):
            raise IdxError(f"{name}: not a gzip file: {_describe_start(raw)}")
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as e:
        raise IdxError(f"{name}: truncated gzip file (the download or copy was cut short)") from e
    except (OSError, zlib.error) as e:
        raise IdxError(f"{name}: corrupt gzip data ({e})") from e


def gzip_idx_shape(raw: bytes, name: str) -> tuple[int, ...]:
    """The shape an IDX header declares, inflating only the first bytes of a gzip stream.

    For a file whose sha256 already matched the published archive: its content is known, so
    verifying it need not inflate all of it (that is left to the one full read that loads it).
    """
    try:
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, 4 + 4 * 255)  # the longest IDX header
    except zlib.error as e:
        raise IdxError(f"{name}: corrupt gzip data ({e})") from e
    return _parse_header(head, name)[0]


def _parse_header(payload: bytes, name: str) -> tuple[tuple[int, ...], int]:
    """(declared shape, header length) of an IDX payload (or its first bytes), its magic checked."""
    if len(payload) < 4:
        raise IdxError(f"{name}: too short to be an IDX file ({len(payload)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", payload[:4])
    if zero != 0 or ndim == 0:
        raise IdxError(
            f"{name}: wrong IDX magic number 0x{payload[:4].hex()} "
            f"(expected 0x00000801 for labels or 0x00000803 for images); {_describe_start(payload)}"
        )
    if dtype_code != UBYTE:
        raise IdxError(f"{name}: IDX type code 0x{dtype_code:02x} is not unsigned byte (0x08)")
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise IdxError(f"{name}: IDX header cut short")
    return struct.unpack(f">{ndim}I", payload[4:header_len]), header_len


def parse_idx(payload: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX payload into a uint8 array of its declared shape."""
    dims, header_len = _parse_header(payload, name)
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(payload) != expected:
        raise IdxError(
            f"{name}: IDX header declares shape {dims} ({expected} bytes) "
            f"but the file holds {len(payload)} bytes"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header_len).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzipped or not, into a uint8 array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise IdxError(f"{path}: cannot read ({e.strerror})") from e
    return parse_idx(decompress_if_gzip(raw, str(path)), str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an uncompressed IDX payload."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as an IDX file, gzipped when the name ends in .gz."""
    payload = encode_idx(array)
    path = Path(path)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.name.endswith(".gz") else payload)


def check_pair(images: np.ndarray, labels: np.ndarray, what: str, num_classes: int = 10) -> None:
    """Check that an images/labels pair belongs together: shapes, counts, label range."""
    if images.ndim != 3:
        raise IdxError(f"{what}: images must be 3-D (N, H, W), got shape {images.shape}")
    if labels.ndim != 1:
        raise IdxError(f"{what}: labels must be 1-D (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise IdxError(
            f"{what}: {len(images)} images but {len(labels)} labels: the counts must agree"
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise IdxError(f"{what}: label {int(labels.max())} is outside 0..{num_classes - 1}")
