"""Parameters: checked and copied once where they enter, then handed over, never re-copied."""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from scope_trio.core.params import (
    MAX_JSON_DEPTH,
    ParameterError,
    Parameters,
    json_object,
    parse_json_object,
)
from scope_trio.core.supervisor import SessionSupervisor
from scope_trio.dev.fakes import FakeCloud


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_json_object_checks_and_copies() -> None:
    source = {"prompts": [{"text": "a", "weight": 1.0}]}
    params = json_object(source)
    assert type(params) is Parameters
    assert params == source
    source["prompts"][0]["text"] = "changed"
    assert params["prompts"][0]["text"] == "a", "a deep copy: the caller's dict is not kept"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2], "must be a JSON object, got list"),
        ({1: "x"}, "keys must be strings"),
        ({"x": {1, 2}}, "must be plain JSON"),
        ({"x": math.nan}, "must be plain JSON"),
        ({"x": deep(MAX_JSON_DEPTH + 1)}, "nested deeper than"),
    ],
)
def test_json_object_refuses_what_is_not_a_json_object(value: Any, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        json_object(value, "initialParameters")
    assert issubclass(ParameterError, ValueError), "a client error (HTTP 400)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not usable JSON"),
        ('{"x": NaN}', "NaN is not JSON"),
        ('{"x": Infinity}', "Infinity is not JSON"),
        ("[1]", "must be a JSON object, got list"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than"),
    ],
)
def test_parse_json_object_refuses_with_one_error_type(text: str, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        parse_json_object(text, "message")


def test_parse_json_object_gives_fresh_parameters() -> None:
    params = parse_json_object('{"noise_scale": 0.5}')
    assert type(params) is Parameters
    assert params == {"noise_scale": 0.5}


async def test_the_supervisor_takes_over_checked_parameters_and_copies_anything_else(
    autojump_clock: MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = SessionSupervisor(nursery, FakeCloud())
        checked = json_object({"prompts": ["a"], "nested": {"k": 1}})
        await supervisor.start(checked)
        assert supervisor._params["nested"] is checked["nested"], "handed over, not copied"
        plain: dict[str, Any] = {"nested": {"k": 2}}
        supervisor.update_parameters(plain)
        plain["nested"]["k"] = 3
        assert supervisor.last_parameters["nested"] == {"k": 2}, "a plain dict is copied"
        await supervisor.stop()
