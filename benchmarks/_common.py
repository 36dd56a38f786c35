"""Plumbing shared by the benchmarks: the command line, the JSON report, the baseline check.

Every benchmark is a script, ``python benchmarks/<name>.py``, that accepts the same options:

* ``--quick``: a smaller run for a local look (each benchmark says what it shrinks);
* ``--check``: compare with ``benchmarks/baseline.json`` and exit 1 on a regression;
* ``--json OUT``: write the report (benchmark, machine, date, command, results) to ``OUT``;
* ``--update-baseline``: record this run in the baseline file (commit the result).

The baseline file holds, per benchmark, one recorded report per configuration (for example
``seed=0 schedules=10000``): results are only comparable number for number when the
configuration is the same, so a check looks up its own configuration first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
BASELINE_PATH = BENCH_DIR / "baseline.json"

Report = dict[str, Any]
"""``{"benchmark", "machine", "date", "command", "config", "results"}``, as written by --json."""


def make_parser(benchmark: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares."""
    parser = argparse.ArgumentParser(
        prog=f"python benchmarks/{benchmark}.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run, for a local look")
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with the baseline and exit 1 on a regression",
    )
    parser.add_argument("--json", metavar="OUT", type=Path, help="write the report as JSON to OUT")
    parser.add_argument(
        "--baseline",
        metavar="PATH",
        type=Path,
        default=BASELINE_PATH,
        help="baseline file for --check and --update-baseline (default: %(default)s)",
    )
    parser.add_argument(
        "--update-baseline",
        action="store_true",
        help="record this run as the baseline for its configuration",
    )
    return parser


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (throughput only compares on similar machines)."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces this run, as a user would type it."""
    return shlex.join(["python", f"benchmarks/{script}", *argv])


def make_report(
    benchmark: str, command: str, config: dict[str, Any], results: dict[str, Any]
) -> Report:
    return {
        "benchmark": benchmark,
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": config,
        "results": results,
    }


def write_json(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def config_key(config: dict[str, Any]) -> str:
    """``seed=0 schedules=10000``: the name a configuration's baseline is recorded under."""
    return " ".join(f"{name}={value}" for name, value in config.items())


def load_baselines(path: Path, benchmark: str) -> dict[str, Report]:
    """Every recorded report of ``benchmark``, by configuration key (empty if none)."""
    if not path.exists():
        return {}
    document = json.loads(path.read_text(encoding="utf-8"))
    runs: dict[str, Report] = document.get(benchmark, {})
    return runs


def update_baseline(path: Path, report: Report) -> str:
    """Record ``report`` as the baseline of its benchmark and configuration; returns the key."""
    document: dict[str, Any] = {}
    if path.exists():
        document = json.loads(path.read_text(encoding="utf-8"))
    key = config_key(report["config"])
    document.setdefault(report["benchmark"], {})[key] = report
    write_json(path, document)
    return key


@dataclass
class Row:
    metric: str
    value: str
    baseline: str
    limit: str
    verdict: str
    """``ok``, ``FAIL`` or ``note`` (shown, never fails the check)."""


@dataclass
class Checks:
    """The rows of a ``--check`` table; the check fails if any row says FAIL."""

    rows: list[Row] = field(default_factory=list)

    def add(self, metric: str, value: str, baseline: str, limit: str, ok: bool | None) -> None:
        verdict = "note" if ok is None else "ok" if ok else "FAIL"
        self.rows.append(Row(metric, value, baseline, limit, verdict))

    @property
    def failed(self) -> bool:
        return any(row.verdict == "FAIL" for row in self.rows)

    def table(self) -> str:
        header = Row("metric", "value", "baseline", "limit", "verdict")
        rows = [header, *self.rows]
        columns = ("metric", "value", "baseline", "limit", "verdict")
        widths = {c: max(len(getattr(r, c)) for r in rows) for c in columns}
        lines = []
        for index, row in enumerate(rows):
            lines.append("  ".join(getattr(row, c).ljust(widths[c]) for c in columns).rstrip())
            if index == 0:
                lines.append("  ".join("-" * widths[c] for c in columns))
        return "\n".join(lines)


def finish(checks: Checks, *, title: str) -> int:
    """Print the check table and a one-line verdict; the exit status for ``main``."""
    print(f"\n{title}")
    print(checks.table())
    if checks.failed:
        print("CHECK FAILED", file=sys.stderr)
        return 1
    print("check passed")
    return 0


def conclude(
    args: argparse.Namespace,
    report: Report,
    summary: str,
    check: Callable[[Report, dict[str, Report]], Checks],
    *,
    failure: str | None = None,
) -> int:
    """The end every benchmark's ``main`` shares; returns its exit status.

    Prints ``summary``, writes ``--json``, records ``--update-baseline``, and with
    ``--check`` compares with the baseline. ``failure`` says what failed whatever the
    baseline (invariant violations, errors, leaks): it makes the status 1, and is printed
    when no check table shows it.
    """
    print(summary)
    if args.json is not None:
        write_json(args.json, report)
        print(f"\nwrote {args.json}")
    if args.update_baseline:
        key = update_baseline(args.baseline, report)
        print(f"recorded the baseline for {key!r} in {args.baseline}")
    status = 1 if failure else 0
    if args.check:
        checks = check(report, load_baselines(args.baseline, report["benchmark"]))
        status = max(status, finish(checks, title=f"--check against {args.baseline}"))
    elif failure:
        print(failure, file=sys.stderr)
    return status
