"""Execute the notebooks and write them with their outputs: the one way the `.ipynb` files are made.

    python notebooks/build.py              # run every chapter, write notebooks/NN_name.ipynb with outputs
    python notebooks/build.py 03 05        # only the chapters whose names start with 03 or 05
    python notebooks/build.py --check      # run them all, write nothing; exit 1 if any cell fails (CI)

Why two files per chapter: the source of a chapter is `NN_name.py`, a plain Python file in jupytext's
"percent" format (`# %%` starts a code cell, `# %% [markdown]` a prose cell), so a change to a chapter is
a readable diff of text. The `.ipynb` beside it is generated here, executed top to bottom in a fresh
kernel, so the repository page shows every chapter with its printed numbers and figures. Never edit an
`.ipynb` by hand: edit the `.py`, run this script, commit both (tests/test_notebooks.py checks that the
pair agrees and that every cell ran without an error).

Every chapter asserts its claims: a failed assert is a failed cell, and a failed cell fails the build.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET_S = 90  # a chapter runs top to bottom in at most this long on a 2-core laptop CPU
CELL_TIMEOUT_S = 600


def chapters(prefixes: list[str]) -> list[Path]:
    """The chapter sources (NN_name.py), in order; only those starting with one of `prefixes` if any."""
    found = sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(x) for x in prefixes)]
    return found


def execute(source: Path):
    """The chapter as a notebook, executed in a fresh python3 kernel whose working directory is notebooks/."""
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.pop("jupytext", None)  # the pairing header is the .py's business, not the page's
    # the kernel talks to this process over Unix sockets in a private folder (ipc), not TCP on localhost: ipykernel
    # warns that unencrypted TCP could be read by anyone on the machine, and a socket folder only we can open
    # cannot be
    with tempfile.TemporaryDirectory(prefix="mnistlab-kernel-") as sockets:
        client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(HERE)}})
        # nbclient's own (asynchronous) manager, so its cell timeout works and it stops the kernel and its
        # channels itself, on errors too; only where the sockets go is ours
        manager = client.create_kernel_manager()
        manager.transport, manager.ip = "ipc", str(Path(sockets) / "kernel")
        client.execute()
    for cell in nb.cells:  # timestamps would make every rebuild a diff
        cell.get("metadata", {}).pop("execution", None)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="*", help="chapter numbers or names (default: every chapter)")
    parser.add_argument("--check", action="store_true", help="execute only; write nothing (CI)")
    args = parser.parse_args(argv)

    import nbformat
    from nbclient.exceptions import CellExecutionError

    sources = chapters(args.prefixes)
    if not sources:
        print(f"no chapter matches {args.prefixes}", file=sys.stderr)
        return 2
    failed, total = [], time.perf_counter()
    for source in sources:
        start = time.perf_counter()
        try:
            nb = execute(source)
        except CellExecutionError as e:
            print(f"FAIL  {source.name}: {e}", file=sys.stderr)
            failed.append(source.name)
            continue
        seconds = time.perf_counter() - start
        over = f"  (over the {BUDGET_S} s budget)" if seconds > BUDGET_S else ""
        print(f"ok    {source.name}: {seconds:.1f} s{over}", flush=True)
        if not args.check:
            nbformat.write(nb, source.with_suffix(".ipynb"))
    print(f"{len(sources) - len(failed)}/{len(sources)} chapters ran in {time.perf_counter() - total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
