"""Verified downloads: mirrors in order, retries with backoff, .part files, atomic rename.

A file reaches its final name only after its sha256 matched and its gzip and IDX structure parsed,
so a final-named file with a wrong hash never exists, whatever is killed when.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from mnistlab.data.idx import IdxError, decompress_if_gzip, parse_idx
from mnistlab.data.registry import FileSpec
from mnistlab.errors import UserError

MIRRORS_ENV = "MNISTLAB_MIRRORS"  # comma-separated base URLs that replace a dataset's own mirrors
CHUNK = 1 << 16


class DownloadError(UserError):
    """Every mirror failed for a file."""


class _Retryable(Exception):
    """A failure worth retrying on the same mirror (5xx, reset, timeout, short body)."""


class _NextMirror(Exception):
    """A failure that retrying the same mirror will not fix (4xx, wrong bytes)."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mirrors_for(default: Sequence[str]) -> list[str]:
    """The mirrors to try: $MNISTLAB_MIRRORS when set (a local mirror, a proxy), else `default`."""
    env = os.environ.get(MIRRORS_ENV, "").strip()
    urls = [u.strip() for u in env.split(",") if u.strip()] if env else list(default)
    return [u if u.endswith("/") else u + "/" for u in urls]


def _fetch_once(url: str, part: Path, cap: int, timeout: float, progress: Callable[[int], None]) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "mnistlab"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and int(length) > cap:
                raise _NextMirror(f"Content-Length {int(length):,} exceeds the {cap:,}-byte cap")
            got = 0
            with open(part, "wb") as out:
                while chunk := response.read(CHUNK):
                    got += len(chunk)
                    if got > cap:
                        raise _NextMirror(f"body exceeds the {cap:,}-byte cap")
                    out.write(chunk)
                    progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if length is not None and got != int(length):
                raise _Retryable(f"short body: {got:,} of {int(length):,} bytes")
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code}") from e
        raise _NextMirror(f"HTTP {e.code}") from e
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _Retryable(f"{type(e).__name__}: {reason}") from e


def _check_part(part: Path, spec: FileSpec) -> None:
    digest = sha256_of(part)
    if digest == spec.gz_sha256:
        return
    raw = part.read_bytes()
    try:  # name the structural fault when there is one: it says more than a hash mismatch
        parse_idx(decompress_if_gzip(raw, spec.stem + ".gz"), spec.stem)
    except IdxError as e:
        raise _NextMirror(str(e)) from e
    raise _NextMirror(f"sha256 {digest[:16]}... does not match the published {spec.gz_sha256[:16]}...")


def download_file(
    spec: FileSpec,
    dest_dir: Path,
    mirrors: Sequence[str],
    *,
    attempts: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    show_progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    failed_mirrors: set[str] | None = None,
) -> Path:
    """Download `spec` into `dest_dir/<stem>.gz`, verified, trying each mirror in turn.

    Mirrors that fail are added to `failed_mirrors` when given, so a caller fetching several files
    can try them last for the rest instead of waiting out a dead one for every file.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / f"{spec.stem}.gz"
    part = dest_dir / f"{spec.stem}.gz.part"
    cap = max(2 * spec.size, 1 << 20)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    failures: list[str] = []
    for base in mirrors:
        url = base + final.name
        for attempt in range(1, attempts + 1):
            bar = None
            if show_progress:
                from tqdm import tqdm

                bar = tqdm(total=spec.size, unit="B", unit_scale=True, desc=final.name, leave=False)
            try:
                _fetch_once(url, part, cap, timeout, bar.update if bar else (lambda n: None))
                _check_part(part, spec)
                os.replace(part, final)  # atomic on POSIX: the final name appears complete or not at all
                return final
            except _Retryable as e:
                failures.append(f"{url}: {e}")
                if failed_mirrors is not None and attempt == attempts:
                    failed_mirrors.add(base)
                if attempt < attempts:
                    delay = backoff * 2 ** (attempt - 1)
                    log(f"  {url}: {e}; retrying in {delay:.2g}s")
                    time.sleep(delay)
                    continue
                log(f"  {url}: {e}; giving up on this mirror")
            except _NextMirror as e:
                failures.append(f"{url}: {e}")
                if failed_mirrors is not None:
                    failed_mirrors.add(base)
                log(f"  {url}: {e}; trying the next mirror")
            finally:
                if bar is not None:
                    bar.close()
                part.unlink(missing_ok=True)
            break
    counted = {f: failures.count(f) for f in failures}  # one line per distinct failure, in order
    lines = [f + (f" (x{n})" if n > 1 else "") for f, n in counted.items()]
    raise DownloadError(
        f"could not download {final.name} from any mirror:\n  " + "\n  ".join(lines)
        + "\nOffline choices: --dataset digits (bundled), apt-get install dataset-fashion-mnist, "
        "or --data-dir DIR with the four IDX files."
    )
