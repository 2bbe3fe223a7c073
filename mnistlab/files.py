"""How mnistlab writes files: atomically, as strict JSON, with the user's permissions, and with a
clear error instead of a traceback when the disk says no.

Atomic: a temporary file in the same folder, fsync, rename, fsync of the folder; a kill at any moment
leaves the previous complete file. Strict JSON: NaN and Infinity are not JSON, so a value that is not
finite is a bug to report, never a file that other tools cannot parse.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mnistlab.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_error(path: Path | str, err: OSError) -> UserError:
    """One line naming the file and the reason (ENOSPC, EACCES, EROFS, ...)."""
    reason = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    return UserError(f"cannot write {path}: {reason}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is always either the old or the new complete file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file is the user's like any other
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise disk_error(path, e) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON: a NaN or infinity raises ValueError instead of writing a bare NaN."""
    return json.dumps(obj, indent=indent, allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as strict, indented JSON with a final newline."""
    atomic_write_text(path, to_json(obj) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line (metrics.jsonl); a full disk is a clear error naming the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
    except OSError as e:
        raise disk_error(path, e) from None


def remove_orphan_temps(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files that a killed atomic write of one of `names` left behind in `folder`.

    Only files of that exact shape (.<name>.<random>.tmp): a folder may hold other programs' files.
    Only safe while no other process writes there: call it with the run folder's lock held.
    """
    removed = []
    for name in names:
        for p in folder.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
