"""Figures are written whole or not at all: a full disk is a one-line UserError, never a broken PNG."""

from __future__ import annotations

import errno
import os

import pytest

from mnistlab.errors import UserError
from mnistlab.plots import pyplot, save_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_figure():
    fig, ax = pyplot().subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


def full_disk() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class HalfWrittenFile:
    """A file on a disk that fills up halfway through the write."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise full_disk()


def fill_disk(monkeypatch, where: str) -> None:
    """Make the disk full at `where`: during the write (half the bytes land) or at fsync."""
    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWrittenFile(real_fdopen(fd, *a, **k)))
    else:
        def fsync(fd):
            raise full_disk()

        monkeypatch.setattr(os, "fsync", fsync)


def test_save_figure_writes_a_png_and_makes_its_folder(tmp_path):
    out = save_figure(small_figure(), tmp_path / "new" / "fig.png")
    assert out == tmp_path / "new" / "fig.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["fig.png"]  # no temporary file left beside it


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_is_a_user_error_and_leaves_no_file(tmp_path, monkeypatch, where):
    out = tmp_path / "fig.png"
    fill_disk(monkeypatch, where)
    with pytest.raises(UserError) as e:
        save_figure(small_figure(), out)
    assert str(e.value) == f"cannot write {out}: No space left on device"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # nor a partial temporary file


def test_full_disk_keeps_the_previous_figure_intact(tmp_path, monkeypatch):
    out = save_figure(small_figure(), tmp_path / "fig.png")
    before = out.read_bytes()
    fill_disk(monkeypatch, "write")
    with pytest.raises(UserError, match="No space left on device"):
        save_figure(small_figure(), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def test_full_disk_in_the_cli_is_exit_2_with_the_message(tmp_path, monkeypatch, capsys):
    from mnistlab.cli import main
    from mnistlab.labs import load_lab

    out = tmp_path / "lm.png"
    def figure_only(out):  # the lab's save_figure without its computations (a second, not under test here)
        save_figure(small_figure(), out)
        return []

    monkeypatch.setattr(load_lab("linear-map"), "run", figure_only)
    fill_disk(monkeypatch, "write")
    assert main(["lab", "linear-map", "-o", str(out)]) == 2
    assert f"cannot write {out}: No space left on device" in capsys.readouterr().err
    assert not out.exists()
