"""benchmarks/network.py end to end, tiny: one unimpaired profile and one clean loss.

A real ``scope-trio serve`` and ``scope-trio devcloud`` (subprocesses) with the emulator in
between; the report has what the README promises and the fault is seen (a functional
check, not a speed assert).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def test_network_runs_profiles_through_the_emulator(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    bench = load_benchmark("network")
    out = tmp_path / "network.json"
    argv = ["--duration", "1", "--observe", "4", "--profiles", "clean,close_pc", "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())

    assert report["benchmark"] == "network"
    assert report["command"] == shlex.join(["python", "benchmarks/network.py", *argv])
    assert report["config"] == {
        "seconds": 1.0,
        "profiles": "clean,close_pc",
        "seed": 0,
        "observe": 4.0,
    }
    results = report["results"]
    assert results["errors"] == 0
    clean, close_pc = results["profiles"]["clean"], results["profiles"]["close_pc"]
    for profile in (clean, close_pc):
        assert profile["frames_delivered"] > 0
        assert profile["latency_s"]["count"] == profile["frames_delivered"]
        assert {"count", "total_s", "longest_s", "list"} <= profile["freezes"].keys()
        assert profile["netem"]["up"]["forwarded"] > 0  # the media went through the relay
        assert profile["netem"]["down"]["forwarded"] > 0
        assert {"max_s", "over_5ms", "over_20ms"} == profile["netem"]["lateness"].keys()
    assert clean["false_losses"] == 0
    # The dev cloud closed its peer connection: the server saw it and a new session streams.
    assert close_pc["rebuilds"] >= 1
    fault = close_pc["fault"]
    assert fault["detection_s"] is not None
    assert fault["first_live_s"] is not None
    assert fault["detection_s"] <= fault["first_live_s"]
