"""The notebooks (notebooks/NN_name.py, executed into NN_name.ipynb by notebooks/build.py) are in step.

Executing them is CI's job (`python notebooks/build.py --check` in .ci/run, a minute or more per chapter);
these quick checks catch the commoner slip: a chapter's .py edited and its .ipynb not rebuilt, or a
notebook committed unexecuted or with an error in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
MAX_FOLDER_BYTES = 6_000_000  # the repository stays small: figures at modest resolution

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")


def code_cells(nb) -> list[str]:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


def test_there_are_chapters():
    assert len(SOURCES) >= 10, [p.name for p in SOURCES]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_each_chapter_has_its_executed_notebook_in_step(source: Path):
    built = source.with_suffix(".ipynb")
    assert built.is_file(), f"{built.name} missing: run python notebooks/build.py {source.name[:2]}"
    nb = nbformat.read(built, as_version=4)
    assert code_cells(nb) == code_cells(jupytext.read(source)), (
        f"{built.name} is older than {source.name}: run python notebooks/build.py {source.name[:2]}")
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert cells and all(c.execution_count for c in cells), f"{built.name} has cells that never ran"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{built.name}: {errors[0].ename}: {errors[0].evalue}"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "a chapter opens with a title"


def test_the_folder_stays_small():
    size = sum(p.stat().st_size for p in NOTEBOOKS.rglob("*") if p.is_file())
    assert size < MAX_FOLDER_BYTES, f"notebooks/ is {size / 1e6:.1f} MB"
