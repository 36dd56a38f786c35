"""Test matrix: ``nox`` runs lint, typecheck and the tests on Python 3.10-3.13.

Why this file finds the pyenv interpreters itself: the machines have every Python
under pyenv, but a pyenv shim such as ``python3.10`` answers "command not found"
unless that version is the selected one, so nox cannot use the shims. At import
time we therefore put every ``$(pyenv root)/versions/*/bin`` on PATH (newest first,
ahead of the shims), which makes ``python3.10`` ... ``python3.13`` real executables.
Nothing can be downloaded on these machines, so interpreter downloads are off:
a missing interpreter is an error, never a fetch and never a silent skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import nox
import nox.command

nox.needs_version = ">=2025.10.14"  # first release with the download_python option

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
SYSTEM_PYTHONS = {"3.10", "3.13"}
"""Where the whole-server tests (pytest marker ``system``: the fault matrix, the hostile
cloud, HTTP fuzzing, security) run. They take minutes, so running them four times would
push CI past its budget; 3.10 and 3.13 are the two ends of the per-Python pins (aiortc
1.15 / quart 0.20 and aiortc 1.16 / quart 0.23 + quart-trio 0.13) that 3.11 and 3.12 sit
between (aiortc 1.16 / quart 0.22), and every other test runs on all four."""


def _pyenv_root() -> Path:
    if pyenv := shutil.which("pyenv"):
        out = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    if root := os.environ.get("PYENV_ROOT"):
        return Path(root)
    return Path.home() / ".pyenv"


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", bin_dir.parent.name))


_bins = sorted(_pyenv_root().glob("versions/*/bin"), key=_version_key, reverse=True)
os.environ["PATH"] = os.pathsep.join([*map(str, _bins), os.environ.get("PATH", "")])
os.environ["UV_PYTHON_DOWNLOADS"] = "never"

nox.options.default_venv_backend = "uv"
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = True
nox.options.reuse_venv = "yes"  # CI starts from a fresh clone, so this only speeds up local runs
nox.options.sessions = ["lint", "typecheck", "tests", "e2e"]  # bench: run on its own


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Unit and integration tests (pytest; posargs are passed through)."""
    session.install("-e", ".", "--group", "tests")
    # session.run fails on any non-zero exit, so pytest's 5 (no tests collected) fails too.
    # The browser tests have their own session (e2e): they need Chromium and Playwright.
    marks = [] if session.python in SYSTEM_PYTHONS else ["-m", "not system"]
    session.run("pytest", "--ignore=tests/e2e", "--ignore=tests/bench", *marks, *session.posargs)


@nox.session(python=PYTHONS[1])
def e2e(session: nox.Session) -> None:
    """A real headless Chromium against `scope-trio serve` (needs Debian's chromium)."""
    session.install("-e", ".", "--group", "e2e")
    session.run("pytest", "tests/e2e", *session.posargs)


@nox.session(python=PYTHONS[-1])
def lint(session: nox.Session) -> None:
    """Ruff lint (ASYNC rules included) and format check."""
    session.install("--group", "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHONS[0])  # matches mypy's python_version = "3.10"
def typecheck(session: nox.Session) -> None:
    """mypy --strict over scope_trio (configured in pyproject.toml)."""
    session.install("-e", ".", "--group", "types")
    session.run("mypy", *session.posargs)


@nox.session(python=PYTHONS[1])
def race(session: nox.Session) -> None:
    """The race benchmark, checked against its baseline, and its mutation self-test: broken
    supervisors it must catch (deterministic: CI runs both)."""
    session.install("-e", ".", "--group", "tests")
    session.run("pytest", "tests/bench/test_race_mutants.py")
    session.run("python", "benchmarks/race.py", "--check", *session.posargs)


@nox.session(python=PYTHONS[1])
def bench(session: nox.Session) -> None:
    """Every benchmark, checked against benchmarks/baseline.json (see benchmarks/README.md).

    The real-stack ones measure wall time on this machine, so they are not part of plain
    `nox` or CI; their smoke tests (tests/bench) run here first. posargs go to every
    benchmark, e.g. ``nox -s bench -- --quick``.
    """
    session.install("-e", ".", "--group", "tests")
    session.run("pytest", "tests/bench")
    failed = []
    for name in (
        "race",
        "stop_latency",
        "recovery",
        "relay",
        "api_load",
        "load",
        "http_proxy",
        "network",
    ):
        # Every benchmark runs even when an earlier one fails its check; the session fails
        # at the end, naming them.
        try:
            session.run("python", f"benchmarks/{name}.py", "--check", *session.posargs)
        except nox.command.CommandFailed:
            failed.append(name)
    if failed:
        session.error(f"benchmark checks failed: {', '.join(failed)}")
