"""Log lines that say which cloud connection and which session they are about, as text or JSON.

Every record a handler of :func:`configure` emits carries two attributes, ``connection_id``
(the cloud's id of the signaling connection, from ``ready``) and ``session_id`` (the cloud's
``sessionId`` of a media session, or the relay's browser session id), empty when unknown.

Where the ids come from: two context variables, bound in the task that owns each id at the
moment it becomes known. Trio gives every new task a copy of its spawner's context, so a
binding reaches the task itself and the tasks it starts afterwards, never its parent or
siblings:

* :class:`~scope_trio.cloud.link.CloudLink` binds ``connection_id`` in its own task when
  ``ready`` arrives: its receive loop (cloud messages, the cloud's re-logged ``logs`` lines)
  and its heartbeat, started after, carry it;
* :class:`~scope_trio.cloud.CloudManager` binds it in its link keeper once the link is up
  (link up/ended, the re-link replay) and clears it before re-linking; ``start_media`` binds
  it for the supervisor run it starts (a run never outlives its link: a link loss supersedes
  it), with no session id: the supervisor's own lines (reconnect attempts) are about no one
  session;
* :class:`~scope_trio.cloud.media.CloudMediaSession` binds ``session_id`` when the cloud's answer
  names it: its loss watchers, and the supervisor's "media session lost" line they trigger,
  carry it;
* :class:`~scope_trio.relay.relay.Relay` binds the browser session id in the session's task: every
  task of that browser session carries it.

A line logged from a task that cannot know an id (an HTTP handler answering an offer, an
owner closing a link) passes it explicitly: ``logger.info(..., extra=ids(session_id=...))``;
an explicit id wins over the context.

Secrets: both formatters replace every configured secret (the api key) with ``***`` in
everything they write: the message, its arguments, exception text, stack, and extra fields,
also where a ``repr`` or JSON escaped it. The JSON formatter redacts each value before
encoding it, so its own escaping cannot hide the key from the redaction either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, TextIO

__all__ = [
    "ContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "add_secret",
    "bind_connection",
    "bind_session",
    "bound",
    "configure",
    "connection_id_var",
    "ids",
    "session_id_var",
]

connection_id_var: ContextVar[str] = ContextVar("scope_trio_connection_id", default="")
"""The cloud connection the current task works for ("" when none)."""
session_id_var: ContextVar[str] = ContextVar("scope_trio_session_id", default="")
"""The media or browser session the current task works for ("" when none)."""

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
REDACTED = "***"

_ID_FIELDS = ("connection_id", "session_id")
_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName", *_ID_FIELDS}
"""Attributes every record has; anything else on a record came from ``extra``."""


def bind_connection(value: str | None) -> None:
    """Bind ``connection_id`` for the current task and the tasks it starts from now on."""
    connection_id_var.set(value or "")


def bind_session(value: str | None) -> None:
    """Bind ``session_id`` for the current task and the tasks it starts from now on."""
    session_id_var.set(value or "")


@contextlib.contextmanager
def bound(*, connection_id: str | None = None, session_id: str | None = None) -> Iterator[None]:
    """Bind the given ids (None: leave as is, "": clear) for the block, then restore them.

    Tasks started inside the block keep the bindings after it ends.
    """
    tokens = []
    for var, value in ((connection_id_var, connection_id), (session_id_var, session_id)):
        if value is not None:
            tokens.append((var, var.set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def ids(*, connection_id: str | None = None, session_id: str | None = None) -> dict[str, str]:
    """``extra`` for a line logged where the ids are not bound; None leaves one to the context."""
    given = {"connection_id": connection_id, "session_id": session_id}
    return {key: value for key, value in given.items() if value}


class ContextFilter(logging.Filter):
    """Puts ``connection_id`` and ``session_id`` on every record: the explicit ``extra`` one,
    else the current task's binding, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "connection_id", ""):
            record.connection_id = connection_id_var.get()
        if not getattr(record, "session_id", ""):
            record.session_id = session_id_var.get()
        return True


MAX_ADDED_SECRETS = 32
_added: dict[str, None] = {}
_added_forms: tuple[str, ...] = ()


def add_secret(secret: str | None) -> None:
    """Redact ``secret`` too, from every line formatted from now on, by every formatter of
    this module (an api key that arrives at run time, posted to ``/api/v1/cloud/connect``).

    Process-wide, like logging itself; the latest :data:`MAX_ADDED_SECRETS` are kept.
    """
    global _added_forms  # noqa: PLW0603 - one registry for every handler, as logging is
    if not secret or len(secret) < 4:
        return
    _added.pop(secret, None)
    _added[secret] = None
    while len(_added) > MAX_ADDED_SECRETS:
        del _added[next(iter(_added))]
    _added_forms = _secrets(_added)


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    # Longest first across both sets, so a form that contains another is replaced whole.
    for secret in sorted({*secrets, *_added_forms}, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _secrets(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """Each secret and its escaped forms (as ``repr`` and JSON write it, nested once: a key
    with a quote or backslash in a logged repr is the key all the same); longest first, so
    a form that contains another is replaced whole."""
    forms = {s for s in secrets if s}
    for _ in range(2):
        forms |= {escaped for form in forms for escaped in _escaped(form)}
    return tuple(sorted(forms, key=len, reverse=True))


def _escaped(text: str) -> Iterator[str]:
    yield repr(text)[1:-1]
    yield json.dumps(text)[1:-1]
    yield json.dumps(text, ensure_ascii=False)[1:-1]


class TextFormatter(logging.Formatter):
    """``time logger LEVEL message [connection_id=... session_id=...]``, secrets redacted.

    The ids appear only when known. Works for records that did not pass a
    :class:`ContextFilter` too (no ids then).
    """

    def __init__(self, secrets: Iterable[str | None] = (), fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)
        self._secrets = _secrets(secrets)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        tags = " ".join(
            f"{name}={value}" for name in _ID_FIELDS if (value := getattr(record, name, ""))
        )
        return f"{text} [{tags}]" if tags else text

    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record), self._secrets)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, secrets redacted from every value.

    Keys: ``time`` (ISO-8601 UTC, milliseconds, ``Z``), ``level``, ``logger``, ``message``,
    ``connection_id``, ``session_id`` ("" when unknown); ``exception`` (the formatted
    traceback) and ``stack`` when the record has them; then any ``extra`` fields, as JSON
    values when they are plain, else as their ``str``.
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self._secrets = _secrets(secrets)

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, timezone.utc)
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "connection_id": str(getattr(record, "connection_id", "") or ""),
            "session_id": str(getattr(record, "session_id", "") or ""),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry.setdefault(key, _plain(value))
        return json.dumps(self._redacted(entry))

    def _redacted(self, value: Any) -> Any:
        if isinstance(value, str):
            return _redact(value, self._secrets)
        if isinstance(value, dict):
            return {_redact(str(k), self._secrets): self._redacted(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redacted(item) for item in value]
        return value


def _plain(value: Any) -> Any:
    """``value`` if JSON represents it faithfully, else its ``str`` (redacted later)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def configure(
    level: int | str = logging.INFO,
    *,
    json_lines: bool = False,
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Log to ``stream`` (stderr) from the root logger: text, or one JSON object per line.

    The handler carries the ids (:class:`ContextFilter`) and redacts ``secrets``. Call once
    per process (the CLI does); returns the handler so a caller can remove it again.
    """
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter(secrets) if json_lines else TextFormatter(secrets))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
