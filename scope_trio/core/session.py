"""The narrow protocol between the reconnect supervisor and one cloud media session.

The supervisor never sees aiortc: it asks a :data:`SessionFactory` for a fresh
:class:`MediaSession` for every connect attempt, runs it in a nursery it owns, and
learns about the session's life only through :meth:`MediaSession.run`:

* ``run`` connects, calls ``task_status.started()`` once the session really carries
  media, and then keeps running until the session is lost. The moment it sees the loss it
  calls ``on_lost(reason)`` (so the status can say so at once, before any slow close), then
  closes what it opened and *returns* the same reason.
* Raising before ``started()`` means the connect failed; the exception's text is the reason.
* Cancellation means the supervisor is done with the session. Whatever ``run`` does on
  the way out, it must close everything it opened, shielded and under its own deadline,
  so that the next attempt never overlaps a half-closed session.

The real implementation is :class:`scope_trio.cloud.media.CloudMediaSession`; the deterministic
fake used by the race tests is :class:`scope_trio.dev.fakes.FakeCloud`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import trio

Parameters = dict[str, Any]
"""A JSON object of pipeline parameters (``prompts``, ``noise_scale``, ... extra keys allowed)."""

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


def loads_json(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that raises ``ValueError`` for every bad input: a deep nesting is a
    :class:`JsonTooDeepError`, never the ``RecursionError`` the parser would raise."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JsonTooDeepError(limit) from None
    if nested_deeper_than(value, limit):
        raise JsonTooDeepError(limit)
    return value


class SessionClosedError(Exception):
    """Raised by :meth:`MediaSession.send_parameters` when the session cannot deliver any more."""


class MediaSession(Protocol):
    """One cloud media session: one peer connection, from connect to loss or close."""

    async def run(
        self,
        params: Mapping[str, Any],
        on_lost: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None],
    ) -> str:
        """Connect with ``params`` as the initial parameters, report readiness, run until lost.

        Calls ``on_lost(reason)`` as soon as a loss is seen, and returns the same reason once
        closed. Raises if it could not connect. Closes everything it opened before
        returning, raising or being cancelled; ``on_lost`` is not called for a cancel.
        """
        ...

    def send_parameters(self, update: Mapping[str, Any]) -> None:
        """Deliver a parameter update to the cloud now (ordered, reliable).

        Raises :class:`SessionClosedError` when the session is not connected any more.
        """
        ...


SessionFactory = Callable[[], MediaSession]
"""Makes a fresh, unconnected session for each connect attempt."""
