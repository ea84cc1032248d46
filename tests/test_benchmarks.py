"""The benchmark entry points still import and parse their arguments (they run by hand, not in the suite, so a
renamed function or option would otherwise go unnoticed until someone measures)."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py") if p.stem != "__init__"
)
BENCH_EXTRA = {"implicit", "psutil", "threadpoolctl"}  # `.[bench]`, not installed by `make test`


@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_benchmark_imports_and_answers_help(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name in BENCH_EXTRA:
            pytest.skip(f"benchmarks/{name}.py needs {exc.name} (pip install -e '.[bench]')")
        raise
    main = getattr(module, "main", None)
    if main is None or "argparse" not in inspect.getsource(module):
        return  # a helper module, or a benchmark without options
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", "--help"])
    with pytest.raises(SystemExit) as exited:
        main(["--help"]) if inspect.signature(main).parameters else main()
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out
