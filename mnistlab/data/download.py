"""Verified downloads: mirrors in order, retries with backoff, private .part files, atomic rename.

Only what can succeed on a second try is retried: a timeout, a 5xx or 429, a connection reset or cut
short. A mirror whose name does not resolve, whose network is unreachable, that refuses the connection
or fails its certificate is left at once for the next one, without a retry or a wait; so a machine
without a network reaches the offline choices in milliseconds, not after a minute of backoff.

A file reaches its final name only after its sha256 matched and its gzip and IDX structure parsed,
so a final-named file with a wrong hash never exists, whatever is killed when. Each attempt writes
its own `.<file>.<random>.part` beside the final name, so two processes (or threads) fetching the
same dataset never write into one file; the last rename wins, and both renames put the same
verified bytes in place. A local write that fails (disk full, read-only or unwritable folder,
quota) is a DiskError at once: retrying or asking another mirror cannot fix the disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import secrets
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from mnistlab.data.idx import IdxError, decompress_if_gzip, parse_idx
from mnistlab.data.registry import FileSpec
from mnistlab.errors import UserError

MIRRORS_ENV = "MNISTLAB_MIRRORS"  # comma-separated base URLs that replace a dataset's own mirrors
CHUNK = 1 << 16
STALE_PART_SECONDS = 3600  # a .part untouched this long belongs to a killed download (live ones write every read)
# connecting cannot succeed on a retry: no route to the network or host, nothing listening, the network down
UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ENETDOWN, errno.EHOSTDOWN}


class DownloadError(UserError):
    """Every mirror failed for a file."""


class DiskError(UserError):
    """The downloaded bytes could not be written where they belong (full, read-only, no permission)."""


def _disk_error(path: Path, e: OSError, spec: FileSpec) -> DiskError:
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += f" ({spec.size / 1e6:.1f} MB needed)"
    return DiskError(f"cannot write {path}: {reason}")


class _Retryable(Exception):
    """A failure worth retrying on the same mirror (5xx, reset, timeout, short body)."""


class _NextMirror(Exception):
    """A failure that retrying the same mirror will not fix (4xx, wrong bytes)."""


class _Unreachable(_NextMirror):
    """The mirror cannot be reached at all (its name does not resolve, no route, connection refused)."""


class _LocalWriteFailed(Exception):
    """An OSError from writing the local file; args[0] is that OSError."""


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


def _create_part(final: Path, spec: FileSpec) -> tuple[Path, BinaryIO]:
    """A new private `.<final>.<random>.part` beside `final`, opened for writing.

    Exclusive creation of a random name, as tempfile.mkstemp does, but with the umask's permissions
    rather than mkstemp's 0600, since the file becomes the cached dataset file.
    """
    while True:
        part = final.with_name(f".{final.name}.{secrets.token_hex(6)}.part")
        try:
            return part, open(part, "xb")
        except FileExistsError:
            continue
        except OSError as e:
            raise _disk_error(final.parent, e, spec) from e


def _remove_stale_parts(final: Path) -> None:
    """Delete `.part` files of `final` left by killed downloads; a live download's file is recent."""
    cutoff = time.time() - STALE_PART_SECONDS
    for old in final.parent.glob(f".{final.name}.*.part"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # gone already, or not ours to delete: it costs disk space, nothing else
            pass


def _fetch_once(url: str, out: BinaryIO, cap: int, timeout: float, progress: Callable[[int], None]) -> None:
    """GET `url` into the new file `out`, then fsync and close it."""
    request = urllib.request.Request(url, headers={"User-Agent": "mnistlab"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and int(length) > cap:
                raise _NextMirror(f"Content-Length {int(length):,} exceeds the {cap:,}-byte cap")
            got = 0
            while chunk := response.read(CHUNK):
                got += len(chunk)
                if got > cap:
                    raise _NextMirror(f"body exceeds the {cap:,}-byte cap")
                with _disk_errors():
                    out.write(chunk)
                progress(len(chunk))
            with _disk_errors():
                out.flush()
                os.fsync(out.fileno())
                out.close()
            if length is not None and got != int(length):
                raise _Retryable(f"short body: {got:,} of {int(length):,} bytes")
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code}") from e
        raise _NextMirror(f"HTTP {e.code}") from e
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, socket.gaierror):
            raise _Unreachable(f"the name does not resolve ({reason.strerror or reason}); no network?") from e
        if isinstance(reason, OSError) and reason.errno in UNREACHABLE:
            raise _Unreachable(f"cannot connect ({reason.strerror or reason})") from e
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise _NextMirror(f"certificate check failed ({reason.verify_message or reason})") from e
        raise _Retryable(f"{type(e).__name__}: {reason}") from e


@contextlib.contextmanager
def _disk_errors() -> Iterator[None]:
    """Turn an OSError of the local file into _LocalWriteFailed, past _fetch_once's network OSError clause."""
    try:
        yield
    except OSError as e:
        raise _LocalWriteFailed(e) from e


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
    can try them last for the rest instead of waiting out a dead one for every file. A failure to
    write locally raises DiskError at once, naming the path and the reason.
    """
    final = dest_dir / f"{spec.stem}.gz"
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(dest_dir, e, spec) from e
    _remove_stale_parts(final)
    cap = max(2 * spec.size, 1 << 20)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    failures: list[str] = []
    for base in mirrors:
        url = base + final.name
        for attempt in range(1, attempts + 1):
            part, out = _create_part(final, spec)  # before the request: an unwritable folder costs no download
            bar = None
            if show_progress:
                from tqdm import tqdm

                bar = tqdm(total=spec.size, unit="B", unit_scale=True, desc=final.name, leave=False)
            try:
                _fetch_once(url, out, cap, timeout, bar.update if bar else (lambda n: None))
                _check_part(part, spec)
                os.replace(part, final)  # atomic on POSIX: the final name appears complete or not at all
                return final
            except _LocalWriteFailed as e:
                raise _disk_error(final, e.args[0], spec) from e.args[0]
            except OSError as e:  # the rename (or re-reading the file just written) failed
                raise _disk_error(final, e, spec) from e
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
                if not isinstance(e, _Unreachable):  # unreachable: said once, in the error, if no mirror works
                    log(f"  {url}: {e}; trying the next mirror")
            finally:
                if bar is not None:
                    bar.close()
                with contextlib.suppress(OSError):  # a failed write leaves unflushed bytes; the file goes anyway
                    out.close()
                with contextlib.suppress(OSError):  # never let the clean-up hide the error being raised
                    part.unlink(missing_ok=True)
            break
    counted = {f: failures.count(f) for f in failures}  # one line per distinct failure, in order
    lines = [f + (f" (x{n})" if n > 1 else "") for f, n in counted.items()]
    raise DownloadError(
        f"could not download {final.name} from any mirror:\n  " + "\n  ".join(lines)
        + "\nOffline choices: --dataset digits (bundled), apt-get install dataset-fashion-mnist, "
        "or --data-dir DIR with the four IDX files."
    )
