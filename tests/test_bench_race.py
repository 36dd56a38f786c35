"""The race benchmark (benchmarks/race.py): it runs, reports, replays a seed, and can fail.

Run in-process (a few hundred schedules take about a second), so a deliberately broken
supervisor can be swapped in with ``monkeypatch`` to prove the checker sees it.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from scope_trio.core.supervisor import SessionSupervisor

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def race(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("race")


def run(race: ModuleType, *args: str) -> int:
    status: int = race.main(list(args))
    return status


def test_two_hundred_schedules_without_a_violation(
    race: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "race.json"
    status = run(race, "--schedules", "200", "--seed", "1", "--json", str(out))
    results = json.loads(out.read_text())["results"]
    assert results["violations"] == 0, capsys.readouterr().out
    assert status == 0


def test_the_report_has_what_the_readme_promises(race: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "race.json"
    status = run(race, "--schedules", "200", "--seed", "1", "--json", str(out))
    report = json.loads(out.read_text())

    assert report["benchmark"] == "race"
    assert {"platform", "cpu_count", "python"} <= report["machine"].keys()
    assert report["date"]
    argv = ["--schedules", "200", "--seed", "1", "--json", str(out)]
    assert report["command"] == shlex.join(["python", "benchmarks/race.py", *argv])
    assert report["config"] == {"seed": 1, "schedules": 200}
    results = report["results"]
    assert {
        "schedules",
        "ops",
        "violations",
        "violating_seeds",
        "schedules_per_second",
        "stop_latency_virtual_s",
        "fingerprint",
    } <= results.keys()
    assert results["schedules"] == 200
    assert results["ops"] >= 200 * 30
    assert status == (1 if results["violations"] else 0)
    latency = results["stop_latency_virtual_s"]
    assert {"count", "p50", "p99", "max"} == latency["all"].keys()
    assert set(latency["by_phase"]) == {
        "idle",
        "connecting",
        "connected",
        "backoff",
        "reconnecting",
        "failed",
        "link_down",
    }
    assert latency["all"]["count"] >= 200  # every schedule ends with a stop


def test_the_same_seeds_replay_the_same_virtual_history(race: ModuleType) -> None:
    first = race.run_schedules(7, 40, report=lambda message: None)
    again = race.run_schedules(7, 40, report=lambda message: None)
    assert first["fingerprint"] == again["fingerprint"]
    assert first["stop_latency_virtual_s"] == again["stop_latency_virtual_s"]
    other = race.run_schedules(8, 40, report=lambda message: None)
    assert other["fingerprint"] != first["fingerprint"]


# ------------------------------------------------------- the checker can fail


async def _retire_without_waiting(self: SessionSupervisor) -> None:
    """Broken on purpose: cancel the old run but start the next before it has closed."""
    if self._run is not None:
        self._run.scope.cancel()
        self._run = None


def _forget_updates_while_disconnected(original: Callable[..., None]) -> Callable[..., None]:
    def update_parameters(self: SessionSupervisor, update: Mapping[str, Any]) -> None:
        if self._session is not None:  # broken on purpose: drop the update otherwise
            original(self, update)

    return update_parameters


BUGS: dict[str, tuple[str, Any, str]] = {
    "two live sessions": ("_retire", _retire_without_waiting, "sessions were live at once"),
    "lost updates": (
        "update_parameters",
        _forget_updates_while_disconnected(SessionSupervisor.update_parameters),
        "but the client set",
    ),
}


@pytest.mark.parametrize("bug", BUGS)
def test_a_broken_supervisor_is_caught_and_its_seed_replays(
    race: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    bug: str,
) -> None:
    name, broken, symptom = BUGS[bug]
    monkeypatch.setattr(SessionSupervisor, name, broken)
    out = tmp_path / "race.json"

    assert run(race, "--schedules", "100", "--seed", "1", "--json", str(out)) == 1
    results = json.loads(out.read_text())["results"]
    assert results["violations"] > 0
    printed = capsys.readouterr().out
    found = re.findall(r"^VIOLATION seed=(\d+): (.*)$", printed, re.MULTILINE)
    assert len({seed for seed, _ in found}) == results["violating_schedules"]
    seed, message = next((s, m) for s, m in found if symptom in m)

    assert run(race, "--seed", seed, "--schedules", "1") == 1
    assert f"VIOLATION seed={seed}: {message}" in capsys.readouterr().out


def test_check_fails_on_violations_slower_runs_and_longer_stops(race: ModuleType) -> None:
    results = race.run_schedules(3, 20, report=lambda message: None)
    results["violations"] = 0
    report = {"benchmark": "race", "config": {"seed": 3, "schedules": 20}, "results": results}
    baselines = {"seed=3 schedules=20": copy.deepcopy(report)}
    assert not race.check(report, baselines).failed

    broken = copy.deepcopy(report)
    broken["results"]["violations"] = 1
    assert race.check(broken, baselines).failed

    slow = copy.deepcopy(report)
    slow["results"]["schedules_per_second"] = results["schedules_per_second"] * 0.2
    assert race.check(slow, baselines).failed

    longer = copy.deepcopy(report)
    longer["results"]["stop_latency_virtual_s"]["all"]["p99"] += 0.5
    assert race.check(longer, baselines).failed

    elsewhere = copy.deepcopy(report)
    elsewhere["config"] = {"seed": 4, "schedules": 20}
    elsewhere["results"]["stop_latency_virtual_s"]["all"]["p99"] += 0.5
    checks = race.check(elsewhere, baselines)
    assert not checks.failed, "other seeds: latency is shown, not compared"
    assert "stop p99" in checks.table()
