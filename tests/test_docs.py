"""Every relative link and image in README.md, docs/**/*.md and notebooks/README.md points at a file the repo holds.

"Holds" means tracked by git or about to be (untracked and not ignored): a figure that exists only
on the machine that drew it, because .gitignore drops it, is a broken image for everyone else.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md")), ROOT / "notebooks" / "README.md"]

FENCED_CODE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
INLINE = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")  # [t](x), ![a](x)
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)  # [label]: x
HTML = re.compile(r"\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)  # <img src="x">, <a href="x">
EXTERNAL = ("http://", "https://", "mailto:")


def links(text: str) -> list[str]:
    """Link and image targets of a markdown text, code blocks and code spans left out."""
    text = CODE_SPAN.sub("", FENCED_CODE.sub("", text))
    found = [m.group(1) for pattern in (INLINE, REFERENCE, HTML) for m in pattern.finditer(text)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in found]


def repository_files(root: Path) -> set[str] | None:
    """Paths (relative, '/'-separated) git tracks or would track under root; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {p for p in out.decode().split("\0") if p}


def broken_links(md: Path, root: Path, files: set[str] | None) -> list[str]:
    """The relative targets in `md` that name no file (or folder of files) of the repository at root."""
    broken = []
    for target in links(md.read_text(encoding="utf-8")):
        if target.lower().startswith(EXTERNAL) or target.startswith("#"):
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        resolved = (root / path.lstrip("/")) if path.startswith("/") else (md.parent / path)
        resolved = resolved.resolve()
        if not resolved.is_relative_to(root.resolve()) or not resolved.exists():
            broken.append(target)
            continue
        if files is not None:
            rel = resolved.relative_to(root.resolve()).as_posix()
            if rel not in files and not any(f.startswith(rel + "/") for f in files):
                broken.append(target)  # on this disk, but not in the repository (ignored)
    return broken


FILES = repository_files(ROOT)


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_image_resolves_to_a_repository_file(md):
    assert broken_links(md, ROOT, FILES) == []


def test_readme_links_are_found_at_all():
    targets = links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(targets) > 0
    assert any(t.endswith(".png") for t in targets)  # the figures it shows are among them


def test_the_checker_reports_missing_and_ignored_files_and_skips_the_rest(tmp_path):
    (tmp_path / "docs" / "labs").mkdir(parents=True)
    for name in ("docs/here.md", "docs/labs/fig.png", "docs/labs/ignored.png", "guide.md"):
        (tmp_path / name).write_text("x")
    md = tmp_path / "docs" / "page.md"
    md.write_text(
        "[ok](here.md) [ok with fragment](here.md#part) ![ok image](labs/fig.png \"a title\")\n"
        "[ok from the root](/guide.md) [ok folder](labs/) [anchor](#top) [web](https://example.org/x.png)\n"
        "[mail](mailto:a@b.c) `[in code](nowhere.md)`\n"
        "```\n![in a code block](nowhere.png)\n```\n"
        "[missing](gone.md) ![missing image](labs/gone.png) [missing with fragment](gone.md#x)\n"
        "[![badge](labs/fig.png)](labs/badge-target.md) <img src=\"labs/also-gone.png\">\n"
        "![ignored by git](labs/ignored.png) [outside](../../elsewhere.md)\n"
        "[ref]: refs/gone.md\n",
        encoding="utf-8",
    )
    expected = ["gone.md", "labs/gone.png", "gone.md#x", "labs/badge-target.md", "../../elsewhere.md",
                "refs/gone.md", "labs/also-gone.png"]
    on_disk_only = broken_links(md, tmp_path, None)
    assert sorted(on_disk_only) == sorted(expected)
    tracked = {"docs/here.md", "docs/labs/fig.png", "guide.md", "docs/page.md"}  # ignored.png is not
    assert sorted(broken_links(md, tmp_path, tracked)) == sorted([*expected, "labs/ignored.png"])
