"""The real-stack benchmarks (benchmarks/stop_latency.py, benchmarks/recovery.py) run end to
end with tiny counts: the report has what the README promises, and the functional bounds hold.

Each runs its own ``trio.run`` (the scripts' ``main``), so these are plain sync tests.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def test_stop_latency_reports_every_scenario_and_leaks_nothing(
    load_benchmark: Callable[[str], ModuleType],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load_benchmark("stop_latency")
    out = tmp_path / "stop_latency.json"
    argv = ["--quick", "--samples", "1", "--cycles", "5", "--json", str(out)]
    status = bench.main(argv)
    report = json.loads(out.read_text())

    assert report["benchmark"] == "stop_latency"
    assert {"platform", "cpu_count", "python"} <= report["machine"].keys()
    assert report["date"]
    assert report["command"] == shlex.join(["python", "benchmarks/stop_latency.py", *argv])
    assert report["config"] == {"samples": 1, "cycles": 5}
    results = report["results"]
    latency = results["stop_latency_s"]
    assert set(latency["by_scenario"]) == {
        "connecting",
        "connected",
        "backoff",
        "mid_attempt",
        "blackholed",
    }
    for stats in latency["by_scenario"].values():
        assert stats["count"] == 1
        assert stats["p50"] is not None
        assert stats["p50"] < 5
    assert results["cycles"]["cycles"] == 5
    assert set(results["leaks"]) == {
        "peer_connections",
        "fds",
        "sockets",
        "udp_sockets",
        "asyncio_tasks",
        "trio_tasks",
    }
    assert results["leaks"] == dict.fromkeys(results["leaks"], 0), capsys.readouterr().out
    assert status == 0


def test_recovery_measures_every_fault_and_close_pc_is_seen_at_once(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    bench = load_benchmark("recovery")
    out = tmp_path / "recovery.json"
    argv = ["--quick", "--runs", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())

    assert report["benchmark"] == "recovery"
    assert report["command"] == shlex.join(["python", "benchmarks/recovery.py", *argv])
    assert report["config"] == {"runs": 1}
    faults = report["results"]["faults"]
    assert set(faults) == {"close_pc", "blackhole", "drop_ws", "debug"}
    for metrics in faults.values():
        assert {"detection", "first_frame", "recovery", "connected_again"} <= metrics.keys()
        assert metrics["detection"]["count"] == 1
        assert 0 <= metrics["detection"]["p50"] <= metrics["first_frame"]["p50"]
    # Functional, not a speed assert: a closed peer connection is noticed at once.
    assert faults["close_pc"]["detection"]["p95"] < 0.5
