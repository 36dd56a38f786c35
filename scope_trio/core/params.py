"""Pipeline parameters: one JSON-object type, validated and copied once, at the edge.

A parameter update travels browser → HTTP or data channel → relay → manager → supervisor →
media session → the cloud. It is checked and copied exactly once, where it enters the
server: :func:`parse_json_object` for the text of a data-channel message, :func:`json_object`
for a body the HTTP layer already parsed. What comes out is a fresh :data:`Parameters` that
nobody else holds, so everything downstream takes it over without copying again; the one
error type for a bad value is :class:`ParameterError` (a ``ValueError``: a client error).

The depth guard (:data:`MAX_JSON_DEPTH`) is here too because every JSON body the server
parses goes through :func:`loads_json`, not only parameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_JSON_DEPTH",
    "JsonTooDeepError",
    "ParameterError",
    "Parameters",
    "json_object",
    "loads_json",
    "nested_deeper_than",
    "owned",
    "parse_json_object",
]


class Parameters(dict[str, Any]):
    """A JSON object of pipeline parameters (``prompts``, ``noise_scale``, ... extra keys
    allowed) that :func:`json_object` or :func:`parse_json_object` checked and made fresh.

    Handing one over hands it over: the receiver keeps it without copying, and the giver
    does not touch it again. A plain ``dict`` is still accepted everywhere and is checked
    and copied by whoever keeps it."""


MAX_JSON_DEPTH = 64
"""Parameters and request bodies nested deeper are refused: deep enough for any real body,
shallow enough that nothing downstream (validation, copies, the cloud link's ``json.dumps``)
can recurse too far."""


class JsonTooDeepError(ValueError):
    """JSON nested deeper than :data:`MAX_JSON_DEPTH`."""

    def __init__(self, limit: int = MAX_JSON_DEPTH) -> None:
        super().__init__(f"JSON nested deeper than {limit} levels")


def nested_deeper_than(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when lists and objects in ``value`` nest deeper than ``limit`` (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def loads_json(text: str | bytes, limit: int = MAX_JSON_DEPTH, *, allow_nan: bool = True) -> Any:
    """``json.loads`` that raises ``ValueError`` for every bad input: a deep nesting is a
    :class:`JsonTooDeepError`, never the ``RecursionError`` the parser would raise; with
    ``allow_nan=False`` the non-standard ``NaN`` / ``Infinity`` literals are refused too."""
    try:
        value = json.loads(text) if allow_nan else json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise JsonTooDeepError(limit) from None
    if nested_deeper_than(value, limit):
        raise JsonTooDeepError(limit)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class ParameterError(ValueError):
    """Parameters that are not a plain JSON object with string keys (a client error)."""


def json_object(value: Any, what: str = "parameters") -> Parameters:
    """``value`` as a fresh :data:`Parameters` (a deep copy); :class:`ParameterError` if it is
    not a JSON object with string keys holding only JSON values (no NaN, no deep nesting)."""
    if not isinstance(value, Mapping):
        raise ParameterError(f"{what} must be a JSON object, got {type(value).__name__}")
    if not all(isinstance(key, str) for key in value):  # json.dumps would stringify them
        raise ParameterError(f"{what} keys must be strings")
    if nested_deeper_than(dict(value)):
        raise ParameterError(f"{what} must be plain JSON: {JsonTooDeepError()}")
    try:
        copied = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:  # a cycle recurses
        raise ParameterError(f"{what} must be plain JSON: {exc}") from None
    return Parameters(copied)


def owned(value: Any, what: str = "parameters") -> Parameters:
    """``value`` for the caller to keep: a :class:`Parameters` is handed over as it is (it
    is fresh and nobody else holds it); anything else is checked and copied
    (:func:`json_object`), so what is kept never aliases someone else's dict."""
    if type(value) is Parameters:
        return value
    return json_object(value, what)


def parse_json_object(text: str | bytes, what: str = "parameters") -> Parameters:
    """The JSON object in ``text`` (parsing makes it fresh: no copy needed), or
    :class:`ParameterError` saying what is wrong with it."""
    try:
        value = loads_json(text, allow_nan=False)
    except ValueError as exc:  # not JSON, NaN or Infinity, or nested too deep
        raise ParameterError(f"{what} is not usable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ParameterError(f"{what} must be a JSON object, got {type(value).__name__}")
    return Parameters(value)
