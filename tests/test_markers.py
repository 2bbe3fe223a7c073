"""The `slow` marker is honest: a test that trains a model, exports ONNX or starts a process carries it.

An ast scan of tests/test_*.py, no import of them. A test is expensive when its body (or a fixture it asks for, or a
helper function of its module that it calls) calls subprocess.run/Popen/check_output, `main(["train"|"pretrain", ...])`
compared with 0 or 1 (a run that got to train), a module's `train(...)`/`pretrain(...)`/`export_onnx(...)` outside a
`pytest.raises` block (there it is refused before any work), or asks for a fixture of its module that does. Such a
test needs `pytest.mark.slow` on itself, in one of its parametrize cases, or in its module's `pytestmark`.
What it cannot see: fixtures of conftest.py (none trains), a run that trains and then fails (`== 2`), `compare`'s grid
(tests/test_compare.py's grid fixture), and seconds spent otherwise (figures, big data): `pytest -m "not slow"
--durations=20` shows those."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call"}
WORK_CALLS = {"train", "pretrain", "export_onnx"}  # called as a function, or as mnistlab.train, scratch_train.train


def _is_slow_mark(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "slow" for n in ast.walk(node))


def _raises_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `with pytest.raises(...)` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call) and isinstance(item.context_expr.func, ast.Attribute)
                and item.context_expr.func.attr == "raises" for item in node.items):
            inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return inside


def _command(elts: list[ast.expr], lists: dict[str, list[ast.expr]]) -> object:
    """The first word of a `main([...])` argument list, through module-level lists such as `[*PRETRAIN, ...]`."""
    if not elts:
        return None
    first = elts[0]
    if isinstance(first, ast.Starred) and isinstance(first.value, ast.Name) and first.value.id in lists:
        return _command(lists[first.value.id], lists)
    return first.value if isinstance(first, ast.Constant) else None


def _expensive_calls(func: ast.FunctionDef, lists: dict[str, list[ast.expr]]) -> list[str]:
    """The calls in `func` that train, export or start a process (helpers and fixtures aside)."""
    found, exempt = [], _raises_blocks(func)
    compared = {}  # id(call) -> the constant it is compared with
    for node in ast.walk(func):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and len(node.comparators) == 1 \
                and isinstance(node.comparators[0], ast.Constant):
            compared[id(node.left)] = node.comparators[0].value
    for node in ast.walk(func):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "subprocess" \
                and f.attr in PROCESS_CALLS:
            found.append(f"subprocess.{f.attr}")
        elif isinstance(f, ast.Name) and f.id == "main" and node.args and isinstance(node.args[0], ast.List) \
                and _command(node.args[0].elts, lists) in ("train", "pretrain") and compared.get(id(node)) in (0, 1):
            found.append(f'main(["{_command(node.args[0].elts, lists)}", ...]) == {compared[id(node)]}')
        elif id(node) not in exempt and node.args and (
                (isinstance(f, ast.Name) and f.id in WORK_CALLS)
                or (isinstance(f, ast.Attribute) and f.attr in WORK_CALLS and isinstance(f.value, ast.Name)
                    and f.value.id in ("mnistlab", "scratch_train", "training_module", "pretrain_module"))):
            found.append(f"{ast.unparse(f)}(...)")
    return found


def _fixture_scope(func: ast.FunctionDef) -> str | None:
    """None when `func` is no fixture, else its scope."""
    for deco in func.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Attribute) and target.attr == "fixture":
            for kw in getattr(deco, "keywords", []):
                if kw.arg == "scope" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
            return "function"
    return None


def unmarked_expensive_tests(path: Path) -> list[str]:
    """`name: why` for each test in `path` that trains, exports or starts a process with no slow marker."""
    tree = ast.parse(path.read_text(), str(path))
    module_slow = any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
                      and _is_slow_mark(node.value) for node in tree.body)
    if module_slow:
        return []
    funcs = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    lists = {node.targets[0].id: node.value.elts for node in tree.body if isinstance(node, ast.Assign)
             and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.List)}
    why: dict[str, list[str]] = {name: _expensive_calls(f, lists) for name, f in funcs.items()}
    called = {name: {n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
              for name, f in funcs.items()}
    asked = {name: {a.arg for a in f.args.args} for name, f in funcs.items()}
    changed = True
    while changed:  # through helpers it calls and fixtures it asks for, to a fixed point
        changed = False
        for name in funcs:
            if why[name]:
                continue
            for other in sorted((called[name] | asked[name]) & funcs.keys() - {name}):
                if why[other] and (other in asked[name] or _fixture_scope(funcs[other]) is None):
                    why[name] = [f"{other}: {why[other][0]}"]
                    changed = True
                    break
    return [f"{path.name}::{name}: {why[name][0]}" for name, f in funcs.items()
            if name.startswith("test_") and why[name] and not any(map(_is_slow_mark, f.decorator_list))]


def test_every_test_that_trains_exports_or_starts_a_process_is_marked_slow():
    offenders = [line for path in sorted(TESTS.glob("test_*.py")) for line in unmarked_expensive_tests(path)]
    assert offenders == [], "mark these @pytest.mark.slow (pyproject.toml's markers say why):\n" + "\n".join(offenders)


@pytest.mark.parametrize("source, expected", [
    ('import subprocess\ndef test_a():\n    subprocess.run(["ls"])\n', ["test_a: subprocess.run"]),
    ('def test_a(tmp_path):\n    assert main(["train", "--run-dir", str(tmp_path)]) == 0\n',
     ['test_a: main(["train", ...]) == 0']),
    ('def test_a():\n    assert main(["train", "--model", "nope"]) == 2\n', []),
    ('RUN = ["pretrain", "--epochs", "1"]\ndef test_a():\n    assert main([*RUN, "--seed", "1"]) == 0\n',
     ['test_a: main(["pretrain", ...]) == 0']),
    ('def test_a():\n    with pytest.raises(E):\n        mnistlab.train(epoks=1)\n', []),
    ('def helper():\n    train(cfg)\ndef test_a():\n    helper()\n', ["test_a: helper: train(...)"]),
    ('@pytest.fixture(scope="module")\ndef run():\n    train(cfg)\ndef test_a(run):\n    pass\n',
     ["test_a: run: train(...)"]),
    ('@pytest.mark.slow\ndef test_a():\n    export_onnx(run)\n', []),
    ('pytestmark = [pytest.mark.slow]\ndef test_a():\n    export_onnx(run)\n', []),
    ('@pytest.mark.parametrize("m", [pytest.param("cnn", marks=pytest.mark.slow)])\ndef test_a(m):\n    train(m)\n',
     []),
    ('def test_a(model):\n    model.train()\n', []),
])
def test_the_scan_finds_what_it_should_and_only_that(tmp_path, source, expected):
    path = tmp_path / "test_x.py"
    path.write_text(source)
    assert unmarked_expensive_tests(path) == [f"test_x.py::{line}" for line in expected]
