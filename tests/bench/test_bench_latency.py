"""The latency benchmark (benchmarks/latency.py) runs and reports every stage of both relays.

A tiny run (2 s per server, subprocesses under the stage tracer): proves the chain (tracer
in every process, events matched to frame numbers, stages in path order, PSNR) works, not
the numbers themselves.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_latency_benchmark_reports_every_stage_of_both_relays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    latency = importlib.import_module("latency")
    out = tmp_path / "latency.json"
    status = latency.main(["--quick", "--seconds", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    results = report["results"]
    assert results["errors"] == 0, results["error_messages"]
    assert status == 0
    for system in ("scope-trio", "asyncio"):
        stats = results["systems"][system]
        assert set(stats["stages"]) == set(latency.stage_names())
        assert stats["frames_traced"] > 0, system
        total = stats["stages"]["total"]
        assert total["p50"] > 0
        # Each stage is a part of the trip: none is longer than the whole.
        assert all(s["p50"] <= total["p95"] for s in stats["stages"].values())
        assert stats["psnr_db"] is not None
