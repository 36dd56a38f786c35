"""The benchmark scripts, loaded as modules for their smoke tests."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def load_benchmark(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """``load_benchmark("network")``: the script ``benchmarks/network.py`` as a module
    (``benchmarks/`` is on ``sys.path`` for the test, so its own imports resolve)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module
