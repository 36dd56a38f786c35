"""Packaging smoke test: the installed distribution matches the source tree."""

from __future__ import annotations

from importlib.metadata import entry_points, version

import scope_trio


def test_version_matches_installed_distribution() -> None:
    assert scope_trio.__version__ == version("scope-trio")


def test_console_script_is_declared() -> None:
    # Only the declaration: scope_trio.cli may not exist yet, so it is not imported.
    (script,) = entry_points(group="console_scripts", name="scope-trio")
    assert script.value == "scope_trio.cli:main"
