"""The README's layout line, checked: each module imports only from its own layer or the layers before it.

Lazy imports inside functions count too: they are how a module reaches up without paying for it at import,
and a reach upward is what makes a codebase hard to take over, cheap or not.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mnistlab"

# Bottom to top; the README's "Layout" line says the same in words.
LAYERS = [
    {"errors", "files", "config"},
    {"data"},
    {"models"},
    {"optim", "checkpoint", "distributed", "run", "gradflow", "tensorboard", "evaluate", "plots"},
    {"loop", "calibration"},
    {"lifecycle", "scratch"},
    {"training", "pretrain"},
    {"record"},
    {"deploy", "inspect", "labs"},
    {"api", "cli", "__main__", "__init__"},
]


def _layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"mnistlab.{name} is in no layer: add it to LAYERS and to the README's layout line")


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """The mnistlab modules (top level) that `path` imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnistlab"):
            if node.module == "mnistlab":  # `from mnistlab import x`: a module, or __version__ (a constant of
                # the package, which every submodule's import loads first anyway)
                found |= {a.name for a in node.names
                          if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").exists()}
            else:
                found.add(_top(node.module))
        elif isinstance(node, ast.Import):
            found |= {_top(a.name) for a in node.names if a.name.startswith("mnistlab")}
    return found


def test_every_module_imports_only_from_its_layer_or_below():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        me = rel.parts[0].removesuffix(".py")
        for other in _imports(path) - {me}:
            if _layer_of(other) > _layer_of(me):
                upward.append(f"{rel} imports mnistlab.{other}")
    assert upward == []


def test_the_layers_name_every_module():
    names = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    for name in names:
        _layer_of(name)
