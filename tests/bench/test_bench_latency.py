"""The latency benchmark (benchmarks/latency.py) runs and reports every stage of both relays.

A tiny run (2 s per server, subprocesses under the stage tracer): proves the chain (tracer
in every process, events matched to frame numbers, stages in path order, PSNR) works, not
the numbers themselves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def test_latency_benchmark_reports_every_stage_of_both_relays(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    latency = load_benchmark("latency")
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
