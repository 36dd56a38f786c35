"""The relay and load benchmarks (benchmarks/relay.py, api_load.py, load.py) run and report.

Each runs its real ``main`` in a tiny mode (2 s windows; the servers are subprocesses), so
this proves the whole chain (subprocess servers, the aiortc browser, numbered frames, the
load worker, the report) works, not the numbers themselves.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from scope_trio import rtc


def test_counter_frames_read_back(load_benchmark: Callable[[str], ModuleType]) -> None:
    relay = load_benchmark("relay")
    for n in (1, 2, 0x555, 0xAAA, 4095):
        assert relay.read_counter(relay.counter_frame(n)) == n
    assert relay.read_counter(rtc.black_frame(512, 512)) is None, "black carries no number"


def test_relay_benchmark_reports_both_servers(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    relay = load_benchmark("relay")
    out = tmp_path / "relay.json"
    argv = ["--quick", "--seconds", "2", "--json", str(out)]
    status = relay.main(argv)
    report = json.loads(out.read_text())
    results = report["results"]
    assert results["errors"] == 0, results["error_messages"]
    assert status == 0
    assert report["benchmark"] == "relay"
    assert {"platform", "cpu_count", "python"} <= report["machine"].keys()
    assert report["date"]
    assert report["command"] == shlex.join(["python", "benchmarks/relay.py", *argv])
    assert report["config"] == {"seconds": 2.0, "rounds": 1, "size": "512x512", "fps": 30.0}
    for system in ("scope-trio", "asyncio"):
        stats = results["systems"][system]
        assert stats["frames_delivered"] > 0, system
        latency = stats["latency_s"]  # empty only if the camera stalled (a loaded machine)
        assert latency["count"] == 0 or latency["p50"] > 0
        assert stats["cpu_ms_per_frame"] > 0
    assert {r["system"] for r in results["runs"]} == {"scope-trio", "asyncio"}
    assert set(results["ratios"]) == {
        "cpu_per_frame",
        "delivered_fps",
        "latency_p50",
        "latency_p99",
    }
    assert results["ratios"]["delivered_fps"] > 0


def test_api_load_benchmark_reports_latency_and_errors(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    api_load = load_benchmark("api_load")
    out = tmp_path / "api_load.json"
    argv = ["--seconds", "2", "--pollers", "10", "--subscribers", "3", "--json", str(out)]
    status = api_load.main(argv)
    report = json.loads(out.read_text())
    results = report["results"]
    assert results["errors"] == 0, results["load"]["error_messages"]
    assert status == 0
    assert report["benchmark"] == "api_load"
    assert report["config"] == {"seconds": 2.0, "pollers": 10, "subscribers": 3}
    load = results["load"]
    assert load["polls"] > 0
    assert load["poll_latency_s"]["p50"] > 0
    assert load["sse_events"] >= 3, "every subscriber got at least the current status"
    for window in ("unloaded", "loaded"):
        assert results[window]["frames_delivered"] > 0
    assert results["ratios"]["delivered_fps"] > 0


def test_load_benchmark_reports_errors_memory_and_fps(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    """benchmarks/load.py end to end in its shortest window: the dev cloud and the server as
    processes of their own, the two faults, the paced load worker, the report."""
    load = load_benchmark("load")
    out = tmp_path / "load.json"
    argv = [
        "--seconds",
        str(load.MIN_SECONDS),
        "--pollers",
        "10",
        "--subscribers",
        "3",
        "--modes",
        "paced",
        "--json",
        str(out),
    ]
    load.main(argv)  # its status also judges fps on a 6 s window: not this test's business
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["benchmark"] == "load"
    assert results["errors"] == 0
    assert set(results["runs"]) == {"unloaded", "paced"}
    for run in results["runs"].values():
        assert run["frames_delivered"] > 0
    paced = results["runs"]["paced"]["load"]
    assert paced["polls"] > 0
    assert paced["sse_events"] >= 3
    assert results["ratios"]["paced"]["delivered_fps"] > 0
    assert results["memory"]["paced"]
