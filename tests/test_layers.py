"""The house rules, checked on the source (no Spark): the layers and the size of the rooms (docs/DEVELOPMENT.md).

Layers, lowest first; a module imports only from its own layer or lower ones:
1. `udfs`: numpy kernels (the standard library, numpy and udfs only);
2. `pipelines.core`: the machinery (config, session, tables, events, re-rank plumbing); never a step;
3. the steps and their helpers: every other module of `pipelines` (ingest ... evaluate, the stream package);
4. the entry points: `pipelines.cli`, `pipelines.api` (notebooks), `pipelines.inspection`, `pipelines.runner`, `pipelines.steps` (the one
   registry of steps), `pipelines.submit` (spark-submit), plus dags/ and notebooks/ outside the package.

Sizes: a module of pipelines/ or udfs/ has at most 400 lines and a function at most 60, unless a comment on the line
above its `def` (or the module's first line) starts with `# long:` and says why.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ENTRY = (
    "pipelines.cli",
    "pipelines.api",
    "pipelines.inspection",
    "pipelines.runner",
    "pipelines.steps",
    "pipelines.submit",
)
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
LONG = "# long:"


def modules() -> dict[str, Path]:
    found = {}
    for package in ("pipelines", "udfs"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imported(path: Path) -> set[str]:
    """Every module `path` imports (at any depth, inside functions too), and every module named in a string literal
    passed to importlib.import_module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def layer(module: str) -> int:
    if module == "udfs" or module.startswith("udfs."):
        return 1
    if module == "pipelines.core" or module.startswith("pipelines.core."):
        return 2
    if any(module == e or module.startswith(f"{e}.") for e in ENTRY):
        return 4
    return 3


def known(name: str, ours: dict[str, Path]) -> str | None:
    """`name` as one of our modules (from x import y names y when y is a module, else x), None if not ours."""
    while name and name not in ours:
        name = name.rpartition(".")[0]
    return name if name not in ("", "pipelines", "udfs") else None  # the packages themselves hold nothing


def test_each_layer_imports_only_its_own_or_lower_layers() -> None:
    ours = modules()
    upward = []
    for module, path in ours.items():
        for name in imported(path):
            target = known(name, ours)
            if target is not None and layer(target) > layer(module):
                upward.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_udfs_need_nothing_but_numpy() -> None:
    allowed = {"numpy", "udfs"} | set(sys.stdlib_module_names)
    foreign = [
        f"{module} imports {name}"
        for module, path in modules().items()
        if layer(module) == 1
        for name in imported(path)
        if name.split(".")[0] not in allowed
    ]
    assert not foreign, "\n".join(sorted(foreign))


def test_the_checks_see_an_upward_import(tmp_path: Path) -> None:
    """The contract can fail: a core module importing a step, inside a function or through importlib, is seen."""
    source = tmp_path / "bad.py"
    source.write_text(
        "import importlib\n\ndef f():\n    from pipelines import rerank\n    importlib.import_module('pipelines.runner')\n"
    )
    ours = modules()
    targets = {known(n, ours) for n in imported(source)} - {None}
    assert targets == {"pipelines.rerank", "pipelines.runner"}
    assert layer("pipelines.core.tables") < layer("pipelines.rerank") < layer("pipelines.runner")


def oversized(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    if len(lines) > MAX_MODULE_LINES and not lines[0].startswith(LONG):
        found.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *[d.lineno for d in node.decorator_list]])
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not lines[first - 2].strip().startswith(LONG):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    return found


@pytest.mark.parametrize("package", ["pipelines", "udfs"])
def test_rooms_are_small(package: str) -> None:
    found = [f for path in sorted((REPO / package).rglob("*.py")) for f in oversized(path)]
    assert not found, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function:\n" + "\n".join(found)


def test_the_size_check_sees_a_long_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    path = REPO / "tests" / f"_long_{tmp_path.name}.py"  # under REPO: oversized names paths relative to it
    try:
        path.write_text(f"def f():\n{body}\n\n{LONG} a reason\ndef g():\n{body}")
        assert [f.split(" ")[1] for f in oversized(path)] == ["f:"]
    finally:
        path.unlink()
